"""Checks on a node's trained model before the server aggregates it: plain numpy, no Flower.

A reply is rejected when its arrays do not match the global model it was sent (names,
order, shapes, dtypes), hold NaN or Inf, or move further from the global model than
``max_update_norm`` (L2 over all arrays). Every reason starts with ``"rejected: "`` so
the round's failures and the report tell a rejected reply from a missing one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

REJECTED = "rejected: "


def check_update(
    update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], *, max_update_norm: float | None = None
) -> str | None:
    """Return why ``update`` (a node's trained arrays) must be rejected against the global ``reference``, or None."""
    problem = _layout_problem(update, reference)
    if problem is None:
        problem = _non_finite_problem(update)
    if problem is None and max_update_norm is not None:
        norm = update_norm(update, reference)
        if not norm <= max_update_norm:
            problem = f"update norm {norm:.6g} exceeds max_update_norm {max_update_norm:g}"
    return None if problem is None else REJECTED + problem


def check_weight(name: str, value: object) -> str | None:
    """Return why the aggregation weight ``value`` (metric ``name``) must be rejected, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return f"{REJECTED}metric {name!r} is {value!r}, expected a positive finite number"
    return None


def update_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """Return the L2 norm of ``update - reference`` over all arrays, computed in float64."""
    total = 0.0
    with np.errstate(over="ignore"):  # a norm past float64 is inf, which every bound rejects
        for name, want in reference.items():
            delta = np.asarray(update[name], dtype=np.float64) - np.asarray(want, dtype=np.float64)
            total += float(np.dot(delta.ravel(), delta.ravel()))
    return math.sqrt(total)


def _layout_problem(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> str | None:
    """Return how the names, order, shapes or dtypes of ``update`` differ from ``reference``, or None."""
    got, want = list(update), list(reference)
    if got != want:
        missing, extra = [n for n in want if n not in update], [n for n in got if n not in reference]
        if missing or extra:
            return f"array names differ from the model's: missing {missing}, unexpected {extra}"
        return f"arrays come in the order {got}, expected the model's order {want}"
    for name, expected in reference.items():
        array = update[name]
        if array.shape != expected.shape:
            return f"array {name!r} has shape {tuple(array.shape)}, expected {tuple(expected.shape)}"
        if array.dtype != expected.dtype:
            return f"array {name!r} has dtype {array.dtype}, expected {expected.dtype}"
    return None


def _non_finite_problem(update: Mapping[str, np.ndarray]) -> str | None:
    """Return which array holds NaN or Inf values and how many, or None."""
    for name, array in update.items():
        if np.issubdtype(array.dtype, np.inexact):
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            if bad:
                return f"array {name!r} holds {bad} NaN/Inf values"
    return None
