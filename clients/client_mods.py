"""Client mods a node's operator names in its node config (``client-mods``), for the ClientApp to install.

A client mod is Flower's ``mod(msg, context, call_next) -> Message``: it wraps every handler of
the ClientApp, e.g. an operator's own logging or metrics (the tests install their fault injector,
``tests/faults_mod.py``, this way). ``client-mods`` names them as ``module:attribute``,
comma-separated, outermost first. Flower's SuperNode starts the ClientApp process with its own
environment, so a module is importable when it is installed or on the SuperNode's ``PYTHONPATH``.
Standard library only: the ClientApp relay must stay cheap to import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

CLIENT_MODS = "client-mods"  # the node-config key


class ClientModsError(ValueError):
    """A ``client-mods`` entry that does not name an importable callable."""


def load_client_mods(spec: str, *, named_by: str = f"node config {CLIENT_MODS}") -> tuple[Callable[..., Any], ...]:
    """Import the client mods that ``spec`` names ("module:attribute,…"; "" for none), outermost first."""
    mods = []
    for ref in filter(None, (part.strip() for part in spec.split(","))):
        module, _, attribute = ref.partition(":")
        try:
            if not module or not attribute:
                raise ValueError("expected module:attribute")
            mod: Any = importlib.import_module(module)
            for name in attribute.split("."):
                mod = getattr(mod, name)
            if not callable(mod):
                raise TypeError(f"{type(mod).__name__} is not callable")
        except Exception as exc:  # an operator's module may fail to import in any way: say which entry
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise ClientModsError(
                f"{named_by} entry {ref!r}: {reason}; name each mod as module:function importable "
                f"by the SuperNode (installed or on its PYTHONPATH), or remove the entry"
            ) from exc
        mods.append(mod)
    return tuple(mods)
