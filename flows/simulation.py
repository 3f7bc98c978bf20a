"""The flow's side of Flower's Simulation Engine: the virtual nodes, each arm's tier, the run's federation config.

A simulated comparison has no SuperNode to ask what it is: virtual node ``i`` holds partition
``i`` of the run's dataset, so the flow reads the same partitions the virtual nodes will
(``clients.data``, no Flower) and describes them as the node query describes real nodes. The
ServerApp picks the virtual nodes of an arm's tier itself (Flower names them anew in every run).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from prefect import get_run_logger, task

from clients.data import node_data
from clients.preprocess import local_stats, merge_stats
from flows.config import CompareConfig
from flows.preparation import data_kwargs, preprocessing_mode, raw_dataset


@task(name="virtual-nodes")
def virtual_federation(config: CompareConfig) -> dict[str, Any]:
    """Describe the simulation's virtual nodes as the node query describes real ones, with a summary for the report.

    With federated preprocessing the statistics are the sum of every partition's training
    split's (``clients.preprocess.local_stats``): what the virtual nodes would send.
    """
    sim = config.simulation
    dataset = raw_dataset(config)
    federated = preprocessing_mode(config) == "federated" and dataset.kind == "tabular"
    nodes, stats = [], []
    for partition in range(sim.num_nodes):
        try:
            train, test = node_data(dataset, partition_id=partition, num_partitions=sim.num_nodes,
                                    **data_kwargs(config))
        except ValueError as exc:
            raise ValueError(f"simulation.num_nodes: {sim.num_nodes} virtual nodes cannot each hold a partition of "
                             f"{config.data.dataset!r} ({exc})") from None
        nodes.append({"node_id": partition, "partition-id": partition, "num-partitions": sim.num_nodes,
                      "tier": sim.tier_of(partition), "device": "cuda" if sim.client_gpus else "cpu",
                      "data-source": "partition", "data-id": f"partition-{partition}-of-{sim.num_nodes}",
                      "num-train": len(train.y), "num-test": len(test.y),
                      "classes-seen": int(np.unique(train.y).size)})
        if federated:
            stats.append(local_stats(train))
    answer: dict[str, Any] = {"engine": "simulation", "nodes": nodes, "failures": [], "virtual": summary(nodes, config)}
    if federated:
        answer["preprocessing_stats"] = merge_stats(stats, names=[f"partition {i}" for i in range(len(stats))])
    virtual = answer["virtual"]
    get_run_logger().info(
        "simulation: %d virtual nodes (%d of tier gpu), %g-%g-%g train examples per node (min-median-max), "
        "%s of them train each round", virtual["nodes"], virtual["gpu_nodes"], *virtual["train_examples"],
        f"{sim.fraction_train:g} (at least {sim.min_train_nodes})")
    return answer


def _spread(values: list[float]) -> list[float]:
    """Return [min, median, max] of ``values``."""
    return [float(np.min(values)), float(np.median(values)), float(np.max(values))]


def summary(nodes: list[dict[str, Any]], config: CompareConfig) -> dict[str, Any]:
    """Return the report's view of the virtual nodes: counts and distributions, never one row per node."""
    sim = config.simulation
    return {
        "nodes": len(nodes), "gpu_nodes": sim.gpu_nodes,
        "fraction_train": sim.fraction_train, "min_train_nodes": sim.min_train_nodes,
        "fraction_evaluate": sim.fraction_evaluate, "min_evaluate_nodes": sim.min_evaluate_nodes,
        "client_cpus": sim.client_cpus, "client_gpus": sim.client_gpus, "ray_address": sim.ray_address or "local",
        # [min, median, max] over the virtual nodes
        "train_examples": _spread([n["num-train"] for n in nodes]),
        "test_examples": _spread([n["num-test"] for n in nodes]),
        "classes": _spread([n["classes-seen"] for n in nodes]),
    }


def arm_tier(nodes: list[dict[str, Any]], members: list[int]) -> str:
    """Return the tier of the virtual nodes an arm was assigned: "" when it has every virtual node."""
    if len(members) == len(nodes):
        return ""
    tiers = {nodes[i]["tier"] for i in members}  # virtual node ids are their partitions: 0 .. N-1
    if len(tiers) != 1:
        raise ValueError(f"a simulated arm trains on one tier or on every virtual node, got tiers {sorted(tiers)}")
    return tiers.pop()


def federation_config(config: CompareConfig) -> dict[str, int | float]:
    """Return the federation config of a simulated run (Flower's SimulationConfig fields)."""
    sim = config.simulation
    return {"num_supernodes": sim.num_nodes, "client_resources_num_cpus": sim.client_cpus,
            "client_resources_num_gpus": sim.client_gpus}


def virtual_table(virtual: dict[str, Any], placed, nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the flow's node artifact for virtual nodes: one row per tier (counts and spreads), not one per node."""
    rows = []
    for tier in ("gpu", "cpu"):
        members = [n for n in nodes if n["tier"] == tier]
        if not members:
            continue
        ids = {n["node_id"] for n in members}
        arms = [arm for arm, chosen in placed.nodes.items() if ids & set(chosen)]
        train = _spread([n["num-train"] for n in members])
        rows.append({"tier": tier, "virtual nodes": len(members), "arms": ", ".join(arms) or "none",
                     "train examples (min / median / max)": " / ".join(f"{v:g}" for v in train),
                     "classes (median)": _spread([n["classes-seen"] for n in members])[1],
                     "sampled per round": f"{virtual['fraction_train']:g} (at least {virtual['min_train_nodes']})"})
    return rows
