"""Run one arm of a comparison, or query the federation, writing everything to the store."""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from clients.data import central_test, load_dataset
from clients.models import build_model
from clients.run_config import ArmRunConfig
from infra.checkpoints import federation_key, load_latest, read_manifest, round_metrics, write_round
from infra.store import Store
from server.strategy import ArmGrid, ClientLevelDp, RecordingFedAvg

log = logging.getLogger("fedcompare.server")


def query_federation(grid: Grid, run: ArmRunConfig, store: Store) -> dict[str, Any]:
    """Ask every connected node what it is and store the answers."""
    node_ids = list(grid.get_node_ids())
    messages = [
        Message(RecordDict({"query": ConfigRecord({"what": "node-info"})}), message_type="query", dst_node_id=node)
        for node in node_ids
    ]
    replies = list(grid.send_and_receive(messages, timeout=run.round_timeout))
    nodes, failures = [], []
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            failures.append({"node_id": node, "reason": reply.error.reason})
        else:
            nodes.append({"node_id": node, **dict(reply.content["node"])})
    answered = {n["node_id"] for n in nodes} | {f["node_id"] for f in failures}
    failures += [{"node_id": n, "reason": "no reply before the timeout"} for n in node_ids if n not in answered]
    answer = {"nodes": sorted(nodes, key=lambda n: n["partition-id"]), "failures": failures, "asked_at": _now()}
    store.put_json(federation_key(run.run_key), answer)
    return answer


def _to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Wrap named numpy arrays in an ArrayRecord, keeping their order."""
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items()))


def _from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unwrap an ArrayRecord into named numpy arrays, keeping their order."""
    return OrderedDict((k, v.numpy()) for k, v in record.items())


def _now() -> str:
    """Return the current UTC time in ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_arm(grid: Grid, run: ArmRunConfig, store: Store) -> None:
    """Train one arm with FedAvg over its nodes, checkpointing every round to the store."""
    random.seed(run.seed)  # Flower's node sampling uses the global `random`
    dataset = load_dataset(run.dataset, label_column=run.label_column)
    test = central_test(dataset, central_test_fraction=run.central_test_fraction, seed=run.seed)
    model = build_model(run.model, input_shape=dataset.input_shape, num_classes=dataset.num_classes,
                        seed=run.seed, device="cpu", private=run.privacy_mode == "sample-level")
    done, initial = _resume_point(store, run, model.get_arrays())
    if done >= run.num_rounds:
        log.info("arm %s: all %d rounds are already in the store; nothing to do", run.arm, run.num_rounds)
        return
    model.set_arrays(initial)
    arm_grid = ArmGrid(grid, run.node_ids)
    num_nodes = len(run.node_ids) or len(list(grid.get_node_ids()))
    strategy = RecordingFedAvg(
        min_train_nodes=num_nodes, min_evaluate_nodes=num_nodes, min_available_nodes=num_nodes,
        evaluate_rounds=None if run.node_evaluation == "every-round" else {run.num_rounds},
        round_offset=done,
        # client-level DP bounds each node's influence on the mean, so the nodes weigh the same
        weighted_by_key="dp-unit-weight" if run.privacy_mode == "client-level" else "num-examples",
    )
    privacy = _Privacy(run, num_nodes, _stored_history(store, run, done), getattr(model, "dp_fixes", []))
    runner = privacy.wrap(strategy)
    arm_config = {k: v for k, v in vars(run).items() if k not in ("mode",)}
    train_config = ConfigRecord(
        {"local-epochs": run.local_epochs, "batch-size": run.batch_size, "learning-rate": run.learning_rate}
    )
    log.info("arm %s: %s on nodes %s for %d rounds", run.arm, run.model, run.node_ids or "all", run.num_rounds)

    def checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Evaluate the global model centrally and write the round to the store."""
        if server_round == 0:
            return None
        server_round += done  # Flower counts the rounds of this attempt from 1
        named = _from_record(arrays)
        model.set_arrays(named)
        evaluated = time.perf_counter()
        central = model.evaluate(test, batch_size=max(run.batch_size, 256))
        central_seconds = time.perf_counter() - evaluated
        record = strategy.rounds[server_round]
        metrics = {
            "round": server_round,
            "arm": run.arm,
            "model": run.model,
            "central": {k: float(v) for k, v in central.items()},
            "federated": _weighted(record.evaluate),
            "nodes": [
                {"node_id": node, "train": record.train.get(node, {}), "evaluate": record.evaluate.get(node, {}),
                 "bytes": record.node_bytes.get(node, {"down": 0, "up": 0})}
                for node in sorted(set(record.train) | set(record.evaluate))
            ],
            "failures": record.failures,
            "bytes_down": record.bytes_down,
            "bytes_up": record.bytes_up,
            "round_seconds": time.time() - record.started,
            "aggregate_seconds": record.aggregate_seconds,
            "central_evaluate_seconds": central_seconds,
            "finished_at": _now(),
            "resumed_after_round": done,
            **privacy.round_record(record),
        }
        write_round(store, run.run_key, run.arm, server_round, named, metrics, arm_config)
        log.info("arm %s round %d: central accuracy %.4f", run.arm, server_round, central["accuracy"])
        return MetricRecord({"accuracy": float(central["accuracy"])})

    runner.start(
        grid=arm_grid,
        initial_arrays=_to_record(model.get_arrays()),
        num_rounds=run.num_rounds - done,
        timeout=run.round_timeout,
        train_config=train_config,
        evaluate_config=ConfigRecord({}),
        evaluate_fn=checkpoint,
    )


class _Privacy:
    """The arm's differential privacy as the server sees it: the client-level wrapper and every round's accounting.

    Sample-level: the nodes run DP-SGD and report their accountant inputs; the round
    records them per node (ε of the arm = max over nodes). Client-level: Flower's
    ``DifferentialPrivacyServerSideFixedClipping`` clips each update to
    ``max_grad_norm`` and adds noise of ``σ·C/n`` to the mean of the ``n`` nodes; when
    only ``m < n`` nodes reply, that noise is ``σ·m/n`` times the mean's sensitivity
    ``C/m``, and the round is accounted with that smaller multiplier.
    """

    def __init__(self, run: ArmRunConfig, num_nodes: int, history: list[list[float]], fixes: list[str]) -> None:
        self.run, self.num_nodes, self.history, self.fixes = run, num_nodes, history, fixes
        self.plan = None
        if run.privacy_mode == "client-level":
            from privacy.accounting import plan_client_level

            self.plan = plan_client_level(num_nodes=num_nodes, sampled_nodes=num_nodes, rounds=run.num_rounds,
                                          clipping_norm=run.max_grad_norm, **run.privacy_kwargs())

    def wrap(self, strategy):
        """Return the strategy to run: ``strategy`` itself, or wrapped for client-level DP."""
        if self.plan is None:
            return strategy
        log.info("arm %s: client-level DP, noise multiplier %.4f, clipping norm %g, %d nodes", self.run.arm,
                 self.plan.noise_multiplier, self.plan.max_grad_norm, self.num_nodes)
        return ClientLevelDp(
            strategy, noise_multiplier=self.plan.noise_multiplier, clipping_norm=self.plan.max_grad_norm,
            num_sampled_clients=self.num_nodes,
        )

    def round_record(self, record) -> dict[str, Any]:
        """Return the ``privacy`` entry of a round's metrics (nothing when the arm is not private)."""
        run = self.run
        if run.privacy_mode == "none":
            return {}
        base = {"mode": run.privacy_mode, "accountant": run.accountant, "delta": run.delta,
                "target_epsilon": run.target_epsilon}
        if run.privacy_mode == "sample-level":
            nodes = {
                str(node): {"noise_multiplier": m["dp-noise-multiplier"], "sample_rate": m["dp-sample-rate"],
                            "steps": int(m["dp-steps"]), "max_grad_norm": m["dp-max-grad-norm"],
                            "epsilon": m["dp-epsilon"], "node_epsilon": m["dp-node-epsilon"]}
                for node, m in sorted(record.train.items()) if "dp-epsilon" in m
            }
            return {"privacy": {**base, "nodes": nodes, "model_fixes": self.fixes}}
        from privacy.accounting import Mechanism, epsilon

        replies = len(record.train)
        effective = self.plan.noise_multiplier * replies / self.num_nodes if replies else None
        if effective:
            self.history.append([effective, self.plan.sample_rate, 1])
        spent = epsilon([Mechanism(*h) for h in self.history], delta=run.delta, accountant=run.accountant)
        return {"privacy": {**base, "noise_multiplier": self.plan.noise_multiplier,
                            "effective_noise_multiplier": effective, "clipping_norm": self.plan.max_grad_norm,
                            "replies": replies, "num_nodes": self.num_nodes,
                            "history": [list(h) for h in self.history], "epsilon": spent}}


def _stored_history(store: Store, run: ArmRunConfig, done: int) -> list[list[float]]:
    """Return the client-level accountant history of the rounds already stored (a resumed arm goes on from it)."""
    if not done or run.privacy_mode != "client-level":
        return []
    last = round_metrics(store, run.run_key, run.arm)[done - 1]
    return [list(h) for h in last.get("privacy", {}).get("history", [])]


def _resume_point(store: Store, run: ArmRunConfig, fresh: dict[str, np.ndarray]) -> tuple[int, dict]:
    """Return (last complete round, its model) from the store, or (0, ``fresh``) for a new arm.

    A retried arm, or a run that resumes an earlier run key, continues after the last
    round whose manifest entry is complete, with the same round numbers (and so the same
    per-round seeds). Every node trains every round (no sampling), so there is no
    sampling sequence to replay.
    """
    manifest = read_manifest(store, run.run_key, run.arm)
    done = manifest["latest_complete_round"] if manifest else 0
    if not done:
        return 0, fresh
    done, arrays, _ = load_latest(store, run.run_key, run.arm)  # verifies the sha256 of every object
    log.info("arm %s: resuming after round %d of %d from %s", run.arm, done, run.num_rounds, store.uri)
    return done, arrays


def _weighted(per_node: dict[int, dict[str, float]]) -> dict[str, float]:
    """Average the nodes' evaluation metrics weighted by their number of examples."""
    total = sum(m.get("num-examples", 0) for m in per_node.values())
    if not total:
        return {}
    keys = {k for m in per_node.values() for k in m if k != "num-examples"}
    return {k: sum(m.get(k, 0.0) * m["num-examples"] for m in per_node.values()) / total for k in sorted(keys)}
