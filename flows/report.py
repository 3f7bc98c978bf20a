"""Build the comparison report from what the store holds (plain functions, no Prefect)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np

REPORT_VERSION = 1


def model_size(arrays: dict[str, np.ndarray]) -> tuple[int, int]:
    """Return (number of parameters, bytes) of a model's named arrays."""
    return sum(int(a.size) for a in arrays.values()), sum(int(a.nbytes) for a in arrays.values())


def first_round_reaching(rounds: list[dict], target: float) -> int | None:
    """Return the first round whose central accuracy is at least `target`, or None."""
    return next((r["round"] for r in rounds if r["central"]["accuracy"] >= target), None)


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
) -> dict[str, Any]:
    """Summarize one arm's rounds: accuracy, F1, size, traffic, time and the gap to the reference."""
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
        "dropped": [f for r in rounds for f in r.get("failures", [])],
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
            }
            for r in rounds
        ],
    }
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
    """Assemble the self-describing report: config, federation, per-arm summaries."""
    return {
        "report_version": REPORT_VERSION,
        "run_key": run_key,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "versions": versions,
        "target_accuracy": target_accuracy,
        "federation": federation,
        "arms": arms,
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
                "central reference": round(reference["accuracy"], 4) if reference else None,
                "gap to reference": round(s["gap_to_reference"], 4) if s["gap_to_reference"] is not None else None,
                "round reaching target": s["first_round_reaching_target"],
            }
        )
    return rows


def _cell(value: Any) -> str:
    """Format one markdown table cell."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: list[dict[str, Any]]) -> str:
    """Render rows as a markdown table."""
    if not rows:
        return "_none_\n"
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(row[h]) for h in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_markdown(report: dict[str, Any]) -> str:
    """Render the report as markdown for a Prefect artifact."""
    target = report["target_accuracy"]
    parts = [
        "# federated-compare report",
        f"Run `{report['run_key']}` · dataset **{report['config']['data']['dataset']}** · "
        f"partitioning {report['config']['data']['partitioning']} · assignment {report['config']['assignment']} · "
        f"target accuracy {target}",
        "",
        "## Summary",
        _table(summary_rows(report)),
        "Accuracy and macro-F1 are measured on the central test set, which no node trains on. "
        "The *central reference* trains the same model on the pooled training data of the arm's nodes "
        "(a non-federated upper bound, possible only because this dataset is shared); the *gap* is "
        "reference minus final federated accuracy. *Client train s* sums the nodes' local training wall time.",
        "",
    ]
    for arm, s in report["arms"].items():
        parts += [f"## {arm}: {s['model']} on nodes {', '.join(map(str, s['nodes']))}", _table(s["per_round"])]
        if s["dropped"]:
            parts += ["Dropped replies:", _table(s["dropped"])]
    nodes = [
        {k: n.get(k) for k in ("node_id", "tier", "device", "partition-id", "num-train", "num-test", "classes-seen")}
        for n in report["federation"]["nodes"]
    ]
    parts += ["## Nodes", _table(nodes)]
    return "\n".join(parts)
