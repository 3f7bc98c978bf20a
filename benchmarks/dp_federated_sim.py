"""Federated DP-SGD without Flower: what the nodes and the server of a sample-level private arm do.

For each round, each node loads the global arrays into a fresh ``build_model(..., private=True)``,
plans its DP-SGD with ``plan_sample_level`` (all rounds × local epochs meet the target ε),
trains with ``model.fit(..., wrap=dp_sgd(plan), seed=seed + round)``, and the server averages
the returned arrays weighted by the nodes' numbers of training examples (FedAvg); the global
model is evaluated on the central test set after every round. ``--central`` also trains the
flow's central DP-SGD reference (``train_centralized`` for rounds × local_epochs epochs).

Prints one JSON line per (ε, arm). Example::

    nice -n 19 python benchmarks/dp_federated_sim.py --epsilons 8 --optimizer sgd --lr 0.05 --central

Diagnostic switches: ``--no-dp`` (plain local training), ``--sigma`` (fixed noise multiplier,
e.g. 0 for clipping without noise; no ε target), ``--partitioning iid``, ``--nodes-train``
(train only these partitions, e.g. one node alone).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="cnn")
    p.add_argument("--dataset", default="mnist", help="a built-in dataset or a file, as data.dataset (default mnist)")
    p.add_argument("--epsilons", default="8")
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--partitioning", default="dirichlet")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--central", action="store_true", help="also train the central DP reference")
    p.add_argument("--central-only", action="store_true")
    p.add_argument("--no-dp", action="store_true")
    p.add_argument("--sigma", type=float, default=None, help="fixed noise multiplier (diagnostic)")
    p.add_argument("--nodes-train", default="", help="comma-separated partitions that train (default all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--central-batch-size", type=int, default=None,
                   help="batch size of the central reference (default --batch-size)")
    p.add_argument("--central-lr", type=float, default=None, help="step size of the central reference (default --lr)")
    p.add_argument("--diag", action="store_true", help="evaluate every node's model and the update geometry")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from clients.centralized import train_centralized
    from clients.data import central_test, load_dataset, node_data
    from clients.models import build_model
    from privacy.accounting import Plan, plan_sample_level
    from privacy.sample_level import dp_sgd

    num_partitions = 4
    data_kwargs = {"scheme": args.partitioning, "seed": args.seed, "alpha": args.alpha, "classes_per_node": 2,
                   "central_test_fraction": 0.2, "local_test_fraction": 0.15}
    dataset = load_dataset(args.dataset)
    test = central_test(dataset, central_test_fraction=0.2, seed=args.seed)
    nodes = [node_data(dataset, partition_id=i, num_partitions=num_partitions, **data_kwargs)[0]
             for i in range(num_partitions)]
    training = [int(s) for s in args.nodes_train.split(",")] if args.nodes_train else list(range(num_partitions))
    epsilons = [None] if args.no_dp else [float(e) for e in args.epsilons.split(",")]
    common = {"dataset": args.dataset, "model": args.model, "optimizer": args.optimizer, "lr": args.lr,
              "epochs": args.epochs, "batch_size": args.batch_size, "max_grad_norm": args.max_grad_norm,
              "rounds": args.rounds, "partitioning": args.partitioning}

    def build():
        return build_model(args.model, input_shape=dataset.input_shape, num_classes=dataset.num_classes,
                           seed=args.seed, device=args.device, private=not args.no_dp)

    for eps in epsilons:
        if not args.central_only:
            start = time.perf_counter()
            server = build()
            global_arrays = server.get_arrays()
            history, sigmas = [], []
            for rnd in range(1, args.rounds + 1):
                replies = []
                for pid in training:
                    train = nodes[pid]
                    wrap = {}
                    if not args.no_dp:
                        if args.sigma is not None:
                            from math import ceil
                            batches = ceil(len(train) / args.batch_size)
                            plan = Plan("sample-level", "rdp", float("inf"), 1e-5, args.sigma, 1.0 / batches,
                                        args.epochs * batches, args.rounds, args.max_grad_norm, False)
                        else:
                            plan = plan_sample_level(num_examples=len(train), batch_size=args.batch_size,
                                                     local_epochs=args.epochs, rounds=args.rounds,
                                                     target_epsilon=eps, delta=1e-5,
                                                     max_grad_norm=args.max_grad_norm, accountant="rdp")
                        sigmas.append(round(plan.noise_multiplier, 3))
                        wrap = {"wrap": dp_sgd(plan)}
                    model = build()
                    model.set_arrays(global_arrays)
                    fit = model.fit(train, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                                    optimizer=args.optimizer, seed=args.seed + rnd, **wrap)
                    replies.append((model.get_arrays(), len(train), fit["train_loss"]))
                    if args.diag:
                        m = model.evaluate(test, batch_size=256)
                        print(json.dumps({"diag": "node", "round": rnd, "pid": pid,
                                          "node_test_acc": round(m["accuracy"], 4),
                                          "node_test_loss": round(m["loss"], 3)}), file=sys.stderr, flush=True)
                total = sum(n for _, n, _ in replies)
                global_arrays = OrderedDict(
                    (k, sum(a[k].astype("float64") * n for a, n, _ in replies) / total)
                    for k in replies[0][0])
                if args.diag:
                    import numpy as np
                    flat = lambda a: np.concatenate([a[k].ravel().astype("float64") for k in a])
                    g0 = flat(server.get_arrays())
                    ups = [flat(a) - g0 for a, _, _ in replies]
                    mean_up = flat(global_arrays) - g0
                    cos = [[round(float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v))), 3) for v in ups] for u in ups]
                    print(json.dumps({"diag": "updates", "round": rnd,
                                      "node_update_norms": [round(float(np.linalg.norm(u)), 3) for u in ups],
                                      "mean_update_norm": round(float(np.linalg.norm(mean_up)), 3),
                                      "global_norm": round(float(np.linalg.norm(g0)), 3), "cos": cos}),
                          file=sys.stderr, flush=True)
                global_arrays = OrderedDict((k, v.astype(replies[0][0][k].dtype)) for k, v in global_arrays.items())
                server.set_arrays(global_arrays)
                metrics = server.evaluate(test, batch_size=256)
                history.append({"round": rnd, "acc": round(metrics["accuracy"], 4),
                                "loss": round(metrics["loss"], 3),
                                "node_train_loss": [round(l, 3) for _, _, l in replies]})
                print(json.dumps({"progress": "fed", "eps": eps, **history[-1]}), file=sys.stderr, flush=True)
            print(json.dumps({"arm": "federated", "eps": eps, **common, "accuracy": history[-1]["acc"],
                              "per_round": [h["acc"] for h in history], "sigma": sorted(set(sigmas)),
                              "node_sizes": [len(nodes[i]) for i in training],
                              "seconds": round(time.perf_counter() - start, 1), "history": history}), flush=True)
        if args.central or args.central_only:
            start = time.perf_counter()
            dp = None if eps is None else {"target_epsilon": eps, "delta": 1e-5,
                                           "max_grad_norm": args.max_grad_norm, "accountant": "rdp"}
            ref = train_centralized(dataset, model_name=args.model, partition_ids=tuple(range(num_partitions)),
                                    num_partitions=num_partitions, epochs=args.rounds * args.epochs,
                                    batch_size=args.central_batch_size or args.batch_size,
                                    learning_rate=args.central_lr or args.lr, seed=args.seed,
                                    optimizer=args.optimizer, data_kwargs=data_kwargs, dp=dp)
            print(json.dumps({"arm": "central", "eps": eps, **common, "accuracy": round(ref["accuracy"], 4),
                              "central_batch_size": args.central_batch_size or args.batch_size,
                              "central_lr": args.central_lr or args.lr,
                              "sigma": round(ref.get("privacy", {}).get("noise_multiplier", 0.0), 3),
                              "num_examples": ref["num_examples"],
                              "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
