"""What a node does for each message: answer the query, train, evaluate. Plain values in and out.

No Flower, Prefect or minio import. The ClientApp (`clients/client_app.py`) turns a Flower
message into a :class:`Task` and calls :func:`handle`, either in its own process or in the
node's warm worker (`clients/_warm.py`), which keeps this module, torch and the node's
loaded data between messages. Both paths run the same code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clients._energy import EnergyMeter  # stdlib only: codecarbon loads when a meter is created
from clients.data import Dataset, load_dataset, node_data, split_local
from clients.models import Model, build_model, summed_arrays, to_shares
from clients.node_data import check_compatible, load_node_data, summarize
from clients.preprocess import local_stats, prepare, spec_digest
from clients.spec import RunSpec

KINDS = ("query", "train", "evaluate")
_SPLIT_CACHE_SIZE = 4  # (dataset, node data, split settings) combinations a warm worker keeps


@dataclass(frozen=True)
class Task:
    """One message for a node: its kind, the run and node config, the global arrays and per-round values."""

    kind: str  # query | train | evaluate
    run_config: dict[str, Any]
    node_config: dict[str, Any]
    message_id: str = ""  # Flower's id of the message: a retry of the same message is charged to the ledger once
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the per-round ConfigRecord of a train message
    teacher: dict[str, np.ndarray] = field(default_factory=dict)  # a distilled arm's teacher model (train only)
    created_at: float = 0.0  # when the server created the message (Unix time; 0: unknown)


@dataclass(frozen=True)
class Result:
    """A node's answer: the trained arrays (train only) and the reply's values (flat, Flower-ready)."""

    values: dict[str, Any]
    arrays: dict[str, np.ndarray] | None = None


@dataclass(frozen=True)
class NodeFacts:
    """What the node config says about this node: where its data comes from, its tier and device."""

    tier: str  # "gpu" or "cpu"
    device: str  # "auto", "cpu", "cuda", "cuda:N"
    data_path: str  # the node's own data file or image folder; "" = a partition of the run's dataset
    data_format: str  # auto | csv | npz | image-folder (own data only)
    label_column: str  # label column of an own CSV file
    partition_id: int  # the partition of the run's dataset; for own data a stable negative id (data_id)
    num_partitions: int  # 0 for own data
    privacy_ledger: str  # the node's privacy ledger file ("" = ~/.fedcompare/privacy-ledger-<data>.json)
    privacy_budget: float | None  # the node's lifetime ε over every run; None = no limit

    @property
    def data_id(self) -> str:
        """Return a stable name of the node's data: its partition, or a hash of its own file's path and size."""
        if not self.data_path:
            return f"partition-{self.partition_id}-of-{self.num_partitions}"
        return f"file-{_file_digest(self.data_path)[:16]}"

    @property
    def who(self) -> str:
        """Return how errors name this node's data."""
        return f"node data {self.data_path!r}" if self.data_path else f"node partition {self.partition_id}"


def node_facts(node_config: Mapping[str, object], run: RunSpec | None = None) -> NodeFacts:
    """Read the node config once: its own data file (data-path wins over partition-id), or its partition.

    A virtual node of Flower's Simulation Engine (``run.simulated``) has only partition-id and
    num-partitions in its node config: its tier comes from the run's ``simulation.gpu_share``.
    """
    if run is not None and run.simulated and "tier" not in node_config and "partition-id" in node_config:
        node_config = {**node_config, "tier": run.simulation.tier_of(int(node_config["partition-id"]))}
    tier, device = str(node_config.get("tier", "cpu")), str(node_config.get("device", "auto"))
    ledger = str(node_config.get("privacy-ledger", ""))
    budget = float(node_config["privacy-budget"]) if "privacy-budget" in node_config else None
    data_path = str(node_config.get("data-path", ""))
    if data_path:
        # a restarted node must give the same partition id (the server re-admits it by that id): derive it from
        # the data file, negative so that it never names a partition of the run's dataset
        partition_id = -1 - int(_file_digest(data_path)[:8], 16) % 2**31
        return NodeFacts(tier, device, data_path, str(node_config.get("data-format", "auto")),
                         str(node_config.get("label-column", "label")), partition_id, 0, ledger, budget)
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
    return NodeFacts(tier, device, "", "auto", "label", partition_id, num_partitions, ledger, budget)


def _file_digest(data_path: str) -> str:
    """Return the sha256 hex digest of a data file's resolved path and size (a folder: its files' total size)."""
    path = Path(data_path).expanduser().resolve()
    if path.is_dir():
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    else:
        size = path.stat().st_size if path.exists() else -1
    return hashlib.sha256(f"{path}\0{size}".encode()).hexdigest()


def _file_version(data_path: str) -> tuple[str, int, int]:
    """Return (resolved path, size, mtime in ns) of a file or folder: a cache key that changes with its content."""
    path = Path(data_path).expanduser().resolve()
    if not path.exists():
        return str(path), -1, -1
    if path.is_dir():
        stats = [f.stat() for f in path.rglob("*") if f.is_file()]
        return str(path), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


_splits: OrderedDict[tuple, tuple[Dataset, Dataset]] = OrderedDict()


def local_splits(node_config: Mapping[str, object], run: RunSpec, *,
                 facts: NodeFacts | None = None, raw: bool = False) -> tuple[Dataset, Dataset]:
    """Return this node's (local train, local test): a split of its own data file, or of its partition.

    The splits are as the model sees them (the run's preprocessing spec applied), or with
    ``raw`` as loaded. ``facts``: the node config already read (read here when None). A warm
    worker keeps the last few splits, keyed by everything they are made of (files by path,
    size and modification time), so a changed file is read again.
    """
    facts = facts or node_facts(node_config)
    dataset = run.data.dataset
    paths = [dataset] if Path(dataset).suffix or Path(dataset).is_dir() else []
    paths += [facts.data_path] if facts.data_path else []
    files = tuple(_file_version(path) for path in paths)
    key = (facts, run.data, run.seed, files, "" if raw else run.preprocessing)
    if key in _splits:
        _splits.move_to_end(key)
        return _splits[key]
    splits = _load_splits(facts, run, files)
    if not raw:
        spec = run.preprocessing_spec
        splits = (prepare(splits[0], spec), prepare(splits[1], spec))
    _splits[key] = splits
    while len(_splits) > _SPLIT_CACHE_SIZE:
        _splits.popitem(last=False)
    return splits


_datasets: OrderedDict[tuple, Dataset] = OrderedDict()


def _run_dataset(run: RunSpec, own_data: bool, files: tuple) -> Dataset:
    """Return the run's dataset, loaded once per process for its settings and files.

    A simulation's Ray actor answers for hundreds of virtual nodes: each holds a partition of
    the same dataset, which is parsed once, not once per message (0.2 s for Fashion-MNIST).
    """
    kwargs = run.data.load_kwargs(own_data=own_data)
    key = (run.data.dataset, tuple(sorted(kwargs.items())), files)
    if key not in _datasets:
        _datasets[key] = load_dataset(run.data.dataset, **kwargs)
        while len(_datasets) > 2:
            _datasets.popitem(last=False)
    _datasets.move_to_end(key)
    return _datasets[key]


def _load_splits(facts: NodeFacts, run: RunSpec, files: tuple = ()) -> tuple[Dataset, Dataset]:
    """Load and split this node's data (``files``: the versions of the files it reads, for the dataset cache)."""
    data = run.data
    try:
        dataset = _run_dataset(run, bool(facts.data_path), files)
    except ValueError as err:
        if not facts.data_path:
            raise
        raise ValueError(
            f"node with its own data {facts.data_path!r} needs the run's dataset {data.dataset!r} for its input "
            f"shape and number of classes, and cannot load it: {err}"
        ) from None
    if not facts.data_path:
        return node_data(dataset, partition_id=facts.partition_id, num_partitions=facts.num_partitions,
                         **run.data_kwargs())
    image = dataset.input_shape if dataset.kind == "image" else None  # an own image folder takes the run's shape
    own = load_node_data(facts.data_path, data_format=facts.data_format, label_column=facts.label_column,
                         image_size=image[1:] if image else None, channels=image[0] if image else None)
    check_compatible(summarize(own, path=facts.data_path, data_format=facts.data_format),
                     input_shape=dataset.input_shape, num_classes=dataset.num_classes)
    own = dataclasses.replace(own, num_classes=dataset.num_classes)  # the model predicts all the run's classes
    return split_local(own, local_test_fraction=data.local_test_fraction, seed=run.seed)


def handle(task: Task) -> Result:
    """Answer one message: dispatch on its kind."""
    if task.kind not in KINDS:
        raise ValueError(f"unknown task kind {task.kind!r}: expected one of {', '.join(KINDS)}")
    # from the server's send to the start of this node's work: Flower's delivery (polls, a ClientApp
    # process) and the time the node spent on other messages first, e.g. another arm's training
    waited = max(0.0, time.time() - task.created_at) if task.created_at else 0.0
    run = RunSpec.from_run_config(task.run_config)
    facts = node_facts(task.node_config, run)  # read once per message
    result = {"query": query, "train": train, "evaluate": evaluate}[task.kind](task, facts, run)
    return dataclasses.replace(result, values={**result.values, "node-wait-seconds": waited})


def query(task: Task, facts: NodeFacts, run: RunSpec) -> Result:
    """Tell the server what this node is: tier, device, data, number of examples and memory (counts only)."""
    train_set, test_set = local_splits(task.node_config, run, facts=facts, raw=True)
    device = _detect_device(facts.tier) if facts.device == "auto" else facts.device
    statistics = {}
    if run.wants_statistics and train_set.kind == "tabular":  # counts and sums of the training split, no row
        statistics = {"preprocessing-stats": json.dumps(local_stats(train_set), separators=(",", ":"))}
    return Result({
        "tier": facts.tier,
        "device": device,
        "partition-id": facts.partition_id,
        "num-partitions": facts.num_partitions,
        "data-source": "node-file" if facts.data_path else "partition",
        "data-id": facts.data_id,
        "num-train": len(train_set.y),
        "num-test": len(test_set.y),
        "classes-seen": int(np.unique(train_set.y).size),
        "memory-mb": _available_memory_mb(),
        **gpu_facts(device),
        "pid": os.getpid(),
        **statistics,
    })


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


def gpu_facts(device: str) -> dict[str, object]:
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


def _model(run: RunSpec, facts: NodeFacts, train_set: Dataset, arrays: Mapping[str, np.ndarray]) -> Model:
    """Build the run's model on this node's device and load the global arrays."""
    model = build_model(run.training.model, input_shape=train_set.input_shape, num_classes=train_set.num_classes,
                        seed=run.seed, device=facts.device, private=run.private)
    model.set_arrays(OrderedDict(arrays))
    return model


def train(task: Task, facts: NodeFacts, run: RunSpec) -> Result:
    """Train the received global model on the node's local training split."""
    meter = EnergyMeter(device=facts.device)  # first: codecarbon detects the hardware while the data loads
    train_set, _ = local_splits(task.node_config, run, facts=facts)
    server_round = int(task.config["server-round"])  # the only per-round value; the rest is the run spec
    training = run.training
    private, wrap = {}, {}
    if run.privacy.mode == "sample-level":
        private, wrap = _charge_dp_sgd(run, facts, server_round, len(train_set.y), message_id=task.message_id)
    elif run.privacy.mode == "client-level":
        private = {"dp-unit-weight": 1.0}  # client-level DP averages the clipped updates with equal weights
    model = _model(run, facts, train_set, task.arrays)
    with meter.measure(on_gpu=model.device.startswith("cuda")) as energy:
        if run.teacher_arm:
            metrics = _fit_distilled(run, facts, model, train_set, task.teacher, seed=run.seed + server_round)
        else:
            metrics = model.fit(train_set, epochs=training.local_epochs, batch_size=training.batch_size,
                                learning_rate=training.learning_rate, optimizer=training.optimizer,
                                weight_decay=training.weight_decay, seed=run.seed + server_round, **wrap)
    applied = {"preprocessing-digest": float(spec_digest(run.preprocessing_spec))} if run.preprocessing_spec else {}
    values = {"num-examples": len(train_set.y), "partition-id": facts.partition_id,
              **_floats(metrics, "num_examples", *_withheld(run)),
              **_resources(model.device), **energy.metrics("train"), **private, **applied}
    # counts travel as shares of the node's examples; the server multiplies FedAvg's mean back into sums
    return Result(values, arrays=to_shares(model.get_arrays(), len(train_set.y), summed_arrays(training.model)))


def _fit_distilled(run: RunSpec, facts: NodeFacts, model: Model, train_set: Dataset,
                   teacher_arrays: Mapping[str, np.ndarray], *, seed: int) -> dict[str, float]:
    """Train ``model`` on the node's data and the teacher's soft labels (clients/distill.py); return its metrics."""
    from clients.distill import fit_distilled, soft_labels

    if not teacher_arrays:
        raise ValueError(f"arm {run.arm} is distilled from arm {run.teacher_arm}, but the training message carries no "
                         "teacher arrays: submit the run from fedcompare's ServerApp")
    teacher = build_model(run.teacher_model, input_shape=train_set.input_shape, num_classes=train_set.num_classes,
                          seed=run.seed, device=facts.device)
    teacher.set_arrays(OrderedDict(teacher_arrays))
    training, distill = run.training, run.distill
    return fit_distilled(model, train_set, soft_labels(teacher, train_set.x, distill.temperature),
                         temperature=distill.temperature, alpha=distill.alpha, epochs=training.local_epochs,
                         batch_size=training.batch_size, learning_rate=training.learning_rate, seed=seed,
                         optimizer=training.optimizer, weight_decay=training.weight_decay)


def _charge_dp_sgd(run: RunSpec, facts: NodeFacts, server_round: int, num_examples: int, *,
                   message_id: str) -> tuple[dict[str, float], dict]:
    """Plan this node's DP-SGD, charge the round to its privacy ledger; return reply metrics and the fit wrapper.

    Raises BudgetExceeded (the node sits the round out: Flower sends the server an error
    reply that names the reason) or PrivacyInfeasible.
    """
    from privacy.accounting import plan_sample_level
    from privacy.sample_level import DEFAULT_GRAD_SAMPLE_MODE, dp_sgd

    plan = plan_sample_level(num_examples=num_examples, batch_size=run.training.batch_size,
                             local_epochs=run.training.local_epochs, rounds=run.rounds,
                             max_grad_norm=run.privacy.max_grad_norm, who=facts.who, **run.privacy.accounting_kwargs())
    spent = _ledger(run, facts).charge(plan, run_key=run.run_key, arm=run.arm, server_round=server_round,
                                       message_id=message_id)
    metrics = {
        "dp-noise-multiplier": plan.noise_multiplier, "dp-sample-rate": plan.sample_rate,
        "dp-steps": float(plan.steps_per_round), "dp-max-grad-norm": plan.max_grad_norm,
        "dp-epsilon": spent["epsilon_run"], "dp-node-epsilon": spent["epsilon_node"],
    }
    return metrics, {"wrap": dp_sgd(plan, grad_sample_mode=DEFAULT_GRAD_SAMPLE_MODE)}


def _ledger(run: RunSpec, facts: NodeFacts):
    """Return the privacy ledger of this node's data: a file on the node, or for a virtual node one in the store.

    A virtual node of a simulation has no disk of its own, and the Ray actor that answers it
    may run on any host of the cluster: its ledger lives in the run's store, one per partition
    of one partitioning (dataset, scheme, seed, number of nodes), across runs and arms.
    """
    from privacy.ledger import PrivacyLedger, StoreLedger

    if run.simulated and not facts.privacy_ledger:
        from infra.store import open_store

        data = run.data
        name = (f"{Path(data.dataset).name}-{data.partitioning}-seed{run.seed}-of-{facts.num_partitions}/"
                f"partition-{facts.partition_id}")
        return StoreLedger(open_store(run.store_uri), f"privacy-ledgers/{name}.json",
                           budget_epsilon=facts.privacy_budget)
    # one ledger per data; keyed by the file's path alone, so that appending rows to it does not reset its spend
    path_digest = hashlib.sha256(str(Path(facts.data_path).expanduser().resolve()).encode()).hexdigest()[:16]
    ledger_name = f"file-{path_digest}" if facts.data_path else f"partition-{facts.partition_id}"
    ledger_path = facts.privacy_ledger or os.path.expanduser(f"~/.fedcompare/privacy-ledger-{ledger_name}.json")
    return PrivacyLedger(ledger_path, budget_epsilon=facts.privacy_budget)


def evaluate(task: Task, facts: NodeFacts, run: RunSpec) -> Result:
    """Evaluate the received global model on the node's local test split."""
    meter = EnergyMeter(device=facts.device)  # first: codecarbon detects the hardware while the data loads
    train_set, test_set = local_splits(task.node_config, run, facts=facts)
    model = _model(run, facts, train_set, task.arrays)
    with meter.measure(on_gpu=model.device.startswith("cuda")) as energy:
        wall, cpu = time.perf_counter(), time.process_time()
        metrics = model.evaluate(test_set, batch_size=run.training.batch_size)
        timing = {"evaluate-seconds": time.perf_counter() - wall, "evaluate-cpu-seconds": time.process_time() - cpu}
    return Result({"num-examples": len(test_set.y), "partition-id": facts.partition_id,
                   **_floats(metrics, "num_examples"), **timing,
                   **_resources(model.device), **energy.metrics("evaluate")})


def _withheld(run: RunSpec) -> tuple[str, ...]:
    """Return the training metrics a private run does not send: the DP guarantee covers the model only."""
    return ("train_loss",) if run.privacy.mode != "none" else ()


def _resources(device: str) -> dict[str, float]:
    """Return where this process computed (on-gpu 1/0) and its peak resident memory in MB."""
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"on-gpu": float(device.startswith("cuda")), "peak-rss-mb": peak_kib / 1024.0}


def _floats(metrics: dict[str, float], *skip: str) -> dict[str, float]:
    """Return the metrics as floats with dashes in their names, leaving out `skip`."""
    return {k.replace("_", "-"): float(v) for k, v in metrics.items() if k not in skip}
