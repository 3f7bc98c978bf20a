"""FedAvg for one arm: trains only on the arm's nodes and keeps every node's reply."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg


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

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102 - delegation
        return self._grid.send_and_receive(messages, timeout=timeout)


@dataclass
class RoundLog:
    """What happened in one round, as seen by the server."""

    started: float = 0.0
    trained: float = 0.0
    aggregate_seconds: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0
    train: dict[int, dict[str, float]] = field(default_factory=dict)
    evaluate: dict[int, dict[str, float]] = field(default_factory=dict)
    failures: list[dict[str, object]] = field(default_factory=list)


class RecordingFedAvg(FedAvg):
    """FedAvg that records per-node metrics, bytes and timings of every round."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rounds: dict[int, RoundLog] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample the arm's nodes and note the bytes each training message carries."""
        log = self.rounds.setdefault(server_round, RoundLog())
        log.started = time.time()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        log.bytes_down += arrays.count_bytes() * len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Keep each node's training metrics, then average as FedAvg does."""
        replies = list(replies)
        log = self.rounds[server_round]
        log.trained = time.time()
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.failures.append({"node_id": node, "phase": "train", "reason": reply.error.reason})
                continue
            log.train[node] = dict(reply.content["metrics"])
            log.bytes_up += reply.content["arrays"].count_bytes()
        started = time.perf_counter()
        result = super().aggregate_train(server_round, replies)
        log.aggregate_seconds = time.perf_counter() - started
        return result

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample the arm's nodes for evaluation and note the bytes sent."""
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.rounds.setdefault(server_round, RoundLog()).bytes_down += arrays.count_bytes() * len(messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Keep each node's evaluation metrics, then average as FedAvg does."""
        replies = list(replies)
        log = self.rounds.setdefault(server_round, RoundLog())
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.failures.append({"node_id": node, "phase": "evaluate", "reason": reply.error.reason})
                continue
            log.evaluate[node] = dict(reply.content["metrics"])
        return super().aggregate_evaluate(server_round, replies)
