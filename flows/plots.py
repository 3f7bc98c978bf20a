"""The report's plots as PNG bytes (matplotlib, no display; no Prefect or Flower import).

Each function takes the report's plain values and returns the bytes of one PNG, so the
flow can store them next to ``report.json`` and embed them in the markdown artifact.
"""

from __future__ import annotations

import base64
import io
from typing import Any

_DPI = 110
_SIZE = (6.4, 3.8)  # inches: readable in the Prefect UI's artifact pane and in an HTML page
_COLORS = {"large": "#1f77b4", "small": "#ff7f0e"}


def _figure():
    """Return a new (figure, axes) on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    return plt.subplots(figsize=_SIZE, dpi=_DPI)


def _png(fig) -> bytes:
    """Render ``fig`` to PNG bytes and release it."""
    from matplotlib import pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", metadata={"Software": None})  # no version stamp: same plot, same bytes
    plt.close(fig)
    return buffer.getvalue()


def _color(arm: str, index: int) -> str:
    """Return the arm's colour (a fixed one for large/small, a cycle colour otherwise)."""
    return _COLORS.get(arm, f"C{index + 2}")


def accuracy_per_round(arms: dict[str, dict[str, Any]], target: float) -> bytes:
    """Plot central-test accuracy per round for every arm, its centralized reference and the target."""
    fig, ax = _figure()
    for index, (arm, summary) in enumerate(arms.items()):
        color = _color(arm, index)
        rounds = [r["round"] for r in summary["per_round"]]
        accuracy = [r["accuracy"] for r in summary["per_round"]]
        ax.plot(rounds, accuracy, marker="o", color=color, label=f"{arm} ({summary['model']}), federated")
        reference = summary.get("reference")
        if reference:
            ax.axhline(reference["accuracy"], color=color, linestyle="--", linewidth=1,
                       label=f"{arm} centralized reference")
    ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:g}")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (central test set)")
    ax.set_title("Accuracy per round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    return _png(fig)


def accuracy_vs_cost(arms: dict[str, list[dict[str, Any]]], target: float, *, currency: str = "$") -> bytes:
    """Plot accuracy against cumulative cost (``cum_usd`` of each round row) for every arm."""
    fig, ax = _figure()
    for index, (arm, rows) in enumerate(arms.items()):
        ax.plot([r["cum_usd"] for r in rows], [r["accuracy"] for r in rows], marker="o",
                color=_color(arm, index), label=arm)
    ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:g}")
    ax.set_xlabel(f"cumulative cost ({currency}, price table applied to measured resources)")
    ax.set_ylabel("accuracy (central test set)")
    ax.set_title("Accuracy against cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    return _png(fig)


def accuracy_vs_epsilon(arms: dict[str, dict[str, Any]], target: float) -> bytes:
    """Plot final accuracy against ε spent for each kind of model, with its non-private accuracy and references.

    Private arms of one kind (``kind``: large or small) form one line over their ε; the
    same kind trained without DP, when it ran, is a dashed line; each private arm's DP
    central reference (same ε, pooled data) is a hollow marker.
    """
    fig, ax = _figure()
    kinds = sorted({s.get("kind", arm) for arm, s in arms.items()})
    for index, kind in enumerate(kinds):
        color = _color(kind, index)
        private = sorted((s for s in arms.values() if s.get("kind") == kind and s.get("privacy")),
                         key=lambda s: s["privacy"]["epsilon"])
        if private:
            model = private[0]["model"]
            ax.plot([s["privacy"]["epsilon"] for s in private], [s["final_accuracy"] for s in private],
                    marker="o", color=color, label=f"{kind} ({model}), federated with DP")
            refs = [(s["privacy"]["epsilon"], s["reference"]["accuracy"]) for s in private
                    if (s.get("reference") or {}).get("privacy")]
            if refs:
                ax.plot(*zip(*refs), marker="o", markerfacecolor="none", linestyle="none", color=color,
                        label=f"{kind} central DP-SGD reference")
        plain = arms.get(kind)
        if plain and not plain.get("privacy"):
            ax.axhline(plain["final_accuracy"], color=color, linestyle="--", linewidth=1,
                       label=f"{kind} without DP")
    ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:g}")
    ax.set_xscale("log")
    ax.set_xlabel("ε spent (log scale; smaller = more private)")
    ax.set_ylabel("final accuracy (central test set)")
    ax.set_title("Accuracy against privacy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    return _png(fig)


def accuracy_vs_latency(arms: dict[str, dict[str, Any]]) -> bytes:
    """Plot each deployed variant's accuracy against its batch-1 p50 latency; bubble area grows with its bytes."""
    fig, ax = _figure()
    largest = max(v["bytes"] for s in arms.values() if s.get("deployment") for v in s["deployment"]["variants"].values())
    for index, (arm, summary) in enumerate(arms.items()):
        deployment = summary.get("deployment")
        if not deployment:
            continue
        color = _color(summary.get("kind", arm), index)
        for name, v in deployment["variants"].items():
            ax.scatter(v["latency_ms_p50"], v["accuracy"], s=40 + 900 * v["bytes"] / largest, color=color, alpha=0.45,
                       edgecolors=color)
            ax.annotate(f"{arm} {name}", (v["latency_ms_p50"], v["accuracy"]), fontsize="x-small",
                        textcoords="offset points", xytext=(6, 4))
    ax.set_xscale("log")
    ax.set_xlabel("p50 latency at batch 1 (ms, log scale)")
    ax.set_ylabel("accuracy (central test set)")
    ax.set_title("Accuracy against latency (bubble area: model bytes)")
    ax.grid(alpha=0.3)
    return _png(fig)


def report_plots(report: dict[str, Any]) -> list[tuple[str, str, bytes]]:
    """Return the report's plots as (file stem, caption, PNG bytes)."""
    target = report["target_accuracy"]
    plots = [
        ("accuracy", "Accuracy per round", accuracy_per_round(report["arms"], target)),
        ("cost", "Accuracy against cost",
         accuracy_vs_cost({arm: s["per_round"] for arm, s in report["arms"].items()}, target)),
    ]
    if any(s.get("privacy") for s in report["arms"].values()):
        plots.append(("privacy", "Accuracy against privacy (ε)", accuracy_vs_epsilon(report["arms"], target)))
    if any(s.get("deployment") for s in report["arms"].values()):
        plots.append(("deployment", "Accuracy against p50 latency (bubble size: bytes)",
                      accuracy_vs_latency(report["arms"])))
    return plots


def data_uri(png: bytes) -> str:
    """Return ``png`` as a data: URI for markdown or HTML ``<img>`` tags."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
