"""Build the comparison report from what the store holds (plain functions, no Prefect)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np

from flows.decision import CostModel, price, recommend, round_costs, time_to_target
from flows.deployment import add_serving, render_section
from flows.tables import (
    by_arm, federation_rows, node_names, node_rows, preprocessing_lines, round_rows, with_node_names,
)
from flows.tables import markdown_table as _table

REPORT_VERSION = 4  # 2: cost, time to target, recommendation; 3: privacy; 4: energy measured on the nodes
READABLE_VERSIONS = (2, 3, 4)  # 3 and 4 only add keys; a report before 4 keeps its estimated energy and says so

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


def build_report(
    *,
    run_key: str,
    config: dict[str, Any],
    federation: dict[str, Any],
    arms: dict[str, dict[str, Any]],
    target_accuracy: float,
    versions: dict[str, str],
) -> dict[str, Any]:
    """Assemble the self-describing report: config, federation, per-arm summaries, the recommendation.

    When the config asks for privacy, only private arms that stayed within their target ε
    can be recommended; each private arm also gets the accuracy gap to the same kind of
    model trained without DP in this run (``gap_to_non_private``), when one was.
    """
    privacy_on = (config.get("privacy") or {}).get("mode", "none") != "none"
    for s in arms.values():
        s.setdefault("kind", s["arm"].split("-")[0])
        plain = arms.get(s["kind"])
        s["gap_to_non_private"] = (
            plain["final_accuracy"] - s["final_accuracy"] if s.get("privacy") and plain and not plain.get("privacy")
            else None
        )
    privacy_ok = ({name: bool(s.get("privacy") and s["privacy"]["within_target"]) for name, s in arms.items()}
                  if privacy_on else None)
    return {
        "report_version": REPORT_VERSION,
        "run_key": run_key,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "versions": versions,
        "target_accuracy": target_accuracy,
        "federation": federation,
        "arms": arms,
        "recommendation": add_serving(recommend(arms, target_accuracy, privacy_ok=privacy_ok), arms),
    }


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Return one flat row per arm for a table artifact or a terminal table."""
    rows = []
    for arm, s in report["arms"].items():
        reference = s["reference"] or {}
        rows.append(
            {
                "arm": arm,
                "model": s["model"],
                "nodes": len(s["nodes"]),
                "rounds": s["rounds"],
                "final accuracy": round(s["final_accuracy"], 4),
                "best accuracy": round(s["best_accuracy"], 4),
                "macro-F1": round(s["final_macro_f1"], 4),
                "parameters": s["parameters"],
                "model MB": round(s["model_bytes"] / 1e6, 3),
                "MB sent / round": round(s["bytes_per_round"] / 1e6, 3),
                "wall s": round(s["wall_seconds"], 1),
                "client train s": round(s["client_train_seconds"], 1),
                # the arm's slowest node's training per round, and how long its replies waited on the nodes first
                "busy s": _round_or_none(s.get("busy_seconds"), 1),
                "waiting on nodes s": _round_or_none(s.get("waiting_seconds"), 1),
                "central reference": round(reference["accuracy"], 4) if reference else None,
                "gap to reference": round(s["gap_to_reference"], 4) if s["gap_to_reference"] is not None else None,
                "round reaching target": s["first_round_reaching_target"],
                "$ to target": _round_or_none(s["time_to_target"]["usd"], 6),
                "$ total": round(s["total_usd"], 6),
                "Wh total": round(s["total_kwh"] * 1000, 3),
                "peak node MB": round(s["peak_rss_mb"], 1),
                "DP ε spent": round(s["privacy"]["epsilon"], 3) if s.get("privacy") else None,
            }
        )
    return rows


def privacy_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Return one row per private arm: guarantee, noise, accuracy and what privacy cost it."""
    rows = []
    for arm, s in report["arms"].items():
        p = s.get("privacy")
        if not p:
            continue
        reference = s["reference"] or {}
        rows.append({
            "arm": arm, "model": s["model"], "mode": p["mode"], "target ε": p["target_epsilon"],
            "ε spent": round(p["epsilon"], 3), "δ": p["delta"], "accountant": p["accountant"],
            "noise multiplier": p["noise_multiplier"] if isinstance(p["noise_multiplier"], list)
            else round(p["noise_multiplier"], 4),
            "clipping norm": p["clipping_norm"], **_steps(report, s, p["target_epsilon"]),
            "final accuracy": round(s["final_accuracy"], 4),
            "accuracy lost to DP": _round_or_none(s.get("gap_to_non_private"), 4),
            "central reference": round(reference["accuracy"], 4) if reference else None,
            "reference is private": bool(reference.get("privacy")),
            "rounds refused": len(p["refused"]),
            "layers replaced for Opacus": "; ".join(p.get("model_fixes") or []) or
            ("none needed" if p["mode"] == "sample-level" else "n/a"),
        })
    return rows


def _steps(report: dict[str, Any], arm: dict[str, Any], epsilon: float) -> dict[str, Any]:
    """Return the optimizer and step size the private ``arm`` trained with at ``epsilon`` (None without config)."""
    from flows.config import ArmConfig

    kind = report.get("config", {}).get(arm.get("kind") or arm["arm"].split("-")[0])
    if not kind:
        return {"optimizer": None, "learning rate": None}
    settings = ArmConfig.model_validate(kind)  # the same rule the flow used to pick them
    optimizer = {"logreg": "sgd (scikit-learn)", "gnb": "none (closed form)"}.get(arm["model"])
    return {"optimizer": optimizer or settings.optimizer_at(epsilon),
            "learning rate": settings.learning_rate_at(float(epsilon))}


PRIVACY_EXPLAINED = (
    "**What the privacy numbers mean.** Differential privacy (DP) limits how much any single "
    "training example (*sample-level*: DP-SGD on each node, with Opacus) or any single node's whole "
    "dataset (*client-level*: noise added by the server to the average of the nodes' clipped updates) "
    "can change the model. ε measures that limit: a smaller ε means stronger privacy — at ε = 1 an "
    "attacker holding the model learns almost nothing about whether an example was used; ε = 8 is a "
    "common practical setting. δ is the small probability with which the guarantee may fail; it is "
    "kept below 1 divided by the number of examples (nodes for client-level). The privacy comes from "
    "random noise, so private models are less accurate; *accuracy lost to DP* is the difference to the "
    "same arm trained in this run without DP (an arm may train a more compact model, another optimizer or "
    "step under DP: the table names what each private run used), and the *central reference* of a private "
    "arm is its private model trained with DP-SGD at the same ε on the pooled data. ε is computed with an Opacus "
    "accountant from the inputs stored per node and round in `report.json` "
    "(`arms.<arm>.privacy`), so it can be recomputed independently. The guarantee covers the model "
    "updates; in private runs nodes do not report their training loss."
)


def _round_or_none(value: float | None, digits: int) -> float | None:
    """Round ``value`` unless it is None."""
    return None if value is None else round(value, digits)


def _energy_explained(report: dict[str, Any]) -> str:
    """Say in plain words how the report's energy and emissions were obtained, with the methods its nodes used."""
    cost = report["config"].get("cost") or CostModel().model_dump()
    factors = (f"times the PUE {cost['pue']}; emissions are that energy at {cost['kg_co2_per_kwh']} kg CO2/kWh "
               "(`CompareConfig.cost`; sources in `flows/decision.py`).")
    if report.get("report_version", REPORT_VERSION) < 4:
        return (f"Energy was estimated, not measured: {cost['cpu_watts']} W per busy CPU core and "
                f"{cost.get('gpu_watts', '?')} W per busy GPU, {factors}")
    methods = sorted({m for s in report["arms"].values() for m in s.get("energy_methods", [])})
    seen = f" This run's nodes measured their CPU by: {'; '.join(methods)}." if methods else ""
    text = (
        "Energy is measured on each node with codecarbon's offline tracker, for the node's process and its "
        "children and only while it trains or evaluates. The CPU part comes from the processor's RAPL energy "
        "counters where Linux lets the node read them; otherwise it is an estimate: the CPU's rated power (TDP, "
        "from codecarbon's table of CPU models, or 4 W per thread for a model missing from it) times the share "
        f"of the machine's CPU time the process used.{seen} RAM counts about 5 W per memory module its memory "
        "fills, at least 10 W, for as long as the block runs; a GPU node adds its GPU's own energy counter "
        "(NVIDIA NVML, the whole board). The server does not measure: its aggregation and central evaluation "
        f"are estimated at {cost['cpu_watts']} W per busy core (included in each round's Wh). Energy is the sum, {factors}"
    )
    unmeasured = {arm: s["energy_unmeasured"] for arm, s in report["arms"].items() if s.get("energy_unmeasured")}
    if unmeasured:
        listed = ", ".join(f"{n} of {arm}" for arm, n in unmeasured.items())
        text += (f" Node replies without an energy measurement ({listed}; rounds stored before fedcompare measured "
                 "energy) count as zero: re-run those arms for complete totals.")
    return text


def render_markdown(report: dict[str, Any], images: dict[str, str] | None = None) -> str:
    """Render the report as markdown for a Prefect artifact; ``images`` maps a caption to an image URL."""
    target = report["target_accuracy"]
    recommendation = report["recommendation"]
    cost = report["config"].get("cost") or CostModel().model_dump()
    names = node_names(report)
    parts = [
        "# federated-compare report",
        f"Run `{report['run_key']}` · dataset **{report['config']['data']['dataset']}** · "
        f"partitioning {report['config']['data']['partitioning']} · assignment {report['config']['assignment']} · "
        f"target accuracy {target}",
        "",
        "## Recommendation",
        f"**{recommendation['text']}**",
        "",
        *(f"- {change}" for change in recommendation["what_would_change"]),
        "",
        "## Summary",
        _table(by_arm(summary_rows(report))),
        "Accuracy and macro-F1 are measured on the central test set, which no node trains on. "
        "The *central reference* trains the same model on the pooled training data of the arm's nodes "
        "(a non-federated upper bound, possible only because this dataset is shared); the *gap* is "
        "reference minus final federated accuracy. *Client train s* sums the nodes' local training wall time.",
        "",
        "Cost applies the price table to what was measured: CPU process seconds of the nodes' training "
        "and evaluation on CPU nodes and of the server's aggregation and evaluation, at "
        f"${cost['cpu_hour_usd']}/CPU-hour; wall seconds on GPU nodes at ${cost['gpu_hour_usd']}/GPU-hour; "
        f"bytes of the serialized arrays sent and received at ${cost['gb_transfer_usd']}/GB.",
        "",
        _energy_explained(report),
        "",
    ]
    parts += preprocessing_lines(report)
    private = privacy_rows(report)
    if private:
        parts += ["## Privacy", PRIVACY_EXPLAINED, "", _table(by_arm(private)), ""]
        for arm, s in report["arms"].items():
            if s.get("privacy") and s["privacy"]["refused"]:
                parts += [f"Rounds that nodes of {arm} sat out because their privacy budget was spent:",
                          _table(with_node_names(s["privacy"]["refused"], names)), ""]
    parts += render_section(report)  # the accuracy-against-latency plot is among the images below
    for caption, url in (images or {}).items():
        parts += [f"![{caption}]({url})", ""]
    for arm, s in report["arms"].items():
        on = ", ".join(names.get(int(n), str(n)) for n in s["nodes"])
        parts += [f"## {arm}: {s['model']} on nodes {on}", _table(round_rows(s)),
                  f"Per node ({arm}), over all rounds:", _table(node_rows(s, names))]
        if s["dropped"]:
            parts += ["Replies the rounds went on without (a node that died, hung, was rejected or sat out):",
                      _table(with_node_names(s["dropped"], names))]
        if s.get("discarded_rounds"):
            parts += ["Stored rounds that failed verification when the arm resumed, and were trained again:",
                      _table(s["discarded_rounds"])]
    parts += ["## Nodes", _table(federation_rows(report))]
    return "\n".join(parts)
