"""The report's tables as a reader sees them: units (s, MB, $, Wh, g), sensible rounding, nodes by name.

Plain functions over the report dict (no Prefect), shared by the markdown artifact and the HTML
export. Numbers never show in exponent notation, and wide tables are turned so that each arm is
a column, which keeps them within 1,200 px.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

_SIGNIFICANT = 3  # the timings, bytes and energies are measured to about 1%; accuracies on a few hundred examples


def format_number(value: float) -> str:
    """Format a number for a person: no exponent, thousands separated, 3 significant digits below 100."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude >= _SIGNIFICANT - 1:
        return f"{value:,.0f}"
    text = f"{value:.{_SIGNIFICANT - 1 - magnitude}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def format_cell(value: Any) -> str:
    """Format one table cell: an em dash for None, numbers as ``format_number``, lists joined by commas."""
    if value is None:
        return "—"
    if isinstance(value, (int, float)):
        return format_number(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(format_cell(v) for v in value)
    return str(value)


def node_names(report: dict[str, Any]) -> dict[int, str]:
    """Return a name a person recognises for every node id: tier and partition (gpu-0), or tier and its data file."""
    names = {}
    for node in report.get("federation", {}).get("nodes", []):
        own = node.get("data-source") == "node-file"
        names[int(node["node_id"])] = (f"{node['tier']} {node.get('data-id', '')}" if own
                                       else f"{node['tier']}-{node['partition-id']}")
    return names


def node_name(names: dict[int, str], node_id: Any) -> str:
    """Return the name of ``node_id``, or the id itself for a node the federation did not list."""
    try:
        return names.get(int(node_id), str(node_id))
    except (TypeError, ValueError):
        return str(node_id)


def round_rows(arm: dict[str, Any]) -> list[dict[str, Any]]:
    """Return one row per round of an arm, in the units a reader expects."""
    return [{
        "round": r["round"],
        "accuracy": r["accuracy"],
        "macro-F1": r["macro_f1"],
        "MB sent": r["bytes"] / 1e6,
        "wall s": r["seconds"],
        "node CPU s": r.get("cpu_seconds"),
        "GPU s": r.get("gpu_seconds"),
        "server s": r.get("server_seconds"),
        "$": r.get("usd"),
        "Wh": None if r.get("kwh") is None else r["kwh"] * 1000,
        "g CO2": None if r.get("kg_co2") is None else r["kg_co2"] * 1000,
    } for r in arm["per_round"]]


def node_rows(arm: dict[str, Any], names: dict[int, str]) -> list[dict[str, Any]]:
    """Return one row per node of an arm, over all its rounds, named and in units."""
    return [{
        "node": node_name(names, n["node_id"]),
        "device": "GPU" if n["on_gpu"] else "CPU",
        "rounds": n["rounds"],
        "train s": n["train_seconds"],
        "CPU s": n["train_cpu_seconds"] + n["evaluate_cpu_seconds"],
        "peak MB": n["peak_rss_mb"],
        "MB sent": (n["bytes_down"] + n["bytes_up"]) / 1e6,
        "Wh": None if n.get("kwh") is None else n["kwh"] * 1000,
        "$": n.get("usd"),
        "CPU energy": n.get("cpu_energy_method"),
    } for n in arm["per_node"]]


def spread_rows(arm: dict[str, Any]) -> list[dict[str, Any]]:
    """Return an arm's per-node measures as spreads over its nodes (min, median, 90th percentile, max): many nodes."""
    measures = {
        "rounds trained": [n["rounds"] for n in arm["per_node"]],
        "train s": [n["train_seconds"] for n in arm["per_node"]],
        "CPU s": [n["train_cpu_seconds"] + n["evaluate_cpu_seconds"] for n in arm["per_node"]],
        "peak MB": [n["peak_rss_mb"] for n in arm["per_node"]],
        "MB sent": [(n["bytes_down"] + n["bytes_up"]) / 1e6 for n in arm["per_node"]],
    }
    rows = []
    for name, values in measures.items():
        if values:
            low, median, p90, high = np.percentile(values, [0, 50, 90, 100])
            rows.append({"measure": name, "min": low, "median": median, "p90": p90, "max": high})
    return rows


def virtual_rows(virtual: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the simulation's virtual nodes as a few rows: how many, their sampling and their data's spread."""
    def spread(values: list[float]) -> str:
        return " / ".join(format_number(v) for v in values)

    return [
        {"": "virtual nodes (of tier gpu)", "value": f"{virtual['nodes']} ({virtual['gpu_nodes']})"},
        {"": "trained per round", "value": f"{virtual['fraction_train']:g}, at least {virtual['min_train_nodes']}"},
        {"": "evaluated per round", "value": f"{virtual['fraction_evaluate']:g}, at least "
                                              f"{virtual['min_evaluate_nodes']}"},
        {"": "train examples per node (min / median / max)", "value": spread(virtual["train_examples"])},
        {"": "test examples per node (min / median / max)", "value": spread(virtual["test_examples"])},
        {"": "classes per node (min / median / max)", "value": spread(virtual["classes"])},
        {"": "Ray", "value": f"{virtual['ray_address']}, {virtual['client_cpus']} CPU and {virtual['client_gpus']:g} "
                             "GPU per virtual node in flight"},
    ]


def arm_nodes(report: dict[str, Any], name: str, arm: dict[str, Any],
              names: dict[int, str]) -> tuple[str, str, list[dict]]:
    """Return where an arm trained (for its heading), the caption of its node table, and that table's rows.

    Real nodes get a row each; a simulation's virtual nodes get spreads (``spread_rows``).
    """
    if report.get("federation", {}).get("virtual"):
        return (f"{len(arm['nodes'])} virtual nodes",
                f"Over the virtual nodes that trained {name} ({len(arm['per_node'])}), all rounds:", spread_rows(arm))
    on = ", ".join(names.get(int(n), str(n)) for n in arm["nodes"])
    return f"nodes {on}", f"Per node ({name}), over all rounds:", node_rows(arm, names)


def nodes_section(report: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """Return the heading and rows of the report's node table: a row per node, or the virtual nodes' summary."""
    virtual = report.get("federation", {}).get("virtual")
    if virtual:
        return "Virtual nodes (Flower's Simulation Engine)", virtual_rows(virtual)
    return "Nodes", federation_rows(report)


def federation_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Return one row per node that answered: its name, tier, device, data and Flower node id."""
    names = node_names(report)
    return [{
        "node": node_name(names, n["node_id"]), "tier": n.get("tier"), "device": n.get("device"),
        "train examples": n.get("num-train"), "test examples": n.get("num-test"), "classes": n.get("classes-seen"),
        "Flower node id": str(n["node_id"]),
    } for n in report.get("federation", {}).get("nodes", [])]


def with_node_names(rows: list[dict[str, Any]], names: dict[int, str]) -> list[dict[str, Any]]:
    """Return ``rows`` with their ``node_id`` column replaced by a ``node`` name."""
    return [{("node" if k == "node_id" else k): (node_name(names, v) if k == "node_id" else v)
             for k, v in row.items()} for row in rows]


def by_arm(rows: list[dict[str, Any]], key: str = "arm") -> list[dict[str, Any]]:
    """Turn one-row-per-arm into one row per measure with a column per arm (narrow enough for a screen)."""
    if not rows:
        return []
    return [{"": measure, **{str(row[key]): row[measure] for row in rows}} for measure in rows[0] if measure != key]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Render rows as a markdown table, each cell in the units and precision of ``format_cell``."""
    if not rows:
        return "_none_\n"
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(format_cell(row[h]) for h in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


_MAX_SPEC_ROWS = 40  # columns listed in the report's preprocessing table; the rest are counted


def preprocessing_lines(report: dict[str, Any]) -> list[str]:
    """Return the report's Preprocessing section: where the spec came from and what it does per column."""
    from clients.preprocess import describe

    spec = (report.get("federation") or {}).get("preprocessing")
    if not spec:
        return []
    source = ("built from the statistics of the nodes' training splits (counts, sums, sums of squares, ranges and "
              f"category counts of {spec['rows']} rows on {spec['nodes']} nodes; no row left a node)"
              if spec["source"] == "federated" else "fixed in the config (data.preprocessing)")
    rows = describe(spec)
    more = len(rows) - _MAX_SPEC_ROWS
    return ["## Preprocessing", f"One spec for every node, the server's central test set, the central references "
            f"and the exported models: {source}. It is stored in every checkpoint's config and in "
            "report.json (federation.preprocessing).", "", markdown_table(rows[:_MAX_SPEC_ROWS]),
            *([f"... and {more} more columns (report.json lists them all)."] if more > 0 else []), ""]
