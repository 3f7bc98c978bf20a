"""The parsed-dataset cache: arrays a loader parsed once, kept as .npz files keyed on their source (numpy only)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

_KEYED = Path()  # a ``_cached`` source meaning: the name is the whole key


def _cached(name: str, source: Path | None, parse: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Return ``parse()``'s arrays, cached as ``<name>-<size>-<mtime>.npz`` of the ``source`` file they come from.

    With ``source`` ``_KEYED`` the cache file is ``<name>.npz``: the name holds a hash of the inputs.
    Every Flower message starts a fresh ClientApp process, so parsing (and the imports
    parsing needs, such as scikit-learn's 1-2 s) would be paid per message. The cache
    lives in ``$FEDCOMPARE_CACHE_DIR`` (default ``~/.cache/fedcompare``) and is only an
    accelerator: a missing ``source``, an unreadable or corrupt cache or an unwritable
    directory falls back to parsing.
    """
    if source is _KEYED:  # ``name`` already says everything the arrays depend on
        cached = _cache_dir() / f"{name}.npz"
    else:
        try:
            stat = source.stat() if source else None
        except OSError:
            stat = None
        if stat is None:
            return parse()
        cached = _cache_dir() / f"{name}-{stat.st_size}-{stat.st_mtime_ns}.npz"
    try:
        with np.load(cached) as arrays:
            return {key: arrays[key] for key in arrays.files}
    except (OSError, KeyError, ValueError, EOFError):
        arrays = parse()
        _write_cache(cached, **arrays)
        return arrays


def _cache_dir() -> Path:
    """Return the directory of parsed-dataset caches."""
    return Path(os.environ.get("FEDCOMPARE_CACHE_DIR") or Path.home() / ".cache" / "fedcompare")


def _write_cache(path: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``path`` atomically (temp file, then rename); give up quietly on OSError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False)
    except OSError:
        return
    try:
        with handle:
            np.savez(handle, **arrays)
        os.replace(handle.name, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
