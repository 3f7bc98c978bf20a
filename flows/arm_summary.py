"""Summarize one arm from its stored rounds: accuracy, traffic, time, resources, cost, energy and privacy spent.

Plain functions, no Prefect; ``flows.report`` assembles the arms' summaries into the report.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flows.decision import CostModel, price, round_costs, time_to_target

# How each node's codecarbon measured its CPU (reply metric energy-cpu-method), in words: the codes
# of clients/_energy.py CPU_METHODS (tests/test_energy.py checks that both name the same ones).
CPU_ENERGY_METHODS = {
    0: "not reported by codecarbon",
    1: "RAPL energy counters",
    2: "TDP × process CPU load",
    3: "half the TDP, whatever the load",
    4: "Intel Power Gadget",
    5: "Apple powermetrics",
    6: "Windows Energy Meter (RAPL)",
}


def model_size(arrays: dict[str, np.ndarray]) -> tuple[int, int]:
    """Return (number of parameters, bytes) of a model's named arrays."""
    return sum(int(a.size) for a in arrays.values()), sum(int(a.nbytes) for a in arrays.values())


def first_round_reaching(rounds: list[dict], target: float) -> int | None:
    """Return the first round whose central accuracy is at least `target`, or None."""
    return next((r["round"] for r in rounds if r["central"]["accuracy"] >= target), None)


def round_resources(round_metrics: dict) -> dict[str, float]:
    """Return the resources one round used, as the price table bills them, and the energy the nodes measured.

    ``cpu_seconds``: CPU process time of training and evaluation on CPU nodes;
    ``gpu_seconds``: wall time of training and evaluation on GPU nodes (the GPU is held
    throughout); ``server_seconds``: the server's aggregation and central evaluation;
    ``peak_rss_mb``: the largest ClientApp process of the round; ``node_kwh``: the kWh the
    nodes measured with codecarbon around training and evaluation (``train-kwh``,
    ``evaluate-kwh``); ``energy_unmeasured``: replies without a kWh (stored by a fedcompare
    that did not measure energy yet), whose energy node_kwh lacks.
    """
    cpu = gpu = kwh = 0.0
    peak = 0.0
    unmeasured = 0
    for node in round_metrics["nodes"]:
        for phase, reply in (("train", node["train"]), ("evaluate", node["evaluate"])):
            if not reply:
                continue
            if reply.get("on-gpu", 0.0):
                gpu += reply.get(f"{phase}-seconds", 0.0)
            else:
                cpu += reply.get(f"{phase}-cpu-seconds", 0.0)
            peak = max(peak, reply.get("peak-rss-mb", 0.0))
            if f"{phase}-kwh" in reply:
                kwh += reply[f"{phase}-kwh"]
            else:
                unmeasured += 1
    server = round_metrics.get("aggregate_seconds", 0.0) + round_metrics.get("central_evaluate_seconds", 0.0)
    return {"cpu_seconds": cpu, "gpu_seconds": gpu, "server_seconds": server, "peak_rss_mb": peak,
            "node_kwh": kwh, "energy_unmeasured": unmeasured}


def node_costs(rounds: list[dict], cost: CostModel) -> list[dict[str, Any]]:
    """Return one row per node: its measured resources and energy over all rounds and what they cost."""
    nodes: dict[int, dict[str, Any]] = {}
    methods: dict[int, set[str]] = {}
    for r in rounds:
        for n in r["nodes"]:
            row = nodes.setdefault(n["node_id"], {
                "node_id": n["node_id"], "rounds": 0, "on_gpu": False, "train_seconds": 0.0,
                "train_cpu_seconds": 0.0, "evaluate_seconds": 0.0, "evaluate_cpu_seconds": 0.0,
                "peak_rss_mb": 0.0, "bytes_down": 0, "bytes_up": 0, "train_kwh": 0.0, "evaluate_kwh": 0.0,
            })
            train, evaluate = n["train"], n["evaluate"]
            row["rounds"] += 1 if train else 0
            row["on_gpu"] = row["on_gpu"] or bool(train.get("on-gpu") or evaluate.get("on-gpu"))
            row["train_seconds"] += train.get("train-seconds", 0.0)
            row["train_cpu_seconds"] += train.get("train-cpu-seconds", 0.0)
            row["evaluate_seconds"] += evaluate.get("evaluate-seconds", 0.0)
            row["evaluate_cpu_seconds"] += evaluate.get("evaluate-cpu-seconds", 0.0)
            row["peak_rss_mb"] = max(row["peak_rss_mb"], train.get("peak-rss-mb", 0.0),
                                     evaluate.get("peak-rss-mb", 0.0))
            row["bytes_down"] += n.get("bytes", {}).get("down", 0)
            row["bytes_up"] += n.get("bytes", {}).get("up", 0)
            row["train_kwh"] += train.get("train-kwh", 0.0)
            row["evaluate_kwh"] += evaluate.get("evaluate-kwh", 0.0)
            methods.setdefault(n["node_id"], set()).update(
                _cpu_energy_method(reply["energy-cpu-method"]) for reply in (train, evaluate)
                if "energy-cpu-method" in reply)
    for node, row in nodes.items():
        busy = row["train_seconds"] + row["evaluate_seconds"]
        cpu = row["train_cpu_seconds"] + row["evaluate_cpu_seconds"]
        row["cpu_energy_method"] = "; ".join(sorted(methods[node])) or "not measured"
        row.update(price(cpu_seconds=0.0 if row["on_gpu"] else cpu, gpu_seconds=busy if row["on_gpu"] else 0.0,
                         bytes=row["bytes_down"] + row["bytes_up"], device_kwh=row["train_kwh"] + row["evaluate_kwh"],
                         cost=cost))
    return [nodes[node] for node in sorted(nodes)]


def _cpu_energy_method(code: float) -> str:
    """Return how a node's codecarbon measured its CPU, in words, from its reply code."""
    return CPU_ENERGY_METHODS.get(int(code), f"unknown method code {code:g}")


def privacy_summary(rounds: list[dict]) -> dict[str, Any] | None:
    """Return what an arm's rounds spent in privacy, with every accountant input (None: not private).

    Sample-level: per node, the (noise multiplier, sample rate, steps) of every round it
    trained and the ε its ledger reported; the arm's ε is the largest over its nodes.
    Client-level: the server's per-round history and ε. Nodes that refused a round
    because their budget was spent are listed in ``refused``.
    """
    private = [r["privacy"] for r in rounds if r.get("privacy")]
    if not private:
        return None
    last = private[-1]
    summary: dict[str, Any] = {k: last[k] for k in ("mode", "accountant", "delta", "target_epsilon")}
    refused = [{"round": r["round"], "node_id": f["node_id"], "reason": f["reason"]}
               for r in rounds for f in r.get("failures", []) if "privacy budget exhausted" in str(f["reason"])]
    if last["mode"] == "client-level":
        summary.update(
            epsilon=last["epsilon"], noise_multiplier=last["noise_multiplier"], clipping_norm=last["clipping_norm"],
            history=last["history"], nodes={},
        )
    else:
        nodes: dict[str, dict[str, Any]] = {}
        for p in private:
            for node, n in p["nodes"].items():
                entry = nodes.setdefault(node, {"history": [], "epsilon": 0.0, "node_epsilon": 0.0})
                entry["history"].append([n["noise_multiplier"], n["sample_rate"], n["steps"]])
                entry["epsilon"], entry["node_epsilon"] = n["epsilon"], n["node_epsilon"]
                entry["max_grad_norm"] = n["max_grad_norm"]
        sigmas = sorted({h[0] for n in nodes.values() for h in n["history"]})
        summary.update(
            epsilon=max((n["epsilon"] for n in nodes.values()), default=0.0),
            noise_multiplier=sigmas[0] if len(sigmas) == 1 else sigmas,
            clipping_norm=next((n["max_grad_norm"] for n in nodes.values()), None), nodes=nodes,
            model_fixes=last.get("model_fixes", []),
        )
    summary["refused"] = refused
    summary["within_target"] = summary["epsilon"] <= summary["target_epsilon"] + 0.01
    return summary


def summarize_arm(
    arm: str,
    rounds: list[dict],
    *,
    nodes: list[int],
    parameters: int,
    model_bytes: int,
    wall_seconds: float,
    reference: dict[str, float] | None,
    target_accuracy: float,
    cost: CostModel | None = None,
) -> dict[str, Any]:
    """Summarize one arm's rounds: accuracy, F1, size, traffic, time, cost and the gap to the reference.

    ``cost`` prices the measured resources (the default price table when None).
    """
    if not rounds:
        raise ValueError(f"arm {arm!r} has no complete round in the store; nothing to report")
    final = rounds[-1]
    best = max(rounds, key=lambda r: r["central"]["accuracy"])
    train_seconds = [n["train"].get("train-seconds", 0.0) for r in rounds for n in r["nodes"]]
    cpu_seconds = [n["train"].get("train-cpu-seconds", 0.0) for r in rounds for n in r["nodes"]]
    bytes_per_round = [r["bytes_down"] + r["bytes_up"] for r in rounds]
    summary = {
        "arm": arm,
        "model": final["model"],
        "nodes": nodes,
        "rounds": len(rounds),
        "final_accuracy": final["central"]["accuracy"],
        "final_macro_f1": final["central"]["macro_f1"],
        "final_loss": final["central"]["loss"],
        "best_accuracy": best["central"]["accuracy"],
        "best_round": best["round"],
        "federated_accuracy": final["federated"].get("accuracy"),
        "parameters": parameters,
        "model_bytes": model_bytes,
        "bytes_per_round": float(np.mean(bytes_per_round)),
        "bytes_total": int(sum(bytes_per_round)),
        "wall_seconds": wall_seconds,
        "client_train_seconds": float(sum(train_seconds)),
        "client_train_cpu_seconds": float(sum(cpu_seconds)),
        "round_seconds": [r["round_seconds"] for r in rounds],
        "first_round_reaching_target": first_round_reaching(rounds, target_accuracy),
        "reference": reference,
        "gap_to_reference": (reference["accuracy"] - final["central"]["accuracy"]) if reference else None,
        # replies a round went on without (dead, hung or rejected nodes, spent privacy budgets)
        "dropped": [{"round": r["round"], **f} for r in rounds for f in r.get("failures", [])],
        # stored rounds that failed verification on a resume and were trained again
        "discarded_rounds": [d for r in rounds for d in r.get("discarded_rounds", [])],
        "privacy": privacy_summary(rounds),
        "per_round": [
            {
                "round": r["round"],
                "accuracy": r["central"]["accuracy"],
                "macro_f1": r["central"]["macro_f1"],
                "loss": r["central"]["loss"],
                "federated_accuracy": r["federated"].get("accuracy"),
                "nodes": len(r["nodes"]),
                "bytes": r["bytes_down"] + r["bytes_up"],
                "seconds": r["round_seconds"],
                "slowest_client_train_seconds": max(
                    (n["train"].get("train-seconds", 0.0) for n in r["nodes"]), default=0.0
                ),
                # the longest a node's training reply waited before its work began: Flower's delivery and
                # the node's other messages first (with all-nodes, mostly the other arm's training)
                "slowest_node_wait_seconds": max(
                    (n["train"].get("node-wait-seconds", 0.0) for n in r["nodes"]), default=0.0
                ),
                "resumed_after_round": r.get("resumed_after_round", 0),
                **round_resources(r),
            }
            for r in rounds
        ],
    }
    costed = round_costs(summary["per_round"], cost or CostModel())
    summary["per_round"] = costed
    summary["time_to_target"] = time_to_target(costed, target_accuracy)
    summary["total_usd"] = costed[-1]["cum_usd"]
    summary["total_kwh"] = costed[-1]["cum_kwh"]
    summary["total_kg_co2"] = costed[-1]["cum_kg_co2"]
    summary["node_kwh"] = sum(r["node_kwh"] for r in costed)
    summary["server_kwh_estimate"] = sum(r["server_kwh_estimate"] for r in costed)
    summary["energy_unmeasured"] = sum(r["energy_unmeasured"] for r in costed)
    summary["peak_rss_mb"] = max(r["peak_rss_mb"] for r in costed)
    summary["per_node"] = node_costs(rounds, cost or CostModel())
    # the arm's own time on the critical path (its slowest node's training per round) and the time its
    # training replies waited on the nodes, so that an arm's wall time can be read apart from its queueing
    summary["busy_seconds"] = sum(r["slowest_client_train_seconds"] for r in costed)
    summary["waiting_seconds"] = sum(r["slowest_node_wait_seconds"] for r in costed)
    summary["energy_methods"] = sorted({_cpu_energy_method(reply["energy-cpu-method"]) for r in rounds
                                        for n in r["nodes"] for reply in (n["train"], n["evaluate"])
                                        if "energy-cpu-method" in reply})
    return summary
