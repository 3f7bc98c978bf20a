"""The arm's strategy: FedAvg or a robust rule, recording every node's reply, bytes and failures."""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping, FedAvg, FedMedian, FedTrimmedAvg, Krum,
)
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from clients.models import restore_sums


TEACHER = "teacher"  # the ArrayRecord of a distilled arm's teacher in its training messages


def serialized_bytes(content: RecordDict) -> int:
    """Return the bytes Flower sends for a message's content: every nested object, serialized.

    Flower ships a message as a tree of serialized objects (records, arrays, ...); this is
    the sum of their serialized sizes, the payload on the wire before transport framing.
    """
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


@dataclass
class RoundLog:
    """What happened in one round, as seen by the server."""

    started: float = 0.0
    trained: float = 0.0
    aggregate_seconds: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0
    node_bytes: dict[int, dict[str, int]] = field(default_factory=dict)  # node -> {"down": n, "up": n}
    train: dict[int, dict[str, float]] = field(default_factory=dict)
    evaluate: dict[int, dict[str, float]] = field(default_factory=dict)
    failures: list[dict[str, object]] = field(default_factory=list)

    def count(self, node: int, direction: str, size: int) -> None:
        """Add ``size`` bytes sent to ("down") or received from ("up") ``node``."""
        per_node = self.node_bytes.setdefault(node, {"down": 0, "up": 0})
        per_node[direction] += size
        if direction == "down":
            self.bytes_down += size
        else:
            self.bytes_up += size


class Recording(FedAvg):
    """Mixin over FedAvg or one of its robust subclasses: records per-node metrics, bytes and timings of every round.

    Put it first among the bases (``class X(Recording, FedMedian)``) so it wraps the
    base's methods. ``teacher``: the arrays of a distilled arm's teacher, added to every
    training message (and counted in its bytes). ``summed``: the arrays that are sums over
    examples (naive Bayes counts): nodes send them as shares, and the aggregate is
    multiplied by the round's examples (exact under FedAvg, approximate under a robust rule). ``evaluate_rounds`` says after which rounds the nodes evaluate the
    global model on their local test split (every round when None); the server evaluates
    it centrally after every round regardless. Rounds are the run's own numbers (a run that
    resumes after round 3 goes on with round 4), for the nodes and the records alike.
    """

    def __init__(self, *, evaluate_rounds: set[int] | None = None, teacher: ArrayRecord | None = None,
                 summed: tuple[str, ...] = (), sampling_seed: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sampling_seed = sampling_seed  # seeds each round's node sample (Flower samples with `random`)
        self.evaluate_rounds = evaluate_rounds
        self.teacher = teacher  # a distilled arm's teacher model: sent with every training message as "teacher"
        self.summed = summed  # arrays the nodes send as shares of their examples: the mean is multiplied back
        self.rounds: dict[int, RoundLog] = {}

    def evaluates(self, server_round: int) -> bool:
        """Return whether the nodes evaluate after round ``server_round``."""
        return self.evaluate_rounds is None or server_round in self.evaluate_rounds

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample the arm's nodes and note the bytes each training message carries."""
        log = self.rounds.setdefault(server_round, RoundLog())
        log.started = log.started or time.time()  # a retried round counts from its first attempt
        self._seed_sample("train", server_round)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for message in messages:
            if self.teacher is not None:
                message.content[TEACHER] = self.teacher
            log.count(message.metadata.dst_node_id, "down", serialized_bytes(message.content))
        return messages

    def _seed_sample(self, phase: str, server_round: int) -> None:
        """Seed Flower's node sampling for ``phase`` of ``server_round``: a resumed run samples as the first did."""
        if self.sampling_seed is not None:
            random.seed(f"{self.sampling_seed}-{phase}-{server_round}")

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Keep each node's training metrics, then aggregate as the base strategy does.

        Replies are aggregated in node-id order, not arrival order: floating-point sums
        depend on the order, and a seeded run should give the same model every time.
        """
        replies = sorted(replies, key=lambda reply: reply.metadata.src_node_id)
        log = self.rounds.setdefault(server_round, RoundLog())
        log.trained = time.time()
        self._record(server_round, replies, "train", log.train)
        started = time.perf_counter()
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and self.summed:  # exact sums under FedAvg (clients.models.restore_sums)
            total = int(sum(reply.content["metrics"]["num-examples"] for reply in replies if not reply.has_error()))
            named = restore_sums({k: v.numpy() for k, v in arrays.items()}, total, self.summed)
            arrays = ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in named.items()))
        log.aggregate_seconds = time.perf_counter() - started
        return arrays, metrics

    def _record(self, server_round: int, replies: list[Message], phase: str, into: dict) -> None:
        """Note the failed replies of ``phase`` and each answering node's metrics and bytes."""
        self.note_failures(server_round, replies, phase)
        for reply in replies:
            if not reply.has_error():
                into[reply.metadata.src_node_id] = dict(reply.content["metrics"])
        self.count_replies(server_round, replies)

    def note_failures(self, server_round: int, replies: Iterable[Message], phase: str) -> None:
        """Record the error replies of ``phase`` in round ``server_round`` with their reasons."""
        for reply in replies:
            if reply.has_error():
                self.note_failure(server_round, reply.metadata.src_node_id, phase, reply.error.reason)

    def note_failure(self, server_round: int, node: int, phase: str, reason: str) -> None:
        """Record that ``node`` gave no usable reply in ``phase`` of round ``server_round``."""
        log = self.rounds.setdefault(server_round, RoundLog())
        log.failures.append({"node_id": node, "phase": phase, "reason": reason})

    def count_replies(self, server_round: int, replies: Iterable[Message]) -> None:
        """Add the bytes of the replies that carry content to round ``server_round``."""
        log = self.rounds.setdefault(server_round, RoundLog())
        for reply in replies:
            if not reply.has_error():
                log.count(reply.metadata.src_node_id, "up", serialized_bytes(reply.content))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample the arm's nodes for evaluation and note the bytes sent."""
        if not self.evaluates(server_round):
            return []
        self._seed_sample("evaluate", server_round)
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        log = self.rounds.setdefault(server_round, RoundLog())
        for message in messages:
            log.count(message.metadata.dst_node_id, "down", serialized_bytes(message.content))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Keep each node's evaluation metrics, then average them weighted by test examples."""
        replies = sorted(replies, key=lambda reply: reply.metadata.src_node_id)
        log = self.rounds.setdefault(server_round, RoundLog())
        self._record(server_round, replies, "evaluate", log.evaluate)
        # Evaluation is weighted by test examples even when training uses another key
        # (client-level DP averages updates with equal weights, evaluation replies lack that key).
        train_key, self.weighted_by_key = self.weighted_by_key, "num-examples"
        try:
            return super().aggregate_evaluate(server_round, replies)
        finally:
            self.weighted_by_key = train_key


class RecordingFedAvg(Recording, FedAvg):
    """FedAvg (the mean weighted by ``weighted_by_key``) that records every round."""


class RecordingFedMedian(Recording, FedMedian):
    """Flower's FedMedian (coordinate-wise median of the updates) that records every round."""


class RecordingFedTrimmedAvg(Recording, FedTrimmedAvg):
    """Flower's FedTrimmedAvg (mean after cutting ``beta`` of each tail, per coordinate) that records every round."""


class RecordingKrum(Recording, Krum):
    """Flower's Krum (the one update closest to its neighbours) that records every round."""


AGGREGATIONS: dict[str, type[Recording]] = {
    "fedavg": RecordingFedAvg,
    "fedmedian": RecordingFedMedian,
    "trimmed-mean": RecordingFedTrimmedAvg,
    "krum": RecordingKrum,
}


def recording_strategy(aggregation: str, *, trim_fraction: float = 0.2, krum_byzantine: int = 0,
                       **kwargs) -> Recording:
    """Return the recording strategy for ``aggregation`` (a key of ``AGGREGATIONS``) built with ``kwargs``.

    ``trim_fraction`` is trimmed-mean's share cut from each tail (Flower's ``beta``),
    ``krum_byzantine`` the bad nodes Krum tolerates (Flower's ``num_malicious_nodes``); each
    applies to its rule only.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(
            f"aggregation: expected one of {', '.join(AGGREGATIONS)}, got {aggregation!r}: "
            "set the arm's aggregation to one of them"
        )
    own = {"trimmed-mean": {"beta": trim_fraction}, "krum": {"num_malicious_nodes": krum_byzantine}}
    return AGGREGATIONS[aggregation](**own.get(aggregation, {}), **kwargs)


class ClientLevelDp(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping DP around a recording FedAvg, going on when some nodes fail.

    Flower's wrapper skips a round's aggregation when any reply is an error; here the
    failed replies are recorded and the round aggregates the others. Flower scales the
    noise to ``num_sampled_clients`` (std = noise multiplier × clipping norm / nodes, for a
    mean over that many nodes); a round with fewer replies averages fewer updates, so each
    has more weight: the noise is scaled to the replies actually averaged, which keeps the
    noise multiplier — and the ε the arm accounts per round — the same however many replied.
    """

    strategy: Recording

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record the failed replies, then clip, average and noise the others."""
        replies = list(replies)
        self.strategy.note_failures(server_round, replies, "train")
        answered = [reply for reply in replies if not reply.has_error()]
        if not answered:
            self._pop_pending_event(server_round)
            return None, None
        planned, self.num_sampled_clients = self.num_sampled_clients, len(answered)
        try:
            return super().aggregate_train(server_round, answered)
        finally:
            self.num_sampled_clients = planned
