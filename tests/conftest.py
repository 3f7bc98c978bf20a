"""Test ordering for `make test`, which runs two pytest-xdist workers (`-n 2 --dist loadfile`).

The fault module and the integration module each drive their own local stack for many
minutes, and much of that time is spent waiting (heartbeats, round timeouts, an outage
ridden out), not computing. `--dist loadfile` keeps each module (and its module-scoped
stack) on one worker; moving both modules to the front of the collection hands them to the
two workers first, so that they run side by side and the short modules fill in behind.
(`--dist loadgroup` would say this with marks, but xdist 3.8 groups by rewriting a node id
attribute that pytest 9 no longer reads.) Without xdist the order changes nothing a test
relies on.
"""

from __future__ import annotations

import pytest

_FIRST = ("test_faults.py", "test_integration.py")  # longest first


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Move the stack modules to the front, in the order of _FIRST."""
    rank = {name: i for i, name in enumerate(_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(_FIRST)))
