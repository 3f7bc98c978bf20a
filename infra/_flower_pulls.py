"""Flower's object pulls: the first retry after 50 ms instead of 1 s.

Flower 1.41 sends a message as a tree of objects (records, arrays) that the receiver pulls
one by one. An object the sender has not finished pushing yet is tried again after
`PULL_INITIAL_BACKOFF` (1 s), then 2 s, 4 s… (`flwr.supercore.inflatable.inflatable_utils`,
where the value is a default argument of `pull_objects` and `pull_and_inflate_object_from_tree`).
A large arm's model (2.5-5 MB) can still be being pushed when the SuperNode, and then the
ClientApp, ask for it, and then it waits a second per hop. `shorten_pull_backoff` sets that
default to ``PULL_BACKOFF_S`` in this process; the doubling, its 10 s cap and Flower's limits on
tries and time stay Flower's. The SuperNode launcher, the clientapp forkserver and launcher and
the ServerApp call it. Standard library only at import (the launchers import it).
"""

from __future__ import annotations

PULL_BACKOFF_S = 0.05  # seconds before an object's first retry (Flower's: 1)


def shorten_pull_backoff(seconds: float = PULL_BACKOFF_S) -> bool:
    """Make Flower's object pulls in this process retry first after ``seconds``; False where Flower has no such default."""
    try:
        from flwr.supercore.inflatable import inflatable_utils
    except ImportError:
        return False
    changed = False
    for name in ("pull_objects", "pull_and_inflate_object_from_tree"):
        defaults = getattr(getattr(inflatable_utils, name, None), "__kwdefaults__", None)
        if defaults is not None and "initial_backoff" in defaults:
            defaults["initial_backoff"] = seconds
            changed = True
    return changed
