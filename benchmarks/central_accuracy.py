"""Train each zoo model centrally and print one JSON line: accuracy per epoch and seconds.

Two training sets:

* default: a stratified ``--train-fraction`` of the pool (what is left after the
  central test split), i.e. what the models can reach on that much iid data;
* ``--partition-ids 0,1``: the union of those nodes' local train sets under the
  chosen partition (``--scheme``, ``--alpha``, ...), i.e. the ceiling of an arm that
  trains on exactly those nodes.

Accuracies are on the central test set. Example::

    python benchmarks/central_accuracy.py --models cnn,logreg
    python benchmarks/central_accuracy.py --models cnn --partition-ids 0,1

Measured (mnist, seed 0, 2 CPU cores, 10 epochs; 2,000 pool images, 1,000 test images):
cnn 0.967 (0.955 after 4 epochs, about 2.3 s per epoch), logreg 0.894, torch-logreg 0.913,
mlp 0.913. Ceilings of dirichlet(0.5) arms, nodes 0,1 / 2,3: cnn 0.952 / 0.952,
logreg 0.829 / 0.863, torch-logreg 0.874 / 0.876.

Measured (rotten-tomatoes, seed 0, 2 shared CPU cores with OMP_NUM_THREADS=1, 5 epochs,
``--train-fraction 1.0``: all 10,246 pool reviews, 2,562 test reviews, majority class 0.578):
mnb 0.758 (closed form, 0.2 s), tfidf-logreg 0.770 0.780 0.778 0.776 0.769 per epoch (6 s CPU
per epoch), transformer 0.743 0.757 0.739 0.743 0.733 (20 s CPU per epoch, 2.2 M parameters),
bilstm 0.755 0.769 0.758 0.747 0.750 (22 s CPU per epoch, 2.2 M parameters): all three peak
after 2 epochs, the defaults below.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from clients.data import Dataset, central_test, load_dataset, pooled_train, split_central  # noqa: E402
from clients.models import MODEL_NAMES, build_model  # noqa: E402

# Recommended per-model training settings, chosen with this script (results above).
DEFAULTS = {
    "cnn": {"epochs": 10, "batch_size": 32, "learning_rate": 1e-3},
    "mlp": {"epochs": 10, "batch_size": 32, "learning_rate": 1e-3},
    "logreg": {"epochs": 10, "batch_size": 32, "learning_rate": 1e-2},
    "torch-logreg": {"epochs": 10, "batch_size": 32, "learning_rate": 3e-3},
    # text (rotten-tomatoes); mnb counts in closed form: one epoch is the model
    "transformer": {"epochs": 2, "batch_size": 32, "learning_rate": 1e-3},
    "bilstm": {"epochs": 2, "batch_size": 32, "learning_rate": 3e-3},
    "mnb": {"epochs": 1, "batch_size": 32, "learning_rate": 1e-2},
    "tfidf-logreg": {"epochs": 2, "batch_size": 32, "learning_rate": 2e-2},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist",
                        help="mnist, fashion-mnist, digits, breast-cancer, rotten-tomatoes or a .csv/.npz path")
    parser.add_argument("--models", default="cnn,logreg", help=f"comma list of {', '.join(MODEL_NAMES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--central-test-fraction", type=float, default=0.2)
    parser.add_argument("--train-fraction", type=float, default=0.5, help="share of the pool to train on")
    parser.add_argument("--partition-ids", default="", help="train on these nodes' union instead, e.g. 0,1")
    parser.add_argument("--num-partitions", type=int, default=4)
    parser.add_argument("--scheme", default="dirichlet")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--classes-per-node", type=int, default=2)
    parser.add_argument("--local-test-fraction", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=None, help="override every model's epochs")
    parser.add_argument("--batch-size", type=int, default=None, help="override every model's batch size")
    parser.add_argument("--learning-rate", type=float, default=None, help="override every model's learning rate")
    parser.add_argument("--device", default="auto")
    return parser.parse_args(argv)


def training_set(ds: Dataset, args: argparse.Namespace) -> Dataset:
    """Return the training set the arguments describe (pool share or union of nodes)."""
    if args.partition_ids:
        return pooled_train(
            ds,
            num_partitions=args.num_partitions,
            scheme=args.scheme,
            seed=args.seed,
            alpha=args.alpha,
            classes_per_node=args.classes_per_node,
            central_test_fraction=args.central_test_fraction,
            local_test_fraction=args.local_test_fraction,
            partition_ids=tuple(int(i) for i in args.partition_ids.split(",")),
        )
    pool, _ = split_central(ds, test_fraction=args.central_test_fraction, seed=args.seed)
    if args.train_fraction >= 1.0:
        return pool
    _, share = split_central(pool, test_fraction=args.train_fraction, seed=args.seed)
    return share


def measure(name: str, train: Dataset, test: Dataset, args: argparse.Namespace) -> dict[str, object]:
    """Train model ``name`` one epoch at a time; return accuracies per epoch and timings."""
    settings = dict(DEFAULTS[name])
    for key in ("epochs", "batch_size", "learning_rate"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    build_start = time.perf_counter()
    model = build_model(
        name, input_shape=train.input_shape, num_classes=train.num_classes, seed=args.seed, device=args.device
    )
    build_seconds = time.perf_counter() - build_start
    accuracy, train_seconds, cpu_seconds = [], 0.0, 0.0
    for epoch in range(settings["epochs"]):
        fit = model.fit(
            train,
            epochs=1,
            batch_size=settings["batch_size"],
            learning_rate=settings["learning_rate"],
            seed=args.seed + epoch,  # one fit per epoch, like one local epoch per federated round
        )
        train_seconds += fit["train_seconds"]
        cpu_seconds += fit["train_cpu_seconds"]
        accuracy.append(round(model.evaluate(test, batch_size=256)["accuracy"], 4))
    final = model.evaluate(test, batch_size=256)
    return {
        **settings,
        "device": model.device,
        "num_parameters": model.num_parameters(),
        "accuracy": round(final["accuracy"], 4),
        "macro_f1": round(final["macro_f1"], 4),
        "accuracy_per_epoch": accuracy,
        "best_accuracy": max(accuracy),
        "train_seconds": round(train_seconds, 2),
        "seconds_per_epoch": round(train_seconds / settings["epochs"], 3),
        "cpu_seconds_per_epoch": round(cpu_seconds / settings["epochs"], 3),
        "build_seconds": round(build_seconds, 2),
    }


def main(argv: list[str] | None = None) -> None:
    """Load the data, measure every requested model, print one JSON line."""
    args = parse_args(argv)
    ds = load_dataset(args.dataset)
    train = training_set(ds, args)
    test = central_test(ds, central_test_fraction=args.central_test_fraction, seed=args.seed)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODEL_NAMES]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; expected some of {', '.join(MODEL_NAMES)}")
    report = {
        "benchmark": "central_accuracy",
        "dataset": ds.name,
        "seed": args.seed,
        "train_examples": len(train),
        "test_examples": len(test),
        "train_set": f"nodes {args.partition_ids} of {args.num_partitions} ({args.scheme}, alpha={args.alpha})"
        if args.partition_ids
        else f"{args.train_fraction} of the pool, stratified",
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}",
        "models": {name: measure(name, train, test, args) for name in names},
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
