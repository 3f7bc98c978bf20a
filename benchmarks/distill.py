"""Central accuracy of the small models trained plainly and distilled from a large teacher; one JSON line per dataset.

For each dataset the teacher (the large model: ``cnn`` for images, ``mlp`` for tables) and
the small models are trained centrally on the pooled training data of the demo's four
nodes (dirichlet 0.5, as ``benchmarks/inference.py``); each small model is then trained
again from scratch with ``clients.distill.fit_distilled`` on the teacher's soft labels of
that same data (as on a node of the ``small-distilled`` arm, whose teacher, the large
arm's global model, has seen the node's data) at every temperature and alpha of the grid.
Accuracies are on the central test set, the mean over ``--seeds`` student seeds (one
seed's spread, about ±1 point on digits, is as large as most of the differences); the
teacher is trained once, with the first seed; the same seeds, epochs and learning rate
for plain and distilled training. ``best`` is the grid point with the highest mean test
accuracy: chosen on the test set, so its ``best_gain`` is optimistic. Example::

    nice -n 10 python benchmarks/distill.py                        # digits and mnist, the default grid
    nice -n 10 python benchmarks/distill.py --datasets digits --temperatures 2 --alphas 0.5
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from clients.data import central_test, load_dataset, pooled_train  # noqa: E402
from clients.distill import fit_distilled, soft_labels  # noqa: E402
from clients.models import build_model, resolve_large_model  # noqa: E402

# training settings per model (those of benchmarks/central_accuracy.py; the cnn with inference.py's 4 epochs)
SETTINGS = {
    "cnn": {"epochs": 4, "batch_size": 32, "learning_rate": 1e-3},
    "mlp": {"epochs": 10, "batch_size": 32, "learning_rate": 1e-3},
    "logreg": {"epochs": 10, "batch_size": 32, "learning_rate": 1e-2},
    "torch-logreg": {"epochs": 10, "batch_size": 32, "learning_rate": 3e-3},
    "gnb": {"epochs": 1, "batch_size": 32, "learning_rate": 1e-2},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="digits,mnist", help="comma list of built-in datasets")
    parser.add_argument("--students", default="torch-logreg,logreg,gnb", help="comma list of small models")
    parser.add_argument("--temperatures", default="1,2,4", help="comma list of distillation temperatures")
    parser.add_argument("--alphas", default="0.5,0.9", help="comma list of soft-label weights")
    parser.add_argument("--seeds", default="0,1,2", help="student seeds (the teacher uses the first)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core CPU these small batches ran faster so)")
    return parser.parse_args(argv)


def accuracy(model, test) -> float:
    """Return the model's accuracy on ``test``."""
    return round(float(model.evaluate(test, batch_size=512)["accuracy"]), 4)


def measure(dataset_name: str, args: argparse.Namespace) -> dict:
    """Train the teacher, the plain and the distilled students on one dataset; return their accuracies."""
    started = time.perf_counter()
    dataset = load_dataset(dataset_name)
    data_kwargs = {"scheme": "dirichlet", "seed": 0, "alpha": 0.5, "classes_per_node": 2,
                   "central_test_fraction": 0.2, "local_test_fraction": 0.15}
    train = pooled_train(dataset, num_partitions=4, **data_kwargs)
    test = central_test(dataset, central_test_fraction=0.2, seed=0)

    def build(name: str, seed: int):
        """Build zoo model ``name`` for the dataset on the CPU."""
        return build_model(name, input_shape=dataset.input_shape, num_classes=dataset.num_classes, seed=seed,
                           device="cpu")

    teacher_name = resolve_large_model("auto", dataset.kind)
    teacher = build(teacher_name, args.seeds[0])
    teacher.fit(train, seed=args.seeds[0], **SETTINGS[teacher_name])
    probabilities = {t: soft_labels(teacher, train.x, t) for t in args.temperatures}
    students = {}
    for name in args.students:
        runs: dict[str, list[float]] = {"plain": []}
        for seed in args.seeds:
            plain = build(name, seed)
            plain.fit(train, seed=seed, **SETTINGS[name])
            runs["plain"].append(accuracy(plain, test))
            for t in args.temperatures:
                for alpha in args.alphas:
                    student = build(name, seed)
                    fit_distilled(student, train, probabilities[t], temperature=t, alpha=alpha, seed=seed,
                                  **SETTINGS[name])
                    runs.setdefault(f"T={t:g},alpha={alpha:g}", []).append(accuracy(student, test))
        mean = {key: round(sum(values) / len(values), 4) for key, values in runs.items()}
        best = max((key for key in mean if key != "plain"), key=mean.get)
        students[name] = {"plain": mean["plain"], "distilled": {k: v for k, v in mean.items() if k != "plain"},
                          "best": best, "best_gain": round(mean[best] - mean["plain"], 4), "per_seed": runs}
    return {"dataset": dataset_name, "train_examples": len(train), "test_examples": len(test),
            "teacher": {"model": teacher_name, "accuracy": accuracy(teacher, test),
                        "soft_label_entropy_nats": {f"T={t:g}": _entropy(p) for t, p in probabilities.items()}},
            "students": students, "settings": {n: SETTINGS[n] for n in (teacher_name, *args.students)},
            "seeds": args.seeds, "torch_threads": args.threads, "seconds": round(time.perf_counter() - started, 1),
            "cpu": platform.processor() or platform.machine()}


def _entropy(probabilities) -> float:
    """Return the mean entropy of probability rows, in nats."""
    import numpy as np

    return round(float(-np.mean(np.sum(probabilities * np.log(np.maximum(probabilities, 1e-30)), axis=1))), 4)


def main(argv: list[str] | None = None) -> int:
    """Measure every dataset and print one JSON line each."""
    args = parse_args(argv)
    args.temperatures = [float(t) for t in args.temperatures.split(",")]
    args.alphas = [float(a) for a in args.alphas.split(",")]
    args.students = args.students.split(",")
    args.seeds = [int(seed) for seed in args.seeds.split(",")]
    import torch

    torch.set_num_threads(args.threads)
    for name in args.datasets.split(","):
        print(json.dumps(measure(name, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
