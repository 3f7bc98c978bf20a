"""The arm's view of the Flower grid: its own nodes only, restarted nodes admitted again by partition."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

log = logging.getLogger("fedcompare.server")

# Flower's grid polls the SuperLink for replies every 3 s; a round waits for its replies
# twice (train, evaluate), so that alone adds up to 6 s per round on a fast network.
# Every poll is a request the SuperLink answers with about 20 ms of CPU (measured: 4.4% of a
# core at about 2.3 requests/s idle, 15% while two arms polled every 0.25 s); every 0.5 s
# halves the arms' share for 0.125 s more wait per reply on average.
# The local stack sets it through FEDCOMPARE_REPLY_POLL_S in the SuperLink's environment.
REPLY_POLL_S = float(os.environ.get("FEDCOMPARE_REPLY_POLL_S", "0.5"))
# Flower's Simulation Engine keeps its messages in the ServerApp's own process: a poll costs
# microseconds, so a simulated arm asks often
SIMULATION_POLL_S = 0.02


def simulation_window() -> int:
    """Return how many messages a simulated arm keeps awaiting a reply: 8 per CPU its actors can use.

    Flower's Simulation Engine queues a pushed message for an actor at its next scan (every
    0.1 s plus the scan itself), so enough must wait to keep every actor busy between scans,
    and few enough that a scan stays short (`ArmGrid.send_and_receive`). Measured on 2 cores,
    1,000 virtual nodes, 100 logreg messages a round: 8 per CPU 2.06 s a round, 16 per CPU 2.18,
    every message at once 2.33, 2 per CPU 3.2. The ServerApp runs in the Ray driver's process:
    once the engine has started Ray, its cluster's CPUs (a cluster joined with RAY_ADDRESS
    included); before, this host's.
    """
    try:
        import ray

        if ray.is_initialized():
            return max(8, 8 * int(ray.cluster_resources().get("CPU", 1)))
    except Exception:  # noqa: BLE001 - no Ray, or one that does not answer: this host's CPUs
        pass
    return max(8, 8 * (os.cpu_count() or 1))


def node_info_messages(node_ids: Iterable[int]) -> list[Message]:
    """Build the query that asks each node what it is (answered by the ClientApp's ``query``)."""
    return [
        Message(RecordDict({"query": ConfigRecord({"what": "node-info"})}), message_type="query", dst_node_id=node)
        for node in node_ids
    ]


class ArmGrid(Grid):
    """A view of the grid that shows only the nodes assigned to one arm.

    A restarted Flower 1.41 SuperNode comes back with a new node id (an insecure node
    registers a fresh key pair). ``partitions`` (node id -> partition id, from the
    flow's node query; None for a node that did not answer it) lets the arm recognise
    it: ``admit_new_nodes`` asks every connected node it has never seen which partition
    it holds, once, and a node that holds one of the arm's partitions takes the place of
    the arm's node that held it.
    """

    def __init__(self, grid: Grid, node_ids: Iterable[int], *,
                 partitions: Mapping[int, int | None] | None = None, poll_s: float = REPLY_POLL_S,
                 by_partition: bool = False, window: int | Callable[[], int] | None = None) -> None:
        self._grid = grid
        self.poll_s = poll_s  # how often send_and_receive asks for replies
        self.window = window  # most messages awaiting a reply at once (None: all; a callable: asked per send)
        self.by_partition = by_partition  # list nodes by partition (a simulation's ids change every run)
        self._node_ids = list(node_ids)
        self._partition_of: dict[int, int | None] = dict(partitions or {})
        self._arm_partitions = {self._partition_of[n] for n in self._node_ids if n in self._partition_of}

    def set_run(self, run):  # noqa: D102 - delegation
        return self._grid.set_run(run)

    @property
    def run(self):  # noqa: D102 - delegation
        return self._grid.run

    def create_message(self, *args, **kwargs):  # noqa: D102 - delegation
        return self._grid.create_message(*args, **kwargs)

    @property
    def members(self) -> list[int]:
        """Return the arm's node ids, connected or not (empty: the arm uses every connected node)."""
        return list(self._node_ids)

    def get_node_ids(self) -> Iterable[int]:
        """Return the arm's nodes that are connected now (all connected nodes if none named)."""
        connected = list(self._grid.get_node_ids())
        if not self._node_ids:
            return connected
        online = set(connected)
        return [node for node in self._node_ids if node in online]

    def ordered(self, node_ids: Iterable[int]) -> list[int]:
        """Return ``node_ids`` in the order a round samples from: by id, or by partition (``by_partition``).

        Flower samples with ``random.sample`` over the list it is given: with a seeded ``random``
        the same list order gives the same sample.
        """
        if not self.by_partition:
            return sorted(node_ids)
        return sorted(node_ids, key=lambda node: (self._partition_of.get(node) is None,
                                                  self._partition_of.get(node) or 0, node))

    def pinned(self, node_ids: Iterable[int]) -> ArmGrid:
        """Return a view whose nodes are exactly ``node_ids``, so a strategy samples what the round saw."""
        return _Pinned(self._grid, self.ordered(node_ids), poll_s=self.poll_s, window=self.window)

    def admit_new_nodes(self, timeout: float) -> list[int]:
        """Ask each connected node never seen before for its partition; admit those holding one of the arm's.

        Returns the admitted node ids. A node that does not answer within ``timeout`` is
        not asked again.
        """
        if not self._node_ids or not self._arm_partitions:
            return []
        unknown = [n for n in self._grid.get_node_ids() if n not in self._partition_of and n not in self._node_ids]
        if not unknown:
            return []
        answers = {}
        for reply in self.send_and_receive(node_info_messages(unknown), timeout=timeout):
            if not reply.has_error():
                answers[reply.metadata.src_node_id] = int(reply.content["node"]["partition-id"])
        admitted = []
        for node in sorted(unknown):
            partition = self._partition_of[node] = answers.get(node)
            if node not in answers:
                log.warning("node %d did not say which partition it holds within %.0f s; it is not asked again",
                            node, timeout)
            if partition not in self._arm_partitions:
                continue
            replaced = [m for m in self._node_ids if self._partition_of.get(m) == partition]
            self._node_ids = [m for m in self._node_ids if m not in replaced] + [node]
            admitted.append(node)
            log.info("node %d holds partition %d of this arm: it joins in place of node %s (a restarted node)",
                     node, partition, ", ".join(map(str, replaced)) or "none")
        return admitted

    def get_nodes(self):  # noqa: D102 - delegation
        return self._grid.get_nodes()

    def push_messages(self, messages):  # noqa: D102 - delegation
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):  # noqa: D102 - delegation
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        """Push ``messages`` and collect their replies until all arrived or ``timeout`` passed.

        Same contract as Flower's ``Grid.send_and_receive`` (replies that miss the timeout
        are left out), with a shorter poll interval (``poll_s``). With a ``window`` at most that
        many messages await a reply at once, the next pushed as replies come: Flower's
        Simulation Engine hands messages to its actors by scanning every stored message for
        every virtual node (``vce_api.add_messages_to_queue``, every 0.1 s), so a thousand
        messages pushed at once cost it a thousand times more per scan than the few its
        actors can work on.
        """
        waiting = list(messages)
        if not waiting:
            return []
        window = self.window() if callable(self.window) else self.window
        deadline = None if timeout is None else time.monotonic() + timeout
        pending: set[str] = set()
        replies: list[Message] = []
        while waiting or pending:
            room = len(waiting) if window is None else max(0, window - len(pending))
            if room and waiting:
                batch, waiting = waiting[:room], waiting[room:]
                pending.update(message_id for message_id in self._grid.push_messages(batch) if message_id)
            arrived = list(self._grid.pull_messages(pending)) if pending else []
            replies.extend(arrived)
            pending.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
            if not (waiting or pending) or (deadline is not None and time.monotonic() >= deadline):
                break
            if not arrived:
                time.sleep(self.poll_s)
        return replies


class _Pinned(ArmGrid):
    """An arm grid whose node list is fixed: what one round's strategy call may sample from."""

    def get_node_ids(self) -> Iterable[int]:
        """Return the pinned nodes, connected or not."""
        return list(self._node_ids)
