"""Build the comparison report from what the store holds, and render it as markdown (plain functions, no Prefect).

Each arm's summary comes from ``flows.arm_summary``; its names are re-exported here, the
report's public home.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from flows.arm_summary import (
    CPU_ENERGY_METHODS, first_round_reaching, model_size, node_costs, privacy_summary, round_resources, summarize_arm,
)
from flows.decision import CostModel, recommend
from flows.deployment import add_serving, render_section
from flows.tables import (
    arm_nodes, by_arm, node_names, nodes_section, preprocessing_lines, round_rows, with_node_names,
)
from flows.tables import markdown_table as _table

__all__ = [
    "CPU_ENERGY_METHODS", "PRIVACY_EXPLAINED", "READABLE_VERSIONS", "REPORT_VERSION", "build_report",
    "first_round_reaching", "model_size", "node_costs", "privacy_rows", "privacy_summary", "render_markdown",
    "round_resources", "summarize_arm", "summary_rows",
]

REPORT_VERSION = 4  # 2: cost, time to target, recommendation; 3: privacy; 4: energy measured on the nodes
READABLE_VERSIONS = (2, 3, 4)  # 3 and 4 only add keys; a report before 4 keeps its estimated energy and says so


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
        plain = arms.get(s.get("base") or s["kind"])  # the same arm without DP
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

    config = report.get("config", {})
    base = arm.get("base") or arm.get("kind") or arm["arm"].split("-")[0]
    section = config.get(base) if base in ("large", "small") else (config.get("extra_arms") or {}).get(base)
    if not section:
        return {"optimizer": None, "learning rate": None}
    settings = ArmConfig.model_validate({k: v for k, v in section.items() if k != "kind"})  # the flow's own rule
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
        where, caption, rows = arm_nodes(report, arm, s, names)  # thousands of virtual nodes: spreads, not a row each
        parts += [f"## {arm}: {s['model']} on {where}", _table(round_rows(s)), caption, _table(rows)]
        if s["dropped"]:
            parts += ["Replies the rounds went on without (a node that died, hung, was rejected or sat out):",
                      _table(with_node_names(s["dropped"], names))]
        if s.get("discarded_rounds"):
            parts += ["Stored rounds that failed verification when the arm resumed, and were trained again:",
                      _table(s["discarded_rounds"])]
    heading, rows = nodes_section(report)
    parts += [f"## {heading}", _table(rows)]
    return "\n".join(parts)
