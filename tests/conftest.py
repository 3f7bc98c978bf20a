"""Test ordering for `make test`, which runs two pytest-xdist workers (`-n 2 --dist loadgroup`).

The fault module and the integration module each drive their own local stack for many
minutes, and much of that time is spent waiting (heartbeats, round timeouts, an outage
ridden out), not computing. Each module is one xdist group, so its tests share one worker
and its module-scoped stack; both groups are moved to the front of the run so that the two
workers start them at once and the short tests fill in behind. Without xdist the order
changes nothing that a test relies on.
"""

from __future__ import annotations

import pytest

# module -> its xdist group, longest first (xdist hands out work in collection order)
_STACK_GROUPS = {"test_faults.py": "faults-stack", "test_integration.py": "integration-stack"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give the stack modules their xdist groups and run them first."""
    order = list(_STACK_GROUPS)
    for item in items:
        group = _STACK_GROUPS.get(item.path.name)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: order.index(item.path.name) if item.path.name in _STACK_GROUPS else len(order))
