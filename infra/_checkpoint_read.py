"""Reading an arm's rounds, every object verified against the manifest: a round, its model, its checkpoint.json,
the latest round, the latest good one, every round's metrics.

``load_latest_good`` passes over rounds whose objects are missing, corrupt or pruned, and says
why. Private; use infra.checkpoints.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from infra._layout import META, METRICS, MODEL, round_prefix
from infra._manifest import read_manifest, round_entry
from infra._verified import (
    CheckpointError, CorruptObject, MissingObject, PrunedRound, read_model, read_verified_json,
)
from infra.store import Store


@dataclass(frozen=True)
class SkippedRound:
    """A round newer than the good one that load_latest_good passed over, and why."""

    round: int
    reason: str  # "corrupt", "missing" (an object) or "pruned" (its model, by retention)
    detail: str  # the one-line explanation: which object, expected vs got


@dataclass(frozen=True)
class GoodRound:
    """The newest round whose objects all verify, as load_latest_good returns it."""

    round: int
    arrays: dict[str, np.ndarray]  # the model's named arrays, in saved order
    metrics: dict
    meta: dict | None  # the round's checkpoint.json; None for rounds written before it existed
    skipped: tuple[SkippedRound, ...]  # the newer rounds passed over, newest first



def _load(store: Store, run_key: str, arm: str, round: int, entry: Mapping[str, Any] | Future, *,
          with_metrics: bool = True, with_meta: bool = False) -> tuple[dict[str, np.ndarray], dict, dict | None]:
    """Return a round's verified arrays, and (if asked for) its metrics and checkpoint.json ({} / None if not).

    ``entry`` may be a Future of the round's manifest entry: the model then downloads while
    the manifest is read, and the manifest's errors (no such round, pruned) come first.
    """
    prefix = round_prefix(run_key, arm, round)
    model_key, metrics_key, meta_key = (f"{prefix}/{name}" for name in (MODEL, METRICS, META))

    def known() -> Mapping[str, Any]:
        """Return the round's entry once read; raise when the round cannot be loaded."""
        got = entry.result() if isinstance(entry, Future) else entry
        if "pruned" in got:
            raise PrunedRound(
                f"round {round} of run {run_key!r} arm {arm!r} in {store.uri}: its model was pruned by retention "
                f"({got['pruned']['reason']}, at {got['pruned']['at']}): load a kept round, "
                "or write with a larger keep_last"
            )
        return got

    if not isinstance(entry, Future):
        known()  # a pruned round fails before any download

    def small_objects() -> tuple[dict, dict | None]:
        return (
            read_verified_json(store, metrics_key, known()["objects"][metrics_key]) if with_metrics else {},
            read_verified_json(store, meta_key, known()["objects"][meta_key])
            if with_meta and meta_key in known()["objects"] else None,
        )

    with ExitStack() as stack:
        # the small objects travel while the model streams; a model alone needs no second thread
        small = stack.enter_context(ThreadPoolExecutor(max_workers=1)).submit(small_objects) \
            if with_metrics or with_meta else None
        try:
            arrays = read_model(store, model_key, lambda: known()["objects"][model_key])
        except Exception:
            known()  # the manifest's reason (no such round, pruned) explains a failed download best
            raise
        metrics, meta = small.result() if small is not None else ({}, None)
    return arrays, metrics, meta


def load_round(
    store: Store, run_key: str, arm: str, round: int
) -> tuple[dict[str, np.ndarray], dict]:
    """Return one complete round's arrays (in saved order) and metrics, both verified against the manifest.

    Raises:
        CheckpointError: no manifest, the round is not complete, its model was pruned by
            retention, or an object is missing/corrupt.
        StoreError: the store failed.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:  # the round's model key is known: read the manifest meanwhile
        arrays, metrics, _ = _load(store, run_key, arm, round, pool.submit(round_entry, store, run_key, arm, round))
    return arrays, metrics


def load_model(store: Store, run_key: str, arm: str, round: int) -> dict[str, np.ndarray]:
    """Return one complete round's model arrays (in saved order), verified against the manifest.

    load_round without the metrics: the model downloads while the manifest is read, and
    nothing else is fetched.

    Args:
        store: where the run's checkpoints are.
        run_key: the run's key.
        arm: the arm's name.
        round: the round number.
    Returns:
        The model's named arrays.
    Raises:
        CheckpointError: no manifest, the round is not complete, its model was pruned by
            retention, or the model object is missing/corrupt.
        StoreError: the store failed.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        entry = pool.submit(round_entry, store, run_key, arm, round)
        arrays, _, _ = _load(store, run_key, arm, round, entry, with_metrics=False)
    return arrays


def read_checkpoint(store: Store, run_key: str, arm: str, round: int) -> dict | None:
    """Return a complete round's verified checkpoint.json (kept even when retention pruned the model).

    Args:
        store: where the run's checkpoints are.
        run_key: the run's key.
        arm: the arm's name.
        round: the round number.
    Returns:
        The description: model, arrays, config, privacy, score, code versions, created_at;
        None for a round written before checkpoint.json existed.
    Raises:
        CheckpointError: no manifest, the round is not complete, or the object is missing/corrupt.
        StoreError: the store failed.
    """
    key = f"{round_prefix(run_key, arm, round)}/{META}"
    objects = round_entry(store, run_key, arm, round)["objects"]
    return read_verified_json(store, key, objects[key]) if key in objects else None


def load_latest(store: Store, run_key: str, arm: str) -> tuple[int, dict[str, np.ndarray], dict]:
    """Return the latest complete round's number, arrays and metrics.

    Raises:
        CheckpointError: nothing was checkpointed for this run and arm, or an object is corrupt.
        StoreError: the store failed.
    """
    manifest = read_manifest(store, run_key, arm)
    latest = manifest["latest_complete_round"] if manifest else 0
    if latest < 1:
        raise _no_round(store, run_key, arm)
    arrays, metrics, _ = _load(store, run_key, arm, latest, manifest["rounds"][str(latest)])
    return latest, arrays, metrics


def _no_round(store: Store, run_key: str, arm: str) -> CheckpointError:
    """Return the error for an arm without any complete round."""
    return CheckpointError(
        f"no complete round for run {run_key!r} arm {arm!r} in {store.uri}: "
        "start from round 1, or check the run key, arm and store URI"
    )


def load_latest_good(store: Store, run_key: str, arm: str) -> GoodRound:
    """Return the newest complete round whose objects all verify, and the newer rounds it skipped.

    A round is skipped when one of its objects is missing or corrupt, or its model was
    pruned by retention. To resume from the result, ``rewind`` to its round first when
    ``skipped`` is not empty.

    Args:
        store: where the run's checkpoints are.
        run_key: the run's key.
        arm: the arm's name.
    Returns:
        A GoodRound: round, arrays, metrics, meta (checkpoint.json) and skipped rounds.
    Raises:
        CheckpointError: no complete round, or none verifies (the message lists why each failed).
        StoreError: the store failed.
    """
    manifest = read_manifest(store, run_key, arm)
    if manifest is None or manifest["latest_complete_round"] < 1:
        raise _no_round(store, run_key, arm)
    skipped: list[SkippedRound] = []
    for r in sorted((int(k) for k in manifest["rounds"]), reverse=True):
        try:
            arrays, metrics, meta = _load(store, run_key, arm, r, manifest["rounds"][str(r)], with_meta=True)
        except (MissingObject, CorruptObject, PrunedRound) as exc:
            skipped.append(SkippedRound(r, exc.reason, str(exc)))
            continue
        return GoodRound(r, arrays, metrics, meta, tuple(skipped))
    reasons = ", ".join(f"round {s.round} {s.reason}" for s in skipped)
    raise CheckpointError(
        f"no round of run {run_key!r} arm {arm!r} in {store.uri} verifies ({reasons}): "
        "restore the objects from a backup, or rewind to round 0 and train the arm again"
    )


def round_metrics(store: Store, run_key: str, arm: str) -> list[dict]:
    """Return the metrics of every complete round in order, each with its ``round`` added.

    Rounds whose model was pruned by retention are included (their metrics are kept).
    Returns an empty list while no round is complete.

    Raises:
        CheckpointError: a metrics object is missing or corrupt.
        StoreError: the store failed.
    """
    manifest = read_manifest(store, run_key, arm)
    if manifest is None:
        return []
    out = []
    for round in sorted(int(r) for r in manifest["rounds"]):
        key = f"{round_prefix(run_key, arm, round)}/{METRICS}"
        metrics = read_verified_json(store, key, manifest["rounds"][str(round)]["objects"][key])
        out.append({**metrics, "round": round})
    return out
