"""Measure the Simulation Engine over growing numbers of virtual nodes; print one JSON line per setting.

One simulation SuperLink (`infra.simulation.simulation_superlink`) serves every setting: a
setting is one arm (``small``: logreg, ``large``: the config's large model resolved) trained
as a simulated Flower run over ``nodes`` virtual nodes, of which ``fraction`` train (and, in
the final round, evaluate) each round, as the `federated-compare` flow submits it with
engine "simulation". Each Flower run starts its own local Ray instance.

Per setting: ``nodes``, ``fraction``, ``arm``, ``model``, ``rounds``, ``seconds_per_round``
(median round wall after the first round), ``first_round_s``, ``peak_rss_mb`` (peak total RSS
of every process under the SuperLink, its SuperExec, ``flwr-simulation`` and Ray's
processes, plus this one, sampled every 0.5 s; pages shared between them, such as Ray's
object store, count once per process), ``sampled_per_round`` (median virtual nodes that
trained), ``run_wall_s`` (submission to the run's end), ``final_accuracy`` (central test
accuracy after the last round). Besides: ``train_s_per_round`` (median over the same rounds
of the nodes' summed training seconds: the round's cost with no engine at all, on one core),
``central_evaluate_s`` (the part of a round the ServerApp spends on the central test set)
and ``outside_rounds_s`` (run wall less its rounds: Ray's start, loading, shutting down).
Each run's log (`flwr log`: the ServerApp's and Ray's output) is kept as
``<state dir>/simulation/run-<run id>.log``.

A setting the partitioning refuses, or a run that fails or exceeds ``--timeout`` (it is
then stopped), prints a line with ``error`` instead, and the next setting runs. Every
setting partitions with the same ``--min-partition-size`` (default 5, so that 10,000
virtual nodes of Fashion-MNIST fit; the flow's own default is 10).

    python benchmarks/simulation_scale.py [--nodes 100,1000,10000] [--arms small,large] [--fraction 0.1]
        [--rounds 3] [--dataset fashion-mnist] [--min-partition-size 5] [--timeout 1800] [--state-dir DIR]
        [--store DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
from pydantic import ValidationError
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clients.data import Dataset, node_data  # noqa: E402
from clients.spec import describe_errors  # noqa: E402
from flows.config import CompareConfig  # noqa: E402
from flows.flower import run_log, run_status, stop_run  # noqa: E402
from flows.following import submit  # noqa: E402
from flows.preparation import data_kwargs, raw_dataset, resolve_models  # noqa: E402
from flows.simulation import federation_config  # noqa: E402
from infra.checkpoints import read_manifest, round_metrics  # noqa: E402
from infra.simulation import simulation_superlink  # noqa: E402
from infra.store import open_store  # noqa: E402

_SAMPLE_S = 0.5  # memory sampling period
_POLL_S = 2.0  # run status and progress reads
_MIN_PARTITION_SIZE = 5  # the same partitioning rule at every node count: 10,000 of Fashion-MNIST fit


class PeakRss:
    """Sample the summed RSS of this process and every process below it in a background thread; keep the peak."""

    def __init__(self, period_s: float = _SAMPLE_S) -> None:
        self.period_s, self.peak_bytes, self.processes = period_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="peak-rss", daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def sample() -> tuple[int, int]:
        """Return (summed RSS in bytes, processes counted) of this process and its descendants now."""
        me = psutil.Process()
        total, counted = 0, 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
                counted += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total, counted

    def _loop(self) -> None:
        """Sample until stopped."""
        while not self._stop.is_set():
            total, counted = self.sample()
            if total > self.peak_bytes:
                self.peak_bytes = total
            self.processes = max(self.processes, counted)
            self._stop.wait(self.period_s)


def _config(args: argparse.Namespace, nodes: int) -> CompareConfig:
    """Return the comparison config of one setting: engine simulation over ``nodes`` virtual nodes."""
    return CompareConfig(
        engine="simulation", rounds=args.rounds,
        data={"dataset": args.dataset, "min_partition_size": args.min_partition_size},
        simulation={"num_nodes": nodes, "fraction_train": args.fraction, "fraction_evaluate": args.fraction},
    )


def _partition_problem(config: CompareConfig, dataset: Dataset) -> str:
    """Return why the run's dataset cannot be split over its virtual nodes ("" if it can), as the flow checks."""
    try:
        node_data(dataset, partition_id=0, num_partitions=config.simulation.num_nodes, **data_kwargs(config))
    except ValueError as exc:
        return f"{config.simulation.num_nodes} virtual nodes cannot each hold a partition of {config.data.dataset!r}: {exc}"
    return ""


def _median(values: list[float]) -> float | None:
    """Return the median of ``values`` rounded to 3 places (None for none)."""
    return round(statistics.median(values), 3) if values else None


def _figures(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Return a setting's figures from its stored rounds."""
    walls = [r["round_seconds"] for r in rounds]
    train = [sum(n["train"].get("train-seconds", 0.0) for n in r["nodes"]) for r in rounds]
    return {
        "rounds": len(rounds),
        "seconds_per_round": _median(walls[1:]),
        "first_round_s": round(walls[0], 3) if walls else None,
        "sampled_per_round": _median([len(r.get("virtual_nodes", {}).get("train", [])) for r in rounds]),
        "final_accuracy": round(rounds[-1]["central"]["accuracy"], 4) if rounds else None,
        "train_s_per_round": _median(train[1:]),
        "central_evaluate_s": _median([r.get("central_evaluate_seconds", 0.0) for r in rounds[1:]]),
        "round_wall_s": [round(w, 2) for w in walls],
        "failures": sum(len(r.get("failures", [])) for r in rounds),
    }


def _run_setting(config: CompareConfig, arm: str, model: str, *, superlink: str, store, timeout_s: float,
                 logs: Path, console: Console) -> dict[str, Any]:
    """Train one arm as a simulated Flower run, sampling memory meanwhile; return its figures or an error.

    The run's log (`flwr log`: the ServerApp's and Ray's output) is kept as ``logs/run-<run id>.log``.
    """
    run_key = f"simscale-{uuid.uuid4().hex[:8]}"
    spec = config.run_spec(arm, arm=arm, model=model, run_key=run_key, store_uri=store.uri, nodes=[], tier="")
    result: dict[str, Any] = {"run_key": run_key}
    with PeakRss() as memory:
        started = time.monotonic()
        run_id = submit(spec, superlink, simulation=federation_config(config))
        result["flower_run_id"] = run_id
        done, status = 0, None
        while time.monotonic() - started < timeout_s:
            status = run_status(run_id, superlink)
            manifest = read_manifest(store, run_key, arm)
            latest = manifest["latest_complete_round"] if manifest else 0
            if latest > done:
                console.print(f"  round {latest}/{config.rounds} after {time.monotonic() - started:.0f} s, "
                              f"{memory.peak_bytes / 2**20:.0f} MB peak RSS")
                done = latest
            if status.finished:
                break
            time.sleep(_POLL_S)
        wall = time.monotonic() - started
    result.update(run_wall_s=round(wall, 2), peak_rss_mb=round(memory.peak_bytes / 2**20, 1),
                  processes=memory.processes)
    if status is None or not status.finished:
        stop_run(run_id, superlink)
        result["error"] = f"timeout: Flower run {run_id} did not finish within {timeout_s:.0f} s; it was stopped"
    log = run_log(run_id, superlink, tail=1_000_000)
    (logs / f"run-{run_id}.log").write_text(log)
    if status is not None and status.finished and not status.completed:
        tail = log.strip().splitlines()[-4:]
        result["error"] = f"Flower run {run_id} ended {status.status}: {' | '.join(tail)}"
    rounds = round_metrics(store, run_key, arm)
    if rounds:
        result.update(_figures(rounds))
        result["outside_rounds_s"] = round(wall - sum(r["round_seconds"] for r in rounds), 2)
    return result


def main() -> int:
    """Run every setting on one simulation SuperLink and print one JSON line per setting."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="100,1000,10000", help="comma-separated virtual node counts")
    parser.add_argument("--arms", default="small,large", help="comma-separated arms: small, large")
    parser.add_argument("--fraction", type=float, default=0.1,
                        help="share of the virtual nodes that train (and evaluate) each round (default 0.1)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per setting (default 3)")
    parser.add_argument("--dataset", default="fashion-mnist", help="dataset (default fashion-mnist; mnist is quick)")
    parser.add_argument("--min-partition-size", type=int, default=_MIN_PARTITION_SIZE,
                        help=f"data.min_partition_size of every setting (default {_MIN_PARTITION_SIZE}: 10,000 "
                             "virtual nodes of Fashion-MNIST's 56,000 pooled images need 5 or fewer)")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds a setting may run before its Flower run is stopped (default 1800)")
    parser.add_argument("--state-dir", help="the SuperLink's state folder (default: a new temporary folder)")
    parser.add_argument("--store", help="the checkpoint store folder (default: a new temporary folder)")
    args = parser.parse_args()
    console = Console(stderr=True)
    arms = [a for a in args.arms.split(",") if a]
    if unknown := sorted(set(arms) - {"small", "large"}):
        parser.error(f"--arms: expected small and/or large, got {', '.join(unknown)}")
    try:
        node_counts = [int(n) for n in args.nodes.split(",") if n]
        configs = {n: _config(args, n) for n in node_counts}
    except ValidationError as exc:
        parser.error(f"--nodes/--fraction/--rounds/--dataset/--min-partition-size: {describe_errors(exc)}")
    except ValueError as exc:
        parser.error(f"--nodes: expected comma-separated counts such as 100,1000, got {args.nodes!r} ({exc})")
    state = Path(args.state_dir or tempfile.mkdtemp(prefix="fedcompare-simscale-state-")).resolve()
    store = open_store("file://" + str(Path(args.store or tempfile.mkdtemp(prefix="fedcompare-simscale-store-"))
                                      .resolve()))
    first = next(iter(configs.values()))
    models = resolve_models.fn(first)  # the plain function, without a Prefect server
    dataset = raw_dataset(first)
    console.print(f"state {state}, store {store.uri}; models {models['small']} (small), {models['large']} (large); "
                  f"{args.dataset}: {len(dataset)} examples")
    began = time.monotonic()
    with simulation_superlink(state) as superlink:
        console.print(f"simulation SuperLink on {superlink} (log under {state / 'simulation'})")
        for nodes, config in configs.items():
            problem = _partition_problem(config, dataset)
            for arm in arms:
                line: dict[str, Any] = {"nodes": nodes, "fraction": args.fraction, "arm": arm, "model": models[arm],
                                        "dataset": args.dataset, "min_partition_size": args.min_partition_size}
                if problem:
                    line.update(rounds=0, error=problem)
                else:
                    console.print(f"[bold]{nodes} virtual nodes, {arm} arm ({models[arm]})[/bold]")
                    line.update(_run_setting(config, arm, models[arm], superlink=superlink, store=store,
                                             timeout_s=args.timeout, logs=state / "simulation", console=console))
                print(json.dumps(line), flush=True)
    console.print(f"benchmark wall {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
