"""Find a stored report and export it: a terminal table, JSON, CSV, a self-contained HTML page."""

from __future__ import annotations

import csv
import html
import io
import json
from typing import Any

from flows.deployment import deployment_explained, deployment_rows, deployment_tables, total_rows
from flows.plots import data_uri, report_plots
from flows.report import PRIVACY_EXPLAINED, READABLE_VERSIONS, privacy_rows, summary_rows
from flows.tables import arm_nodes, by_arm, format_cell, node_names, nodes_section, round_rows
from infra.checkpoints import report_key
from infra.store import ObjectNotFound, Store

_CSV_COLUMNS = ("arm", "model", "round", "accuracy", "macro_f1", "loss", "nodes", "bytes", "seconds",
                "cpu_seconds", "gpu_seconds", "server_seconds", "peak_rss_mb", "usd", "kwh", "kg_co2",
                "cum_seconds", "cum_bytes", "cum_usd", "cum_kwh", "cum_kg_co2")


def find_report(store: Store, ref: str) -> dict[str, Any]:
    """Return the report of run key (flow-run id) ``ref``, or the newest one for ``ref == "latest"``.

    Raises:
        LookupError: no such report; the message says where it looked and what to do.
    """
    if ref != "latest":
        try:
            return _readable(store.get_json(report_key(ref)), store)
        except (ObjectNotFound, ValueError):
            raise LookupError(
                f"no report for flow run {ref!r} in {store.uri}: pass a flow-run id of a completed "
                "federated-compare run (see the Prefect UI) or `latest`"
            ) from None
    keys = [k for k in store.list_keys("runs/") if k.endswith("/report.json") and k.count("/") == 2]
    reports = [store.get_json(key) for key in keys]
    if not reports:
        raise LookupError(f"no report in {store.uri} yet: run `fedcompare demo` (or the deployment) first")
    return _readable(max(reports, key=lambda r: r["created_at"]), store)


def _readable(report: dict[str, Any], store: Store) -> dict[str, Any]:
    """Return ``report`` if this version of fedcompare can render it; raise LookupError otherwise."""
    version = report.get("report_version")
    if version not in READABLE_VERSIONS:
        raise LookupError(
            f"report {report.get('run_key')!r} in {store.uri} has format version {version}, this fedcompare "
            f"reads versions {', '.join(map(str, READABLE_VERSIONS))}: re-run the comparison, or read its "
            "report.json directly"
        )
    return report


def rows_for_csv(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Return one row per arm and round with the measured and costed values."""
    return [
        {"arm": arm, "model": summary["model"], **{k: r.get(k) for k in _CSV_COLUMNS[2:]}}
        for arm, summary in report["arms"].items()
        for r in summary["per_round"]
    ]


def to_csv(report: dict[str, Any]) -> str:
    """Return the per-arm, per-round table as CSV text."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows_for_csv(report))
    return buffer.getvalue()


def to_json(report: dict[str, Any]) -> str:
    """Return the full report as indented JSON."""
    return json.dumps(report, indent=2, sort_keys=True) + "\n"


def _html_table(rows: list[dict[str, Any]]) -> str:
    """Render rows (same keys) as an HTML table with escaped cells."""
    if not rows:
        return "<p><em>none</em></p>"
    header = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_cell(v))}</td>" for v in row.values()) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


def to_html(report: dict[str, Any]) -> str:
    """Return a self-contained HTML page (inline CSS, plots as data URIs) a manager can read."""
    recommendation = report["recommendation"]
    config = report["config"]
    changes = "".join(f"<li>{html.escape(c)}</li>" for c in recommendation["what_would_change"])
    plots = "".join(
        f'<figure><img alt="{html.escape(caption)}" src="{data_uri(png)}"><figcaption>{html.escape(caption)}'
        "</figcaption></figure>"
        for _, caption, png in report_plots(report)
    )
    names = node_names(report)
    arms = ""
    for arm, s in report["arms"].items():
        where, caption, rows = arm_nodes(report, arm, s, names)
        arms += (f"<h2>{html.escape(arm)}: {html.escape(s['model'])} on {html.escape(where)}</h2>"
                 + _html_table(round_rows(s)) + f"<p>{html.escape(caption)}</p>" + _html_table(rows))
    nodes_heading, node_table = nodes_section(report)
    private = privacy_rows(report)
    privacy = (
        "<h2>Privacy</h2><p>" + html.escape(PRIVACY_EXPLAINED.replace("**", "").replace("`", "")) + "</p>"
        + _html_table(by_arm(private)) if private else ""
    )
    title = f"federated-compare report {report['run_key']}"
    deployment = _html_deployment(report)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; max-width: 100%; }}
th, td {{ border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: right; overflow-wrap: anywhere; }}
th:first-child, td:first-child {{ text-align: left; }}
img {{ max-width: 100%; height: auto; }}
th {{ background: #f3f3f3; }}
.recommendation {{ font-size: 1.15rem; padding: 0.75rem 1rem; background: #eef6ee; border-left: 4px solid #3a3; }}
figure {{ display: inline-block; margin: 0 1rem 1rem 0; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Dataset <b>{html.escape(str(config['data']['dataset']))}</b>, partitioning
{html.escape(str(config['data']['partitioning']))}, assignment {html.escape(str(config['assignment']))},
target accuracy {report['target_accuracy']}; created {html.escape(report['created_at'])}.</p>
<h2>Recommendation</h2>
<p class="recommendation">{html.escape(recommendation['text'])}</p>
<ul>{changes}</ul>
<h2>Summary</h2>
{_html_table(by_arm(summary_rows(report)))}
{privacy}
{deployment}
{plots}
{arms}
<h2>{html.escape(nodes_heading)}</h2>
{_html_table(node_table)}
</body></html>
"""


def _html_deployment(report: dict[str, Any]) -> str:
    """Return the Deployment section as HTML (empty when no arm was deployed); its plot is among the figures."""
    tables = deployment_tables(report)
    if not tables:
        return ""
    text = html.escape(deployment_explained(report).replace("*", "").replace("`", ""))
    return f"<h2>Deployment</h2><p>{text}</p>{''.join(_html_table(rows) for rows in tables)}{_html_table(total_rows(report))}"


def print_deployment(report: dict[str, Any], console) -> None:
    """Print one row per arm and variant of the Deployment section with ``rich`` (nothing when none was deployed)."""
    from rich.table import Table

    rows = deployment_rows(report)
    if not rows:
        return
    table = Table(title="deployment (onnxruntime, CPU)")
    columns = ("arm", "variant", "MB", "accuracy", "p50 ms", "p99 ms", "batch-64 / s", "peak RSS MB",
               "$ / M predictions", "$ serving")
    for column in columns:
        table.add_column(column, justify="left" if column in ("arm", "variant") else "right")
    for row in rows:
        table.add_row(*(format_cell(row[c]) for c in columns))
    console.print(table)


def print_summary(report: dict[str, Any], console) -> None:
    """Print the per-arm summary (one column per arm) and the recommendation with ``rich``."""
    from rich.table import Table

    rows = summary_rows(report)
    table = Table(title=f"federated-compare {report['run_key']}")
    table.add_column("")
    for row in rows:
        table.add_column(str(row["arm"]), justify="right")
    for metric in list(rows[0])[1:]:
        table.add_row(metric, *(format_cell(row[metric]) for row in rows))  # no exponents: $0.000003, not 3e-06
    console.print(table)
    console.print(f"[bold]recommendation:[/] {report['recommendation']['text']}", soft_wrap=True)
