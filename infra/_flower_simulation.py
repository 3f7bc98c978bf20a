"""Flower's Simulation Engine, delivering a round's messages with one pass over its stored messages per scan.

Flower 1.41's engine (`flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue`) hands
messages to its actors from a thread that, every 0.1 s, calls the in-memory LinkState's
`get_message_ins(node_id, limit=1)` once per virtual node, and each call walks every stored
message, checking each one's expiry and federation under the state's lock. A scan over 1,000
virtual nodes with 16 messages in flight is 16,000 such checks, and it holds the lock (and the
GIL) that the replies and the ServerApp, in the same process, wait for; over 10,000 nodes ten
times as many. `deliver_in_one_pass()` replaces that function in this process with one that walks
the stored messages once per scan: the same checks (Flower's own `_check_stored_messages`), the
same marking as delivered, at most one message per virtual node per scan as before, in the order
they were pushed, on the same 0.1 s cadence and stop event.

`infra/flwr_bin/flwr-simulation` calls it before it runs Flower's `flwr-simulation`. Where the
state is not Flower's in-memory LinkState, or the function is not the one expected (a later
Flower), Flower's own scan runs.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Container
from queue import Queue

SCAN_S = 0.1  # Flower's wait between scans (`f_stop.wait(0.1)`)
_PARAMETERS = ["state", "queue", "nodes_mapping", "f_stop"]


def undelivered(state, nodes: Container[int]) -> list:
    """Return, marked as delivered, the oldest undelivered message of each of ``nodes`` in ``state`` (Flower's in-memory LinkState).

    Expired messages, and messages whose nodes left the run's federation, are deleted first, as
    Flower's `get_message_ins` does for each message it looks at.
    """
    from flwr.supercore.date import now

    found, seen = [], set()
    with state.lock:
        ids = list(state.message_ins_store)
        state._check_stored_messages(set(ids))  # noqa: SLF001 - Flower's own checks, once per message
        for message_id in ids:
            message = state.message_ins_store.get(message_id)
            if message is None:
                continue
            node = message.metadata.dst_node_id
            if message.metadata.delivered_at == "" and node in nodes and node not in seen:
                seen.add(node)
                found.append(message)
        delivered_at = now().isoformat()
        for message in found:
            message.metadata.delivered_at = delivered_at
    return found


def deliver_in_one_pass() -> bool:
    """Make the Simulation Engine in this process scan its stored messages once per tick; False where Flower's differs."""
    try:
        from flwr.server.superlink.fleet.vce import vce_api
        from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    except ImportError:
        return False
    flowers = vce_api.add_messages_to_queue
    if getattr(flowers, "fedcompare_one_pass", False):
        return True
    if list(inspect.signature(flowers).parameters) != _PARAMETERS or not hasattr(InMemoryLinkState,
                                                                                 "_check_stored_messages"):
        return False

    def add_messages_to_queue(state, queue: Queue, nodes_mapping, f_stop: threading.Event) -> None:
        """Put each virtual node's next message in the actors' queue, every SCAN_S, until ``f_stop``."""
        if not (isinstance(state, InMemoryLinkState) and hasattr(state, "message_ins_store") and hasattr(state, "lock")):
            return flowers(state, queue, nodes_mapping, f_stop)
        while not f_stop.is_set():
            for message in undelivered(state, nodes_mapping):
                queue.put(message)
            f_stop.wait(SCAN_S)
        return None

    add_messages_to_queue.fedcompare_one_pass = True
    vce_api.add_messages_to_queue = add_messages_to_queue
    return True
