"""The local state directory: PID files, logs, the Prefect database, Flower's state and the default store."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["STATE_DIR_ENV", "state_dir"]

STATE_DIR_ENV = "FEDCOMPARE_STATE_DIR"
_DEFAULT = ".fedcompare"


def state_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Return the state directory: ``override``, else $FEDCOMPARE_STATE_DIR, else ./.fedcompare, made absolute.

    Args:
        override: a directory the caller was given explicitly (the CLI's --state-dir); None or "" for none.

    Returns:
        The absolute path; it need not exist yet.
    """
    return Path(override or os.environ.get(STATE_DIR_ENV) or _DEFAULT).resolve()
