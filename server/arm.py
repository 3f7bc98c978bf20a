"""Run one arm of a comparison, or query the federation, writing everything to the store."""

from __future__ import annotations

import json
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from clients.data import central_test, load_dataset
from clients.models import build_model, summed_arrays
from clients.preprocess import PreprocessingError, merge_stats, prepare
from clients.spec import RunSpec
from infra.checkpoints import (
    CheckpointError, federation_key, load_latest, load_latest_good, read_manifest, rewind, round_metrics, run_source,
    write_round,
)
from infra.store import Store
from server._grid import SIMULATION_POLL_S, ArmGrid, node_info_messages, simulation_window
from server.rounds import RoundPolicy, run_rounds
from server.strategy import ClientLevelDp, Recording, recording_strategy

log = logging.getLogger("fedcompare.server")

# Run-config keys left out of the checkpoint's config hash: which node ids serve the arm (a restarted node
# comes back under a new id), how long a round waits and how many replies it needs do not change the model
# the arm trains, so a run may resume with other values of them. The submitter's git commit and dirty state
# describe the code, not the config: they go to the checkpoint's "code", and a retry may come from an edit.
_NOT_HASHED = ("mode", "nodes", "round-timeout-s", "min-replies", "git-commit", "git-dirty")
_DIRTY = {"yes": True, "no": False, "unknown": None}


def query_federation(grid: Grid, run: RunSpec, store: Store) -> dict[str, Any]:
    """Ask every connected node what it is and store the answers."""
    node_ids = list(grid.get_node_ids())
    # fedcompare's grid: it asks for the replies every REPLY_POLL_S, where Flower's waits 3 s between polls
    replies = list(ArmGrid(grid, node_ids).send_and_receive(node_info_messages(node_ids),
                                                             timeout=run.training.round_timeout_s))
    nodes, failures = [], []
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            failures.append({"node_id": node, "reason": reply.error.reason})
        else:
            nodes.append({"node_id": node, **dict(reply.content["node"])})
    answered = {n["node_id"] for n in nodes} | {f["node_id"] for f in failures}
    failures += [{"node_id": n, "reason": "no reply before the timeout"} for n in node_ids if n not in answered]
    nodes.sort(key=lambda n: n["partition-id"])
    answer = {"nodes": nodes, "failures": failures, "asked_at": _now(), **_federated_statistics(nodes, run)}
    store.put_json(federation_key(run.run_key), answer)
    return answer


def _federated_statistics(nodes: list[dict[str, Any]], run: RunSpec) -> dict[str, Any]:
    """Add up the nodes' preprocessing statistics (and take them off the node entries): only the sums are stored."""
    parts = [(f"node {n['node_id']}", json.loads(n.pop("preprocessing-stats"))) for n in nodes
             if "preprocessing-stats" in n]
    if not run.wants_statistics or not parts:
        return {}
    try:
        return {"preprocessing_stats": merge_stats([p for _, p in parts], names=[name for name, _ in parts])}
    except PreprocessingError as err:
        return {"preprocessing_error": str(err)}


def _to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Wrap named numpy arrays in an ArrayRecord, keeping their order."""
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items()))


def _from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unwrap an ArrayRecord into named numpy arrays, keeping their order."""
    return OrderedDict((k, v.numpy()) for k, v in record.items())


def _now() -> str:
    """Return the current UTC time in ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_arm(grid: Grid, run: RunSpec, store: Store) -> None:
    """Train one arm over its nodes with the arm's aggregation, checkpointing every round to the store."""
    source = run_source(git_commit=run.git_commit, git_dirty=_DIRTY[run.git_dirty], fab_hash=grid.run.fab_hash or None)
    random.seed(run.seed)  # Flower's node sampling uses the global `random`
    data, training = run.data, run.training
    dataset = prepare(load_dataset(data.dataset, **data.load_kwargs()), run.preprocessing_spec)
    test = central_test(dataset, central_test_fraction=data.central_test_fraction, seed=run.seed)
    model = build_model(training.model, input_shape=dataset.input_shape, num_classes=dataset.num_classes,
                        seed=run.seed, device="cpu", private=run.private)
    done, initial, discarded = _resume_point(store, run, model.get_arrays())
    if done >= run.rounds:
        log.info("arm %s: all %d rounds are already in the store; nothing to do", run.arm, run.rounds)
        return
    model.set_arrays(initial)
    if run.simulated:
        members, partitions = _virtual_nodes(grid, run)
        arm_grid = ArmGrid(grid, members, partitions=partitions, poll_s=SIMULATION_POLL_S, by_partition=True,
                           window=simulation_window)
    else:
        arm_grid = ArmGrid(grid, run.nodes, partitions=_node_partitions(store, run))
    num_nodes = len(arm_grid.members) or len(list(grid.get_node_ids()))
    sampled = _sampled_nodes(run, num_nodes)
    _check_min_replies(run, sampled)
    strategy = recording_strategy(
        training.aggregation, trim_fraction=training.trim_fraction, krum_byzantine=training.krum_byzantine,
        teacher=_teacher(store, run), summed=summed_arrays(training.model),
        # the round loop picks the nodes of each round and bounds every wait, so Flower's own minimums are off
        min_available_nodes=0, **_sampling(run),
        evaluate_rounds=None if run.node_evaluation == "every-round" else {run.rounds},
        # client-level DP bounds each node's influence on the mean, so the nodes weigh the same
        weighted_by_key="dp-unit-weight" if run.privacy.mode == "client-level" else "num-examples",
    )
    _log_aggregation(run, strategy, num_nodes)
    privacy = _Privacy(run, num_nodes, _stored_history(store, run, done), getattr(model, "dp_fixes", []),
                       sampled=sampled)
    runner = privacy.wrap(strategy)
    arm_config = {k: v for k, v in run.to_run_config().items() if k not in _NOT_HASHED}
    model_meta = {"name": training.model, "args": {"input_shape": list(dataset.input_shape),
                                                   "num_classes": dataset.num_classes, "seed": run.seed,
                                                   "private": run.private}}
    log.info("arm %s: %s on nodes %s for %d rounds", run.arm, training.model, run.nodes or "all", run.rounds)

    def checkpoint(server_round: int, arrays: ArrayRecord) -> Callable[[], None]:
        """Take the round's record now; return the step that evaluates the global model and writes the round.

        The record (and the privacy spent, which the next round adds to) is read here, on the round
        loop's thread; the returned step runs beside the next round (`run_rounds`).
        """
        named = _from_record(arrays)
        record = strategy.rounds[server_round]
        metrics = {
            "round": server_round,
            "arm": run.arm,
            "model": training.model,
            "federated": _weighted(record.evaluate),
            "nodes": [
                {"node_id": node, "train": record.train.get(node, {}), "evaluate": record.evaluate.get(node, {}),
                 "bytes": record.node_bytes.get(node, {"down": 0, "up": 0})}
                for node in sorted(set(record.train) | set(record.evaluate))
            ],
            "failures": list(record.failures),
            "bytes_down": record.bytes_down,
            "bytes_up": record.bytes_up,
            # from the round's first message to its aggregate: central evaluation overlaps the next round
            "round_seconds": time.time() - record.started,
            "aggregate_seconds": record.aggregate_seconds,
            "resumed_after_round": done,
            # rounds of an earlier attempt that failed verification and were trained again (first round only)
            "discarded_rounds": discarded if server_round == done + 1 else [],
            **privacy.round_record(record),
            **_virtual_sample(run, record, num_nodes),
        }

        def evaluate_and_write() -> None:
            model.set_arrays(named)
            evaluated = time.perf_counter()
            central = model.evaluate(test, batch_size=max(training.batch_size, 256))
            written = {**metrics, "central": {k: float(v) for k, v in central.items()},
                       "central_evaluate_seconds": time.perf_counter() - evaluated, "finished_at": _now()}
            write_round(store, run.run_key, run.arm, server_round, named, written, arm_config,
                        meta={"model": model_meta, "privacy": written.get("privacy")},
                        score=float(central["accuracy"]), keep_last=run.keep_last_rounds, source=source)
            log.info("arm %s round %d: central accuracy %.4f", run.arm, server_round, central["accuracy"])

        return evaluate_and_write

    run_rounds(
        runner, strategy, arm_grid, arm=run.arm,
        arrays=_to_record(model.get_arrays()),
        rounds=range(done + 1, run.rounds + 1),  # the run's round numbers: a resumed run goes on after ``done``
        policy=RoundPolicy(timeout_s=training.round_timeout_s, min_replies=training.min_replies,
                           max_update_norm=training.max_update_norm),
        train_config=ConfigRecord({}),  # per-round messages carry only the round; the nodes read the run spec
        evaluate_config=ConfigRecord({}),
        evaluate_fn=checkpoint,
    )


def _virtual_nodes(grid: Grid, run: RunSpec) -> tuple[list[int], dict[int, int]]:
    """Return the arm's virtual nodes (those of its tier, or all) and every virtual node's partition.

    Flower's Simulation Engine gives the virtual nodes fresh random ids in every run and tells
    the ServerApp no partition, so each is asked once (a cheap query). Knowing the partitions,
    the rounds sample partitions, not ids: the same seed samples the same virtual nodes in
    every run, a resumed one and the other arms included.
    """
    node_ids = list(grid.get_node_ids())
    started = time.perf_counter()
    replies = list(ArmGrid(grid, node_ids, poll_s=SIMULATION_POLL_S, window=simulation_window).send_and_receive(
        node_info_messages(node_ids), timeout=run.training.round_timeout_s))
    answers = {reply.metadata.src_node_id: reply.content["node"] for reply in replies if not reply.has_error()}
    if len(answers) < len(node_ids):
        reason = next((reply.error.reason for reply in replies if reply.has_error()), "no reply before the timeout")
        raise RuntimeError(f"arm {run.arm}: {len(node_ids) - len(answers)} of {len(node_ids)} virtual nodes did not "
                           f"say which partition they hold ({' '.join(str(reason).split())[:300]})")
    partitions = {node: int(answer["partition-id"]) for node, answer in answers.items()}
    tier = run.simulation.tier
    chosen = [node for node, answer in answers.items() if not tier or answer["tier"] == tier]
    log.info("arm %s: %d of %d virtual nodes%s, their partitions learnt in %.1f s", run.arm, len(chosen),
             len(node_ids), f" are of tier {tier}" if tier else "", time.perf_counter() - started)
    if not chosen:
        raise ValueError(f"arm {run.arm}: no virtual node of tier {tier!r} among {len(node_ids)} (gpu share "
                         f"{run.simulation.gpu_share:g}): raise or lower the simulation's gpu_share")
    return chosen, partitions


def _sampling(run: RunSpec) -> dict[str, float | int]:
    """Return the strategy's node sampling: a seeded share of a simulation's virtual nodes, every real node."""
    if not run.simulated:
        return {"min_train_nodes": 0, "min_evaluate_nodes": 0}
    sim = run.simulation
    return {"fraction_train": sim.fraction_train, "min_train_nodes": sim.min_train_nodes,
            "fraction_evaluate": sim.fraction_evaluate, "min_evaluate_nodes": sim.min_evaluate_nodes,
            "sampling_seed": run.seed}


def _sampled_nodes(run: RunSpec, num_nodes: int) -> int:
    """Return how many nodes train each round: every node, or a simulation's sample of them."""
    if not run.simulated:
        return num_nodes
    sim = run.simulation
    return sim.sample_size(num_nodes, sim.fraction_train, sim.min_train_nodes)


def _virtual_sample(run: RunSpec, record, num_nodes: int) -> dict[str, Any]:
    """Return a simulated round's sample: the partitions (virtual nodes) that trained and evaluated."""
    if not run.simulated:
        return {}

    def partitions(replies: dict[int, dict[str, float]]) -> list[int]:
        return sorted(int(m["partition-id"]) for m in replies.values() if "partition-id" in m)

    return {"virtual_nodes": {"available": num_nodes, "train": partitions(record.train),
                              "evaluate": partitions(record.evaluate)}}


def _teacher(store: Store, run: RunSpec) -> ArrayRecord | None:
    """Return the final global model of the arm that teaches this one (None: the arm is not distilled)."""
    if not run.teacher_arm:
        return None
    try:
        taught_round, arrays, _ = load_latest(store, run.run_key, run.teacher_arm)
    except CheckpointError as exc:
        raise ValueError(f"arm {run.arm} is distilled from arm {run.teacher_arm}, which has no model in the store "
                         f"({exc}): train the teacher arm first") from None
    log.info("arm %s: distilled from arm %s's round-%d model (%s), T=%g, alpha=%g", run.arm, run.teacher_arm,
             taught_round, run.teacher_model, run.distill.temperature, run.distill.alpha)
    return _to_record(arrays)


def _node_partitions(store: Store, run: RunSpec) -> dict[int, int | None]:
    """Return node id -> partition id of the nodes the flow's node query found (None: asked, no answer).

    The arm grid uses it to recognise a restarted node (new id, same partition) without
    asking the nodes it already knows. Empty when the run has no node query.
    """
    key = federation_key(run.run_key)
    if not store.exists(key):
        log.info("arm %s: no node query under run key %s; a restarted node cannot rejoin this arm", run.arm,
                 run.run_key)
        return {}
    answer = store.get_json(key)
    known: dict[int, int | None] = {int(f["node_id"]): None for f in answer.get("failures", [])}
    known.update({int(n["node_id"]): int(n["partition-id"]) for n in answer["nodes"]})
    return known


def _check_min_replies(run: RunSpec, num_nodes: int) -> None:
    """Fail when the arm needs more valid replies per round than it has nodes (sampled nodes, in a simulation)."""
    if run.training.min_replies > num_nodes:
        what = "nodes sampled per round" if run.simulated else "nodes"
        raise ValueError(
            f"arm {run.arm}: min_replies {run.training.min_replies} exceeds the arm's {num_nodes} {what}: set the "
            f"arm's min_replies to at most {num_nodes}, or give the arm more nodes"
        )


def _log_aggregation(run: RunSpec, strategy: Recording, num_nodes: int) -> None:
    """Log the arm's aggregation and the round rules, warning when trimmed-mean would trim nothing."""
    training = run.training
    log.info("arm %s: %s aggregation, at least %d valid replies per round, update norm bound %s, timeout %g s",
             run.arm, training.aggregation, training.min_replies, training.max_update_norm or "none",
             training.round_timeout_s)
    beta = getattr(strategy, "beta", None)  # FedTrimmedAvg's share cut from each tail
    if beta is not None and int(beta * num_nodes) == 0:
        log.warning("arm %s: trimmed-mean cuts %g of each tail, which is no node of %d: it is the plain "
                    "mean of the updates here", run.arm, beta, num_nodes)


class _Privacy:
    """The arm's differential privacy as the server sees it: the client-level wrapper and every round's accounting.

    Sample-level: the nodes run DP-SGD and report their accountant inputs; the round
    records them per node (ε of the arm = max over nodes). Client-level: Flower's
    ``DifferentialPrivacyServerSideFixedClipping`` clips each update to
    ``max_grad_norm`` and ``ClientLevelDp`` adds noise of ``σ·C/m`` to the mean of the ``m``
    nodes that replied (the mean's sensitivity is ``C/m``), so every released round is
    accounted with the planned multiplier ``σ``; a round without replies releases nothing.
    """

    def __init__(self, run: RunSpec, num_nodes: int, history: list[list[float]], fixes: list[str], *,
                 sampled: int) -> None:
        self.run, self.num_nodes, self.history, self.fixes = run, num_nodes, history, fixes
        self.sampled = sampled  # nodes per round: all, or a simulation's sample (the accountant's q = sampled / nodes)
        self.plan = None
        if run.privacy.mode == "client-level":
            from privacy.accounting import plan_client_level

            self.plan = plan_client_level(num_nodes=num_nodes, sampled_nodes=sampled, rounds=run.rounds,
                                          clipping_norm=run.privacy.max_grad_norm,
                                          **run.privacy.accounting_kwargs())

    def wrap(self, strategy: Recording):
        """Return the strategy to run: ``strategy`` itself, or wrapped for client-level DP."""
        if self.plan is None:
            return strategy
        log.info("arm %s: client-level DP, noise multiplier %.4f, clipping norm %g, %d nodes", self.run.arm,
                 self.plan.noise_multiplier, self.plan.max_grad_norm, self.num_nodes)
        return ClientLevelDp(
            strategy, noise_multiplier=self.plan.noise_multiplier, clipping_norm=self.plan.max_grad_norm,
            num_sampled_clients=self.sampled,
        )

    def round_record(self, record) -> dict[str, Any]:
        """Return the ``privacy`` entry of a round's metrics (nothing when the arm is not private)."""
        privacy = self.run.privacy
        if privacy.mode == "none":
            return {}
        base = {"mode": privacy.mode, "accountant": privacy.accountant, "delta": privacy.delta,
                "target_epsilon": privacy.target_epsilon}
        if privacy.mode == "sample-level":
            nodes = {
                str(node): {"noise_multiplier": m["dp-noise-multiplier"], "sample_rate": m["dp-sample-rate"],
                            "steps": int(m["dp-steps"]), "max_grad_norm": m["dp-max-grad-norm"],
                            "epsilon": m["dp-epsilon"], "node_epsilon": m["dp-node-epsilon"],
                            **({"partition_id": int(m["partition-id"])} if "partition-id" in m else {})}
                for node, m in sorted(record.train.items()) if "dp-epsilon" in m
            }
            return {"privacy": {**base, "nodes": nodes, "model_fixes": self.fixes}}
        from privacy.accounting import Mechanism, epsilon

        replies = len(record.train)
        # ClientLevelDp scales the noise to the replies it averaged: a released round has the planned multiplier
        effective = self.plan.noise_multiplier if replies else None  # kept in the metrics: None = nothing released
        if replies:
            self.history.append([self.plan.noise_multiplier, self.plan.sample_rate, 1])
        spent = epsilon([Mechanism(*h) for h in self.history], delta=privacy.delta, accountant=privacy.accountant)
        return {"privacy": {**base, "noise_multiplier": self.plan.noise_multiplier,
                            "effective_noise_multiplier": effective, "clipping_norm": self.plan.max_grad_norm,
                            "replies": replies, "num_nodes": self.num_nodes,
                            "history": [list(h) for h in self.history], "epsilon": spent}}


def _stored_history(store: Store, run: RunSpec, done: int) -> list[list[float]]:
    """Return the client-level accountant history of the rounds already stored (a resumed arm goes on from it)."""
    if not done or run.privacy.mode != "client-level":
        return []
    last = round_metrics(store, run.run_key, run.arm)[done - 1]
    return [list(h) for h in last.get("privacy", {}).get("history", [])]


def _resume_point(store: Store, run: RunSpec,
                  fresh: dict[str, np.ndarray]) -> tuple[int, dict, list[dict[str, Any]]]:
    """Return (last good round, its model, the newer rounds discarded) from the store; (0, ``fresh``, []) for a new arm.

    A retried arm, or a run that resumes an earlier run key, continues after the newest
    round whose objects all verify (sha256), with the same round numbers (and so the same
    per-round seeds). Newer rounds that are corrupt, missing or pruned are reported,
    discarded from the manifest and trained again. Real nodes all train every round; a
    simulation samples its virtual nodes' partitions with a per-round seed, so a resumed
    simulation trains the same partitions in each round as the first attempt would have.
    """
    manifest = read_manifest(store, run.run_key, run.arm)
    if not manifest or not manifest["latest_complete_round"]:
        return 0, fresh, []
    try:
        good = load_latest_good(store, run.run_key, run.arm)
        done, arrays, skipped = good.round, good.arrays, good.skipped
    except CheckpointError as exc:  # no stored round verifies: start over
        log.warning("arm %s: %s; starting again from round 1", run.arm, exc)
        done, arrays = 0, fresh
        skipped = ()
    discarded = [{"round": s.round, "reason": s.reason, "detail": s.detail} for s in skipped]
    if discarded or not done:
        for entry in discarded:
            log.warning("arm %s: round %d in %s is %s (%s); it is trained again", run.arm, entry["round"],
                        store.uri, entry["reason"], entry["detail"])
        reason = "; ".join(f"round {e['round']}: {e['reason']} ({e['detail']})" for e in discarded) or \
            "no stored round verifies"
        rewind(store, run.run_key, run.arm, done, reason)
    if done:
        log.info("arm %s: resuming after round %d of %d from %s", run.arm, done, run.rounds, store.uri)
    return done, arrays, discarded


def _weighted(per_node: dict[int, dict[str, float]]) -> dict[str, float]:
    """Average the nodes' evaluation metrics weighted by their number of examples."""
    total = sum(m.get("num-examples", 0) for m in per_node.values())
    if not total:
        return {}
    keys = {k for m in per_node.values() for k in m if k != "num-examples"}
    return {k: sum(m.get(k, 0.0) * m["num-examples"] for m in per_node.values()) / total for k in sorted(keys)}
