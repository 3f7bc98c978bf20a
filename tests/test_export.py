"""`fedcompare report`: finding a stored report and exporting it (JSON, CSV, HTML)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows.export import find_report, to_csv, to_html, to_json
from flows.report import build_report, summarize_arm
from infra.checkpoints import report_key
from infra.store import open_store

FEDCOMPARE = str(Path(sys.executable).parent / "fedcompare")


def _round(number: int, accuracy: float) -> dict:
    return {
        "round": number, "model": "cnn", "round_seconds": 10.0, "bytes_down": 100, "bytes_up": 50,
        "central": {"accuracy": accuracy, "macro_f1": accuracy, "loss": 1 - accuracy}, "federated": {},
        "nodes": [{"node_id": 1, "train": {"train-seconds": 2.0, "train-cpu-seconds": 1.5}, "evaluate": {}}],
        "failures": [], "aggregate_seconds": 0.1, "central_evaluate_seconds": 0.2,
    }


def _report(run_key: str, created_at: str, large: float = 0.95, small: float = 0.85) -> dict:
    arms = {
        arm: summarize_arm(arm, [_round(1, acc - 0.05), _round(2, acc)], nodes=[1], parameters=5, model_bytes=20,
                           wall_seconds=20.0, reference={"accuracy": acc + 0.01}, target_accuracy=0.9)
        for arm, acc in (("large", large), ("small", small))
    }
    report = build_report(run_key=run_key, target_accuracy=0.9, arms=arms, federation={"nodes": []}, versions={},
                          config={"data": {"dataset": "mnist", "partitioning": "iid"}, "assignment": "all-nodes"})
    report["created_at"] = created_at
    return report


@pytest.fixture
def store(tmp_path: Path):
    store = open_store(f"file://{tmp_path / 'store'}")
    store.put_json(report_key("older"), _report("older", "2026-01-01T00:00:00+00:00"))
    store.put_json(report_key("newer"), _report("newer", "2026-02-01T00:00:00+00:00"))
    return store


def test_latest_is_the_newest_report_and_an_id_finds_its_own(store):
    assert find_report(store, "latest")["run_key"] == "newer"
    assert find_report(store, "older")["run_key"] == "older"
    with pytest.raises(LookupError, match="no report for flow run 'missing'.*`latest`"):
        find_report(store, "missing")


def test_reports_of_another_format_version_are_refused_with_the_fix(store):
    stale = _report("stale", "2026-03-01T00:00:00+00:00")
    stale["report_version"] = 1
    store.put_json(report_key("stale"), stale)
    with pytest.raises(LookupError, match="format version 1.*re-run"):
        find_report(store, "stale")


def test_csv_has_one_row_per_arm_and_round_with_the_report_values(store):
    report = find_report(store, "newer")

    rows = list(csv.DictReader(io.StringIO(to_csv(report))))

    assert [(r["arm"], r["round"]) for r in rows] == [("large", "1"), ("large", "2"), ("small", "1"), ("small", "2")]
    expected = report["arms"]["small"]["per_round"][1]
    assert float(rows[3]["accuracy"]) == expected["accuracy"]
    assert float(rows[3]["cum_usd"]) == pytest.approx(expected["cum_usd"])


def test_html_is_self_contained_with_recommendation_plots_and_escaped_text(store):
    report = find_report(store, "newer")
    report["arms"]["large"]["model"] = "<script>alert(1)</script>"

    page = to_html(report)

    assert page.count('src="data:image/png;base64,') == 2
    assert "http://" not in page and "https://" not in page  # nothing to fetch: opens offline
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    assert report["recommendation"]["text"].split(":")[0] in page
    assert json.loads(to_json(report)) == report


def test_cli_exports_every_format_and_fails_in_one_line(store, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()

    done = subprocess.run(
        [FEDCOMPARE, "report", "latest", "--store", store.uri, "--json", str(out / "r.json"),
         "--csv", str(out / "r.csv"), "--html", str(out / "r.html")],
        capture_output=True, text=True, timeout=120, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    missing = subprocess.run([FEDCOMPARE, "report", "nope", "--store", store.uri], capture_output=True, text=True,
                             timeout=120)
    unwritable = subprocess.run([FEDCOMPARE, "report", "latest", "--store", store.uri, "--html",
                                 str(tmp_path / "no-such-dir" / "r.html")], capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    assert "final accuracy" in done.stdout and "recommendation:" in done.stdout
    assert json.loads((out / "r.json").read_text())["run_key"] == "newer"
    assert (out / "r.csv").read_text().startswith("arm,model,round,")
    assert (out / "r.html").read_text().startswith("<!doctype html>")
    assert sorted(p.name for p in out.iterdir()) == ["r.csv", "r.html", "r.json"]  # no .partial left
    for failed, needle in ((missing, "no report for flow run 'nope'"), (unwritable, "cannot write")):
        assert failed.returncode == 1
        assert needle in failed.stderr and failed.stderr.strip().count("\n") == 0
        assert "Traceback" not in failed.stderr
