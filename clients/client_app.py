"""Flower ClientApp of fedcompare: answers queries, trains and evaluates on the node's data."""

from __future__ import annotations

import os
import resource
import time
from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients._energy import EnergyMeter  # stdlib only: codecarbon loads when a meter is created
from clients._faults import HANG_TIMEOUTS, apply_fault, node_fault  # test-only fault injection
from clients.data import Dataset, load_dataset, node_data
from clients.models import Model, build_model
from clients.run_config import ArmRunConfig

app = ClientApp()


def _node_facts(context: Context) -> tuple[int, int, str, str]:
    """Read the node config once: partition id, number of partitions, tier, device."""
    node = context.node_config
    partition_id = int(node["partition-id"])
    num_partitions = int(node["num-partitions"])
    tier = str(node.get("tier", "cpu"))
    device = str(node.get("device", "auto"))
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"node config partition-id={partition_id} is outside 0..{num_partitions - 1}: "
            "start the SuperNode with a partition-id below num-partitions"
        )
    return partition_id, num_partitions, tier, device


def _local_data(context: Context) -> tuple[ArmRunConfig, Dataset, Dataset]:
    """Load this node's local train and test splits for the run's dataset."""
    run = ArmRunConfig.from_run_config(context.run_config)
    partition_id, num_partitions, _, _ = _node_facts(context)
    dataset = load_dataset(run.dataset, label_column=run.label_column)
    train, test = node_data(
        dataset, partition_id=partition_id, num_partitions=num_partitions, **run.data_kwargs()
    )
    return run, train, test


def _model(run: ArmRunConfig, context: Context, train: Dataset, arrays: ArrayRecord) -> Model:
    """Build the run's model on this node's device and load the global arrays."""
    _, _, _, device = _node_facts(context)
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
    """Tell the server what this node is: tier, device, partition and number of examples."""
    run, train, test = _local_data(context)
    partition_id, num_partitions, tier, device = _node_facts(context)
    if device == "auto":
        device = _detect_device(tier)
    info = ConfigRecord(
        {
            "tier": tier,
            "device": device,
            "partition-id": partition_id,
            "num-partitions": num_partitions,
            "num-train": len(train.y),
            "num-test": len(test.y),
            "classes-seen": int(np.unique(train.y).size),
            "pid": os.getpid(),
            "fault": node_fault(context.node_config),  # "" unless a test injects a fault into this node
        }
    )
    return Message(RecordDict({"node": info}), reply_to=msg)


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

    partition_id, *_ = _node_facts(context)
    plan = plan_sample_level(num_examples=num_examples, batch_size=batch_size, local_epochs=epochs,
                             rounds=run.num_rounds, max_grad_norm=run.max_grad_norm,
                             who=f"node partition {partition_id}", **run.privacy_kwargs())
    node = context.node_config
    budget = float(node["privacy-budget"]) if "privacy-budget" in node else None
    ledger_path = str(node.get("privacy-ledger", "")) or os.path.expanduser(
        f"~/.fedcompare/privacy-ledger-partition-{partition_id}.json")
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
    _, _, _, device = _node_facts(context)
    return EnergyMeter(device=device)


def _resources(device: str) -> dict[str, float]:
    """Return where this process computed (on-gpu 1/0) and its peak resident memory in MB."""
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"on-gpu": float(device.startswith("cuda")), "peak-rss-mb": peak_kib / 1024.0}


def _floats(metrics: dict[str, float], *skip: str) -> dict[str, float]:
    """Return the metrics as floats with dashes in their names, leaving out `skip`."""
    return {k.replace("_", "-"): float(v) for k, v in metrics.items() if k not in skip}
