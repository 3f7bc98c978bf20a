"""Measure fedcompare's rounds against bare Flower's on one local stack, in one run; print one JSON line.

Cases, one after another on the same SuperLink and SuperNodes:

(a) ``bare``: a trivial numpy Flower app (benchmarks/bare_flower: one train message per node
    per round, arrays echoed back) — the floor that Flower's own polling and processes set;
(b) ``small``: the demo's small arm alone (one Flower run of fedcompare's app, every node);
(c) ``large``: the demo's large arm alone;
(d) ``demo``: the default `federated-compare/local` flow (both arms, side by side).

Per case: ``rounds``, ``round_wall_s``, ``slowest_train_s`` (the slowest node's training in
each round), ``overhead_s_per_round`` (median of wall − slowest training) and, for (b)–(d),
``overhead_over_bare_s_per_round`` (that minus bare Flower's median round wall). For (d) also
``flow_wall_s`` and ``non_training_cpu_s_per_message``: CPU seconds of every node-side process
(SuperNodes, SuperExecs, ClientApps, warm workers) during the flow run, less the nodes'
training and evaluation CPU, per Flower message the nodes answered.

    python benchmarks/e2e.py [--rounds N] [--state-dir DIR] [--cases bare,small,large,demo]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.following import run_config as _run_config  # noqa: E402
from flows.preparation import resolve_models  # noqa: E402
from flows.config import CompareConfig  # noqa: E402
from flows.demo import follow_flow_run  # noqa: E402
from flows.flower import run_status, submit_run  # noqa: E402
from infra.checkpoints import report_key  # noqa: E402
from infra.stack import StackSettings, running_pid, up  # noqa: E402
from infra.state import state_dir  # noqa: E402
from infra.store import open_store  # noqa: E402

BARE_APP = Path(__file__).resolve().parent / "bare_flower"
_CLK = os.sysconf("SC_CLK_TCK")


def _wait(run_id: int, superlink: str, timeout_s: float = 3600) -> None:
    """Wait until Flower run ``run_id`` finished; fail unless it completed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = run_status(run_id, superlink)
        if status.finished:
            if not status.completed:
                raise SystemExit(f"Flower run {run_id} ended {status.status}")
            return
        time.sleep(1)
    raise SystemExit(f"Flower run {run_id} did not finish within {timeout_s:.0f} s")


def _summary(walls: list[float], slowest: list[float], bare_median: float | None) -> dict:
    """Return a case's figures from its round walls and slowest training per round."""
    overhead = statistics.median(w - s for w, s in zip(walls, slowest, strict=True))
    summary = {"rounds": len(walls), "round_wall_s": [round(w, 2) for w in walls],
               "slowest_train_s": [round(s, 2) for s in slowest], "overhead_s_per_round": round(overhead, 2)}
    if bare_median is not None:
        summary["overhead_over_bare_s_per_round"] = round(overhead - bare_median, 2)
    return summary


def _rounds(store, run_key: str, arm: str) -> list[dict]:
    """Return the stored metrics of every round of ``arm``."""
    rounds, n = [], 1
    while store.exists(key := f"runs/{run_key}/{arm}/round-{n:04d}/metrics.json"):
        rounds.append(store.get_json(key))
        n += 1
    return rounds


def _arm_figures(rounds: list[dict], bare_median: float | None) -> dict:
    """Return the figures of one arm's stored rounds."""
    walls = [r["round_seconds"] for r in rounds]
    slowest = [max((n["train"].get("train-seconds", 0.0) for n in r["nodes"]), default=0.0) for r in rounds]
    return _summary(walls, slowest, bare_median)


def _descendants(pid: int) -> list[int]:
    """Return ``pid`` and every live process below it."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return found


def _node_cpu_s(settings: StackSettings) -> float:
    """Return the CPU seconds (own and reaped children's) of every node-side process of the stack now."""
    total = 0
    for node in settings.nodes:
        for name in (f"supernode-{node.partition_id}", f"worker-{node.partition_id}"):
            pid = running_pid(settings, name)
            for process in _descendants(pid) if pid else []:
                try:
                    fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                total += sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    return total / _CLK


def main() -> int:
    """Run the cases and print their figures as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every case (default 5, the demo's)")
    parser.add_argument("--state-dir", help="the stack's state directory (default: $FEDCOMPARE_STATE_DIR or ./.fedcompare)")
    parser.add_argument("--cases", default="bare,small,large,demo", help="comma-separated subset to run")
    args = parser.parse_args()
    cases = args.cases.split(",")
    state = state_dir(args.state_dir)
    settings = StackSettings.load(state) or StackSettings.create(state)
    console = Console(stderr=True)
    up(settings, echo=lambda line: console.print(line))
    os.environ.update({k: v for k, v in settings.env().items() if k.startswith(("PREFECT_", "FEDCOMPARE_"))})
    store = open_store(os.environ["FEDCOMPARE_STORE"])
    config = CompareConfig(rounds=args.rounds)
    result: dict = {"benchmark": "e2e", "nodes": len(settings.nodes), "warm_workers": settings.warm_workers}

    bare_median = None
    if "bare" in cases:
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "bare.json"
            _wait(submit_run({"rounds": args.rounds, "out": str(out)}, settings.superlink, app=BARE_APP),
                  settings.superlink)
            walls = json.loads(out.read_text())["round_wall_s"]
        bare_median = statistics.median(walls)
        result["bare"] = _summary(walls, [0.0] * len(walls), None)
        console.print(f"bare: {result['bare']}")

    models = resolve_models.fn(config)  # the plain function, without a Prefect server
    for arm in ("small", "large"):
        if arm not in cases:
            continue
        run_key = f"e2e-{uuid.uuid4().hex[:8]}"
        spec = config.run_spec(arm, arm=arm, model=models[arm], run_key=run_key, store_uri=store.uri, nodes=[])
        _wait(submit_run(_run_config(spec), settings.superlink), settings.superlink)
        result[arm] = {"model": models[arm], **_arm_figures(_rounds(store, run_key, arm), bare_median)}
        console.print(f"{arm}: {result[arm]}")

    if "demo" in cases:
        cpu_before, started = _node_cpu_s(settings), time.monotonic()
        run_id, final_state, message = asyncio.run(
            follow_flow_run(settings, {"config": {"rounds": args.rounds}}, 7200, console,
                            store=store, arms=["large", "small"]))
        flow_wall, node_cpu = time.monotonic() - started, _node_cpu_s(settings) - cpu_before
        if final_state != "COMPLETED":
            print(json.dumps({"error": f"flow run {run_id} ended {final_state}: {message}"}))
            return 1
        report = store.get_json(report_key(run_id))
        demo: dict = {"flow_wall_s": round(flow_wall, 2), "arms": {}}
        training_cpu, messages = 0.0, len(report.get("federation", {}).get("nodes", []) or settings.nodes)
        for arm in report["arms"]:
            rounds = _rounds(store, run_id, arm)
            demo["arms"][arm] = _arm_figures(rounds, bare_median)
            for stored in rounds:
                for node in stored["nodes"]:
                    for phase in ("train", "evaluate"):
                        reply = node.get(phase) or {}
                        if reply:
                            messages += 1
                            training_cpu += reply.get(f"{phase}-cpu-seconds", 0.0)
        demo["messages"] = messages
        demo["node_cpu_s"] = round(node_cpu, 1)
        demo["non_training_cpu_s_per_message"] = round((node_cpu - training_cpu) / max(1, messages), 2)
        result["demo"] = demo
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
