"""Which rounds' models a manifest keeps under ``keep_last`` retention, and the round descriptions (private)."""

from __future__ import annotations

import math
from typing import Any, Mapping

__all__ = ["check_keep_last", "check_meta", "check_score", "prune"]

_META_KEYS = ("model", "privacy")
_MODEL_KEYS = ("name", "args")


def check_keep_last(keep_last: int) -> int:
    """Return ``keep_last`` if it is an int >= 0, else raise ValueError."""
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
        raise ValueError(f"expected keep_last to be an int >= 0 (0 keeps every round), got {keep_last!r}")
    return keep_last


def check_score(score: float | None) -> float | None:
    """Return ``score`` as a float (None stays None), rejecting NaN, infinities and non-numbers."""
    if score is None:
        return None
    try:
        value = float(score)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(score, bool) or not math.isfinite(value):
        raise ValueError(f"expected score to be a finite number (the central accuracy) or None, got {score!r}")
    return value


def check_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return ``meta`` as ``{"model": {"name", "args"} | None, "privacy": dict | None}``, rejecting unknown keys."""
    if meta is None:
        return {"model": None, "privacy": None}
    if not isinstance(meta, Mapping):
        raise ValueError(f"expected meta to be a mapping with keys {_META_KEYS}, got {type(meta).__name__}")
    unknown = sorted(set(meta) - set(_META_KEYS))
    if unknown:
        raise ValueError(f"expected meta keys among {_META_KEYS}, got unknown {unknown}: remove or rename them")
    model, privacy = meta.get("model"), meta.get("privacy")
    if model is not None:
        if not isinstance(model, Mapping) or set(model) - set(_MODEL_KEYS) or not isinstance(model.get("name"), str) \
                or not model["name"] or not isinstance(model.get("args", {}), Mapping):
            raise ValueError(
                f"expected meta['model'] like {{'name': 'cnn', 'args': {{...}}}}, got {model!r}: "
                "give the model's name and its constructor arguments"
            )
        model = {"name": model["name"], "args": dict(model.get("args", {}))}
    if privacy is not None and not isinstance(privacy, Mapping):
        raise ValueError(f"expected meta['privacy'] to be a mapping (the accountant's state) or None, got {privacy!r}")
    return {"model": model, "privacy": None if privacy is None else dict(privacy)}


def prune(rounds: Mapping[str, dict], keep_last: int, now: str) -> list[int]:
    """Mark pruned, in place, the rounds neither among the last ``keep_last`` nor the best-scoring one.

    Rounds already pruned stay so; the best is the highest score among rounds whose model
    is still stored (the earliest on a tie). ``keep_last`` 0 keeps every round.

    Returns:
        The rounds newly marked, oldest first: their models are to be deleted.
    """
    if keep_last == 0:
        return []
    numbers = sorted(int(r) for r in rounds)
    live = [r for r in numbers if "pruned" not in rounds[str(r)]]
    keep = set(numbers[-keep_last:])
    scored = [r for r in live if rounds[str(r)].get("score") is not None]
    best = max(scored, key=lambda r: (rounds[str(r)]["score"], -r)) if scored else None
    if best is not None:
        keep.add(best)
    newly = [r for r in live if r not in keep]
    why = f"retention: not among the last {keep_last} rounds" + (
        f" nor the best-scoring round ({best})" if best is not None else " (no round has a score)")
    for r in newly:
        rounds[str(r)]["pruned"] = {"at": now, "reason": why}
    return newly
