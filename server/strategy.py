"""FedAvg for one arm: trains only on the arm's nodes and keeps every node's reply."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

# Flower's grid polls the SuperLink for replies every 3 s; a round waits for its replies
# twice (train, evaluate), so that alone adds up to 6 s per round on a fast network.
# Polling every 0.25 s costs one small local HTTP request per poll.
REPLY_POLL_S = 0.25

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects


class ArmGrid(Grid):
    """A view of the grid that shows only the nodes assigned to one arm."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid = grid
        self._node_ids = list(node_ids)

    def set_run(self, run):  # noqa: D102 - delegation
        return self._grid.set_run(run)

    @property
    def run(self):  # noqa: D102 - delegation
        return self._grid.run

    def create_message(self, *args, **kwargs):  # noqa: D102 - delegation
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        """Return the arm's nodes that are connected now (all connected nodes if none named)."""
        connected = list(self._grid.get_node_ids())
        if not self._node_ids:
            return connected
        return [node for node in self._node_ids if node in set(connected)]

    def get_nodes(self):  # noqa: D102 - delegation
        return self._grid.get_nodes()

    def push_messages(self, messages):  # noqa: D102 - delegation
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):  # noqa: D102 - delegation
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        """Push ``messages`` and collect their replies until all arrived or ``timeout`` passed.

        Same contract as Flower's ``Grid.send_and_receive`` (replies that miss the timeout
        are left out), with a shorter poll interval (``REPLY_POLL_S``).
        """
        messages = list(messages)
        if not messages:
            return []
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            arrived = list(self._grid.pull_messages(pending))
            replies.extend(arrived)
            pending.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(REPLY_POLL_S)
        return replies


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


class RecordingFedAvg(FedAvg):
    """FedAvg that records per-node metrics, bytes and timings of every round.

    ``evaluate_rounds`` says after which rounds the nodes evaluate the global model on
    their local test split (every round when None); the server evaluates it centrally
    after every round regardless. ``round_offset`` renumbers rounds when a run resumes
    after round ``round_offset``: Flower counts from 1 again, the nodes and the records
    see the run's own numbering (so per-round seeds stay the same).
    """

    def __init__(self, *, evaluate_rounds: set[int] | None = None, round_offset: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.evaluate_rounds = evaluate_rounds
        self.round_offset = round_offset
        self.rounds: dict[int, RoundLog] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample the arm's nodes and note the bytes each training message carries."""
        server_round += self.round_offset
        log = self.rounds.setdefault(server_round, RoundLog())
        log.started = time.time()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for message in messages:
            log.count(message.metadata.dst_node_id, "down", serialized_bytes(message.content))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Keep each node's training metrics, then average as FedAvg does.

        Replies are averaged in node-id order, not arrival order: floating-point sums
        depend on the order, and a seeded run should give the same model every time.
        """
        server_round += self.round_offset
        replies = sorted(replies, key=lambda reply: reply.metadata.src_node_id)
        log = self.rounds[server_round]
        log.trained = time.time()
        self._record(server_round, replies, "train", log.train)
        started = time.perf_counter()
        result = super().aggregate_train(server_round, replies)
        log.aggregate_seconds = time.perf_counter() - started
        return result

    def _record(self, server_round: int, replies: list[Message], phase: str, into: dict) -> None:
        """Note the failed replies of ``phase`` and each answering node's metrics and bytes (run numbering)."""
        log = self.rounds[server_round]
        self.note_failures(server_round - self.round_offset, replies, phase)
        for reply in replies:
            if not reply.has_error():
                into[reply.metadata.src_node_id] = dict(reply.content["metrics"])
                log.count(reply.metadata.src_node_id, "up", serialized_bytes(reply.content))

    def note_failures(self, server_round: int, replies: Iterable[Message], phase: str) -> None:
        """Record the error replies of ``phase`` in round ``server_round`` (Flower's count) with their reasons."""
        log = self.rounds.setdefault(server_round + self.round_offset, RoundLog())
        for reply in replies:
            if reply.has_error():
                log.failures.append(
                    {"node_id": reply.metadata.src_node_id, "phase": phase, "reason": reply.error.reason})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample the arm's nodes for evaluation and note the bytes sent."""
        server_round += self.round_offset
        if self.evaluate_rounds is not None and server_round not in self.evaluate_rounds:
            return []
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        log = self.rounds.setdefault(server_round, RoundLog())
        for message in messages:
            log.count(message.metadata.dst_node_id, "down", serialized_bytes(message.content))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Keep each node's evaluation metrics, then average them weighted by test examples."""
        server_round += self.round_offset
        replies = list(replies)
        log = self.rounds.setdefault(server_round, RoundLog())
        self._record(server_round, replies, "evaluate", log.evaluate)
        # Evaluation is weighted by test examples even when training uses another key
        # (client-level DP averages updates with equal weights, evaluation replies lack that key).
        train_key, self.weighted_by_key = self.weighted_by_key, "num-examples"
        try:
            return super().aggregate_evaluate(server_round, replies)
        finally:
            self.weighted_by_key = train_key


class ClientLevelDp(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping DP around a ``RecordingFedAvg``, going on when some nodes fail.

    Flower's wrapper skips a round's aggregation when any reply is an error; here the
    failed replies are recorded and the round aggregates the others. The noise stays
    calibrated to all ``num_sampled_clients`` nodes, so such a round has a smaller
    effective noise multiplier — the arm's accounting (``server.arm``) uses it.
    """

    strategy: RecordingFedAvg

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
        return super().aggregate_train(server_round, answered)
