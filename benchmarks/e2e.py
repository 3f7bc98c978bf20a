"""Time the demo configuration end to end on the local stack and print one JSON line.

Reports the flow's wall time, the summed client training seconds per arm, and the
orchestration overhead per round (a round's wall time minus the slowest client's
training time in it), i.e. what Flower + Prefect + fedcompare add on top of training.

    python benchmarks/e2e.py [--rounds N] [--state-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.demo import follow_flow_run  # noqa: E402
from infra.checkpoints import report_key  # noqa: E402
from infra.stack import StackSettings, up  # noqa: E402
from infra.store import open_store  # noqa: E402


def main() -> int:
    """Run the deployment once and print the timing summary as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default: the demo's)")
    parser.add_argument("--state-dir", default=os.environ.get("FEDCOMPARE_STATE_DIR", ".fedcompare"))
    args = parser.parse_args()
    state = Path(args.state_dir).resolve()
    settings = StackSettings.load(state) or StackSettings.create(state)
    console = Console(stderr=True)
    up(settings, echo=lambda line: console.print(line))
    os.environ.update({k: v for k, v in settings.env().items() if k.startswith(("PREFECT_", "FEDCOMPARE_"))})

    parameters = {"config": {"rounds": args.rounds}} if args.rounds else {}
    started = time.monotonic()
    run_id, final_state = asyncio.run(follow_flow_run(settings, parameters, 7200, console))
    wall = time.monotonic() - started
    if final_state != "COMPLETED":
        print(json.dumps({"error": f"flow run {run_id} ended {final_state}"}))
        return 1
    report = open_store(os.environ["FEDCOMPARE_STORE"]).get_json(report_key(run_id))
    arms = {}
    for arm, summary in report["arms"].items():
        overhead = [r["seconds"] - r["slowest_client_train_seconds"] for r in summary["per_round"]]
        arms[arm] = {
            "model": summary["model"],
            "rounds": summary["rounds"],
            "final_accuracy": summary["final_accuracy"],
            "arm_wall_seconds": round(summary["wall_seconds"], 2),
            "client_train_seconds": round(summary["client_train_seconds"], 2),
            "round_seconds_median": round(statistics.median(r["seconds"] for r in summary["per_round"]), 2),
            "overhead_seconds_per_round": [round(o, 2) for o in overhead],
            "overhead_seconds_per_round_median": round(statistics.median(overhead), 2),
        }
    print(json.dumps({"benchmark": "e2e", "flow_run_id": run_id, "flow_wall_seconds": round(wall, 2),
                      "arms": arms}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
