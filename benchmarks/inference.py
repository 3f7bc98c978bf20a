"""Export, compress and measure the arms' models with onnxruntime; print one JSON line per arm and variant.

The figures are those of the report's Deployment section (``clients.inference``):
accuracy on the central test set, max |Δp| against the framework, batch-1 latency
p50/p90/p99 after a warm-up, batch-64 throughput, load time and peak RSS of a fresh
serving process, bytes, and the price per million predictions (``flows.deployment``,
default ``CostModel``). ``--repeats`` fresh processes measure each variant, in turns (fp32,
int8, fp16, fp32, ...) so that a busy moment hits all alike; throughput is the fastest of
them (as in ``dp_overhead.py``: other programs only slow a run down), the other figures
their median. ``throughput_vs_fp32`` divides the fastest runs; ``throughput_vs_fp32_paired``
is the median over the turns of the variant's throughput over fp32's in the same turn,
which drifting load from other programs moves far less (both are printed: on this shared
2-core machine the fastest fp32 run of the CNN has ranged from 548/s to 5,400/s). ``load_average``
is the machine's 1-minute load when the measuring starts and ends.

Models: by default each is trained centrally on the pooled training data of the demo's
four nodes (mnist, dirichlet 0.5), ``--epochs`` passes; with ``--run KEY --store URI`` the
final models of a stored comparison are measured instead. Example::

    python benchmarks/inference.py                       # large cnn and small logreg, trained here
    python benchmarks/inference.py --run latest --store .fedcompare/store
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from clients.data import central_test, load_dataset, pooled_train  # noqa: E402
from clients.export import compress, export_fp32, framework_probabilities, onnx_probabilities, to_raw  # noqa: E402
from clients.inference import InferenceSettings, measure_speed  # noqa: E402
from clients.models import build_model  # noqa: E402

_SPEED = ("load_seconds", "latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "throughput_per_s", "peak_rss_mb")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default="large=cnn,small=logreg", help="arm=model pairs to train and measure")
    parser.add_argument("--epochs", default="cnn=4,logreg=10", help="training passes per model (default cnn=4, logreg=10)")
    parser.add_argument("--run", help="measure the final models of this stored run key (or `latest`) instead")
    parser.add_argument("--store", help="store URI of --run")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads (default 2)")
    parser.add_argument("--queries", type=int, default=300, help="timed batch-1 queries (default 300)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed batch-1 queries first (default 30)")
    parser.add_argument("--batches", type=int, default=30, help="timed batches of 64 (default 30)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh measuring processes per variant (default 3)")
    parser.add_argument("--calibration", type=int, default=256, help="int8 calibration examples (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _trained(args: argparse.Namespace, dataset, kwargs):
    """Yield (arm, model) trained centrally on the demo's pooled training data."""
    epochs = dict(pair.split("=") for pair in args.epochs.split(","))
    train = pooled_train(dataset, num_partitions=4, **kwargs)
    for pair in args.arms.split(","):
        arm, name = pair.split("=")
        model = build_model(name, input_shape=dataset.input_shape, num_classes=dataset.num_classes, seed=args.seed,
                            device="cpu")
        model.fit(train, epochs=int(epochs.get(name, 3)), batch_size=32,
                  learning_rate=1e-3 if name != "logreg" else 1e-2, seed=args.seed)
        yield arm, model, train


def _stored(args: argparse.Namespace, dataset, kwargs):
    """Yield (arm, model, calibration pool) from a stored run's final checkpoints."""
    from infra.checkpoints import load_latest, read_checkpoint
    from infra.deployments import latest_deployed_run
    from infra.store import open_store

    store = open_store(args.store or ".fedcompare/store")
    run_key = latest_deployed_run(store, "large") if args.run == "latest" else args.run
    train = pooled_train(dataset, num_partitions=4, **kwargs)
    for arm in ("large", "small"):
        round_, arrays, _ = load_latest(store, run_key, arm)
        described = read_checkpoint(store, run_key, arm, round_)["model"]
        model = build_model(described["name"], input_shape=dataset.input_shape, num_classes=dataset.num_classes,
                            seed=0, device="cpu", private=described["args"].get("private", False))
        model.set_arrays(arrays)
        yield arm, model, train


def main(argv: list[str] | None = None) -> int:
    """Measure every arm's variants and print one JSON line each."""
    import numpy as np
    import onnxruntime

    from flows.decision import CostModel
    from flows.deployment import replica_usd_per_hour

    args = parse_args(argv)
    dataset = load_dataset("mnist")
    kwargs = {"scheme": "dirichlet", "seed": args.seed, "alpha": 0.5, "classes_per_node": 2,
              "central_test_fraction": 0.2, "local_test_fraction": 0.15}
    test = central_test(dataset, central_test_fraction=0.2, seed=args.seed)
    raw_test = to_raw(test.x, dataset.name)
    settings = InferenceSettings(threads=args.threads, queries=args.queries, warmup=args.warmup, batches=args.batches)
    source = _stored if args.run else _trained
    for arm, model, pool in source(args, dataset, kwargs):
        pick = np.sort(np.random.default_rng(args.seed).permutation(len(pool))[: args.calibration])
        fp32 = export_fp32(model, dataset_name=dataset.name)
        variants, skipped = compress(fp32, to_raw(pool.x[pick], dataset.name))
        reference = framework_probabilities(model, test.x)
        runs = {name: [] for name in variants}
        load_before = os.getloadavg()[0]
        for _ in range(args.repeats):
            for name, exported in variants.items():
                runs[name].append(measure_speed(exported.onnx, raw_test, settings))
        load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        rows = {}
        for name, exported in variants.items():
            probabilities = onnx_probabilities(exported.onnx, raw_test, threads=args.threads)
            speed = {key: statistics.median(r[key] for r in runs[name]) for key in _SPEED}
            speed["throughput_per_s"] = max(r["throughput_per_s"] for r in runs[name])
            hourly = replica_usd_per_hour(speed["peak_rss_mb"], threads=args.threads, cost=CostModel())
            rows[name] = {
                "arm": arm, "model": model.name, "variant": name, "bytes": len(exported.onnx),
                "accuracy": float(np.mean(probabilities.argmax(1) == test.y)),
                "framework_accuracy": float(np.mean(reference.argmax(1) == test.y)),
                "max_abs_diff": float(np.max(np.abs(probabilities - reference))), **speed,
                "usd_per_million_predictions": hourly / (speed["throughput_per_s"] * 3600) * 1e6,
                "throughput_runs": [round(r["throughput_per_s"], 1) for r in runs[name]],
            }
        for name, row in rows.items():
            row["throughput_vs_fp32"] = row["throughput_per_s"] / rows["fp32"]["throughput_per_s"]
            row["throughput_vs_fp32_paired"] = statistics.median(
                r["throughput_per_s"] / f["throughput_per_s"] for r, f in zip(runs[name], runs["fp32"]))
            row["accuracy_vs_fp32"] = row["accuracy"] - rows["fp32"]["accuracy"]
            row.update(threads=args.threads, queries=args.queries, repeats=args.repeats, test_examples=len(test),
                       onnxruntime=onnxruntime.__version__, cpu=platform.processor() or platform.machine(),
                       cpus=os.cpu_count(), load_average=load, skipped=skipped)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
