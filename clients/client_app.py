"""Flower ClientApp of fedcompare: answers queries, trains and evaluates on the node's data."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import resource
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients._energy import EnergyMeter  # stdlib only: codecarbon loads when a meter is created
from clients._faults import HANG_TIMEOUTS, apply_fault, node_fault  # test-only fault injection
from clients.data import Dataset, load_dataset, node_data, split_local
from clients.models import Model, build_model
from clients.node_data import check_compatible, load_node_data, summarize
from clients.run_config import ArmRunConfig

app = ClientApp()


@dataclass(frozen=True)
class _NodeFacts:
    """What the node config says about this node: where its data comes from, its tier and device."""

    tier: str  # "gpu" or "cpu"
    device: str  # "auto", "cpu", "cuda", "cuda:N"
    data_path: str  # the node's own data file or image folder; "" = a partition of the run's dataset
    data_format: str  # auto | csv | npz | image-folder (own data only)
    label_column: str  # label column of an own CSV file
    partition_id: int  # the partition of the run's dataset; for own data a stable negative id (data_id)
    num_partitions: int  # 0 for own data

    @property
    def data_id(self) -> str:
        """Return a stable name of the node's data: its partition, or a hash of its own file's path and size."""
        if not self.data_path:
            return f"partition-{self.partition_id}-of-{self.num_partitions}"
        return f"file-{_file_digest(self.data_path)[:16]}"


def _node_facts(node_config: Mapping[str, object]) -> _NodeFacts:
    """Read the node config once: its own data file (data-path wins over partition-id), or its partition."""
    tier, device = str(node_config.get("tier", "cpu")), str(node_config.get("device", "auto"))
    data_path = str(node_config.get("data-path", ""))
    if data_path:
        # a restarted node must give the same partition id (the server re-admits it by that id): derive it from
        # the data file, negative so that it never names a partition of the run's dataset
        partition_id = -1 - int(_file_digest(data_path)[:8], 16) % 2**31
        return _NodeFacts(tier, device, data_path, str(node_config.get("data-format", "auto")),
                          str(node_config.get("label-column", "label")), partition_id, 0)
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise ValueError(
            "node config names neither data-path nor partition-id and num-partitions: start the SuperNode with "
            "--node-config 'data-path=\"/path/to/data.csv\"' or 'partition-id=0 num-partitions=4'"
        )
    partition_id, num_partitions = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"node config partition-id={partition_id} is outside 0..{num_partitions - 1}: "
            "start the SuperNode with a partition-id below num-partitions"
        )
    return _NodeFacts(tier, device, "", "auto", "label", partition_id, num_partitions)


@functools.lru_cache(maxsize=8)  # asked several times per message; a folder's sizes take a walk
def _file_digest(data_path: str) -> str:
    """Return the sha256 hex digest of a data file's resolved path and size (a folder: its files' total size)."""
    path = Path(data_path).expanduser().resolve()
    if path.is_dir():
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    else:
        size = path.stat().st_size if path.exists() else -1
    return hashlib.sha256(f"{path}\0{size}".encode()).hexdigest()


def _local_splits(node_config: Mapping[str, object], run: ArmRunConfig) -> tuple[Dataset, Dataset]:
    """Return this node's (local train, local test): a split of its own data file, or of its partition."""
    facts = _node_facts(node_config)
    try:
        dataset = load_dataset(run.dataset, label_column=run.label_column)
    except ValueError as err:
        if not facts.data_path:
            raise
        raise ValueError(
            f"node with its own data {facts.data_path!r} needs the run's dataset {run.dataset!r} for its input "
            f"shape and number of classes, and cannot load it: {err}"
        ) from None
    if not facts.data_path:
        return node_data(dataset, partition_id=facts.partition_id, num_partitions=facts.num_partitions,
                         **run.data_kwargs())
    own = load_node_data(facts.data_path, data_format=facts.data_format, label_column=facts.label_column)
    check_compatible(summarize(own, path=facts.data_path, data_format=facts.data_format),
                     input_shape=dataset.input_shape, num_classes=dataset.num_classes)
    own = dataclasses.replace(own, num_classes=dataset.num_classes)  # the model predicts all the run's classes
    return split_local(own, local_test_fraction=run.local_test_fraction, seed=run.seed)


def _local_data(context: Context) -> tuple[ArmRunConfig, Dataset, Dataset]:
    """Load this node's local train and test splits."""
    run = ArmRunConfig.from_run_config(context.run_config)
    train, test = _local_splits(context.node_config, run)
    return run, train, test


def _model(run: ArmRunConfig, context: Context, train: Dataset, arrays: ArrayRecord) -> Model:
    """Build the run's model on this node's device and load the global arrays."""
    device = _node_facts(context.node_config).device
    model = build_model(
        run.model,
        input_shape=train.input_shape,
        num_classes=train.num_classes,
        seed=run.seed,
        device=device,
        private=run.privacy_mode == "sample-level",
    )
    model.set_arrays(OrderedDict((name, array.numpy()) for name, array in arrays.items()))
    return model


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server what this node is: tier, device, data, number of examples and memory (counts only)."""
    run, train, test = _local_data(context)
    facts = _node_facts(context.node_config)
    device = _detect_device(facts.tier) if facts.device == "auto" else facts.device
    info = ConfigRecord(
        {
            "tier": facts.tier,
            "device": device,
            "partition-id": facts.partition_id,
            "num-partitions": facts.num_partitions,
            "data-source": "node-file" if facts.data_path else "partition",
            "data-id": facts.data_id,
            "num-train": len(train.y),
            "num-test": len(test.y),
            "classes-seen": int(np.unique(train.y).size),
            "memory-mb": _available_memory_mb(),
            **_gpu_facts(device),
            "pid": os.getpid(),
            "fault": node_fault(context.node_config),  # "" unless a test injects a fault into this node
        }
    )
    return Message(RecordDict({"node": info}), reply_to=msg)


def _available_memory_mb() -> float:
    """Return the host memory available to new work in MB (Linux MemAvailable; free pages elsewhere)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (ValueError, OSError):
        return -1.0  # unknown


def _gpu_facts(device: str) -> dict[str, object]:
    """Return the GPU's name and memory in MB when the node computes on CUDA; nothing otherwise."""
    if not device.startswith("cuda"):
        return {}
    import torch

    index = int(device.split(":")[1]) if ":" in device else 0
    props = torch.cuda.get_device_properties(index)
    return {"gpu-name": str(props.name), "gpu-memory-mb": props.total_memory / 2**20}


def _detect_device(tier: str) -> str:
    """Return 'cuda' when torch sees a GPU; cpu-tier nodes answer 'cpu' without importing torch."""
    if tier != "gpu":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on the node's local training split."""
    meter = _energy_meter(context)  # first: codecarbon detects the hardware while the data loads
    run, train_set, _ = _local_data(context)
    fault = node_fault(context.node_config)  # "" on a real node; tests inject faults (clients/_faults.py)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    epochs, batch_size = int(config["local-epochs"]), int(config["batch-size"])
    private, wrap = {}, {}
    if run.privacy_mode == "sample-level":
        private, wrap = _charge_dp_sgd(run, context, server_round, len(train_set.y), epochs, batch_size)
    elif run.privacy_mode == "client-level":
        private = {"dp-unit-weight": 1.0}  # client-level DP averages the clipped updates with equal weights
    model = _model(run, context, train_set, msg.content["arrays"])
    with meter.measure(on_gpu=model.device.startswith("cuda")) as energy:
        metrics = model.fit(
            train_set,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=float(config["learning-rate"]),
            optimizer=run.optimizer,
            seed=run.seed + server_round,
            **wrap,
        )
    trained = model.get_arrays()
    if fault:
        received = {name: array.numpy() for name, array in msg.content["arrays"].items()}
        trained = apply_fault(fault, trained, received, hang_seconds=HANG_TIMEOUTS * run.round_timeout)
    arrays = ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in trained.items()))
    reply = MetricRecord(
        {"num-examples": len(train_set.y), **_floats(metrics, "num_examples", *_withheld(run)),
         **_resources(model.device), **energy.metrics("train"), **private}
    )
    return Message(RecordDict({"arrays": arrays, "metrics": reply}), reply_to=msg)


def _charge_dp_sgd(run: ArmRunConfig, context: Context, server_round: int, num_examples: int, epochs: int,
                   batch_size: int) -> tuple[dict[str, float], dict]:
    """Plan this node's DP-SGD, charge the round to its privacy ledger; return reply metrics and the fit wrapper.

    Raises BudgetExceeded (the node sits the round out: Flower sends the server an error
    reply that names the reason) or PrivacyInfeasible.
    """
    from privacy.accounting import plan_sample_level
    from privacy.ledger import PrivacyLedger
    from privacy.sample_level import DEFAULT_GRAD_SAMPLE_MODE, dp_sgd

    facts = _node_facts(context.node_config)
    who = f"node data {facts.data_path!r}" if facts.data_path else f"node partition {facts.partition_id}"
    plan = plan_sample_level(num_examples=num_examples, batch_size=batch_size, local_epochs=epochs,
                             rounds=run.num_rounds, max_grad_norm=run.max_grad_norm,
                             who=who, **run.privacy_kwargs())
    node = context.node_config
    budget = float(node["privacy-budget"]) if "privacy-budget" in node else None
    # one ledger per data; keyed by the file's path alone, so that appending rows to it does not reset its spend
    path_digest = hashlib.sha256(str(Path(facts.data_path).expanduser().resolve()).encode()).hexdigest()[:16]
    ledger_name = f"file-{path_digest}" if facts.data_path else f"partition-{facts.partition_id}"
    ledger_path = str(node.get("privacy-ledger", "")) or os.path.expanduser(
        f"~/.fedcompare/privacy-ledger-{ledger_name}.json")
    spent = PrivacyLedger(ledger_path, budget_epsilon=budget).charge(
        plan, run_key=run.run_key, arm=run.arm, server_round=server_round)
    metrics = {
        "dp-noise-multiplier": plan.noise_multiplier, "dp-sample-rate": plan.sample_rate,
        "dp-steps": float(plan.steps_per_round), "dp-max-grad-norm": plan.max_grad_norm,
        "dp-epsilon": spent["epsilon_run"], "dp-node-epsilon": spent["epsilon_node"],
    }
    return metrics, {"wrap": dp_sgd(plan, grad_sample_mode=DEFAULT_GRAD_SAMPLE_MODE)}


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the node's local test split."""
    meter = _energy_meter(context)  # first: codecarbon detects the hardware while the data loads
    run, train_set, test_set = _local_data(context)
    model = _model(run, context, train_set, msg.content["arrays"])
    with meter.measure(on_gpu=model.device.startswith("cuda")) as energy:
        wall, cpu = time.perf_counter(), time.process_time()
        metrics = model.evaluate(test_set, batch_size=run.batch_size)
        timing = {"evaluate-seconds": time.perf_counter() - wall, "evaluate-cpu-seconds": time.process_time() - cpu}
    reply = MetricRecord(
        {"num-examples": len(test_set.y), **_floats(metrics, "num_examples"), **timing, **_resources(model.device),
         **energy.metrics("evaluate")}
    )
    return Message(RecordDict({"metrics": reply}), reply_to=msg)


def _withheld(run: ArmRunConfig) -> tuple[str, ...]:
    """Return the training metrics a private run does not send: the DP guarantee covers the model only."""
    return ("train_loss",) if run.privacy_mode != "none" else ()


def _energy_meter(context: Context) -> EnergyMeter:
    """Start measuring this node's energy with codecarbon's offline tracker."""
    return EnergyMeter(device=_node_facts(context.node_config).device)


def _resources(device: str) -> dict[str, float]:
    """Return where this process computed (on-gpu 1/0) and its peak resident memory in MB."""
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"on-gpu": float(device.startswith("cuda")), "peak-rss-mb": peak_kib / 1024.0}


def _floats(metrics: dict[str, float], *skip: str) -> dict[str, float]:
    """Return the metrics as floats with dashes in their names, leaving out `skip`."""
    return {k.replace("_", "-"): float(v) for k, v in metrics.items() if k not in skip}
