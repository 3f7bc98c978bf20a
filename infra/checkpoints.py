"""Round checkpoints and their manifest, on top of any Store.

Layout (identical on every backend)::

    runs/<run_key>/<arm>/round-0001/model.npz        the global model's named arrays
    runs/<run_key>/<arm>/round-0001/metrics.json     the round's metrics
    runs/<run_key>/<arm>/round-0001/checkpoint.json  what the round is: model, config, privacy, code versions
    runs/<run_key>/<arm>/manifest.json               sha256, xxh3-128, size of every object, written last

The manifest is the commit point: a round exists once the manifest lists it, so a crash
between objects and manifest leaves the previous round as the latest good one. Every
read checks an object's size and digest against the manifest: xxh3-128 where the entry
has it, else sha256 (rounds written before xxh3-128 was recorded). sha256 stays the
object's identity (the resume checks compare it); reads verify xxh3-128 because sha256
costs as much CPU as the download itself, and a cryptographic digest buys nothing here:
the manifest lives in the same store unsigned, so whoever can rewrite an object can
rewrite its entry too, while accidental corruption slips past a 128-bit check with
probability 2**-128. A model is never held twice in
memory: it is serialized into a temp file while hashed (memory up to 16 MiB, then
TMPDIR) and uploaded from there; on reading, its bytes are hashed and decoded straight
into the arrays as they arrive, and the arrays are returned only if the hash matches.
Retention (``keep_last``) deletes old models but keeps every round's metrics and
checkpoint.json; ``load_latest_good`` and ``rewind`` let a resumed arm skip and re-train
rounds whose objects are damaged.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

import numpy as np

from infra._layout import (
    config_hash, federation_key, manifest_key, plot_key, report_key, round_prefix,
)
from infra._manifest import FORMAT_VERSION, read_manifest, require_manifest, round_entry
from infra._npz import (HashingWriter, arrays_to_npz_bytes, describe_arrays, entry_of, npz_bytes_to_arrays, spool,
                        write_npz)
from infra._provenance import Source, checkout_source, code_version, run_source
from infra._retention import check_keep_last, check_meta, check_score, prune
from infra._verified import (
    CheckpointError, CorruptObject, MissingObject, PrunedRound, read_model, read_verified_json,
)
from infra.store import Store, json_bytes

__all__ = [
    "CheckpointError", "FORMAT_VERSION", "GoodRound", "SkippedRound", "Source", "arrays_to_npz_bytes",
    "checkout_source", "config_hash", "federation_key", "load_latest", "load_latest_good", "load_model", "load_round",
    "npz_bytes_to_arrays", "plot_key", "read_checkpoint", "read_manifest", "report_key", "rewind", "round_metrics",
    "round_prefix", "run_source", "write_round",
]

_MODEL, _METRICS, _META = "model.npz", "metrics.json", "checkpoint.json"


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


def _now() -> str:
    """Return the current UTC time in ISO 8601, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _same_bytes(stored: Mapping[str, Any] | None, written: Mapping[str, Any]) -> bool:
    """Return whether a stored manifest entry describes the same bytes as a fresh one (sha256 and size)."""
    return stored is not None and (stored["sha256"], stored["size"]) == (written["sha256"], written["size"])


def write_round(
    store: Store,
    run_key: str,
    arm: str,
    round: int,
    arrays: Mapping[str, np.ndarray],
    metrics: Mapping[str, Any],
    config: Mapping[str, Any],
    *,
    meta: Mapping[str, Any] | None = None,
    score: float | None = None,
    keep_last: int = 0,
    source: Source | None = None,
) -> dict:
    """Write one round's model, metrics and checkpoint.json, publish the manifest, then apply retention.

    Rounds are written in order: ``round`` must be the latest complete round + 1.
    Rewriting the latest round with byte-identical model and metrics is a no-op (safe
    retries; it also finishes deleting models pruned by an interrupted call).

    Args:
        store: where to write.
        run_key: the run's key (the Prefect flow-run id).
        arm: the arm's name, e.g. ``large``.
        round: the round number, from 1.
        arrays: the global model's named arrays, in the model's order.
        metrics: the round's metrics (JSON values).
        config: the arm's resolved config; its hash must match the manifest's on later rounds.
        meta: ``{"model": {"name": ..., "args": {...}}, "privacy": {...} or None}``: the
            model's constructor and the privacy accountant's state (opaque JSON), stored in
            the round's checkpoint.json; None stores neither.
        score: the round's central accuracy; retention keeps the best-scoring round's model.
        keep_last: keep the models of the last ``keep_last`` rounds and of the best-scoring
            round, delete older models (metrics and checkpoint.json stay); 0 keeps every model.
        source: the git commit (or why there is none) and the FAB of the code writing the round
            (``run_source``), recorded under ``code`` with the versions; None: this checkout's own.
    Returns:
        The published manifest.
    Raises:
        ValueError: ``meta``, ``score`` or ``keep_last`` is malformed, or an array needs pickle.
        TypeError: ``config``, ``metrics`` or ``meta`` holds a value JSON cannot encode.
        CheckpointError: the round is out of order or the config differs from the run's.
        StoreError: the store failed (before the manifest: the previous manifest still stands).
    """
    prefix = round_prefix(run_key, arm, round)
    described, score, keep_last = check_meta(meta), check_score(score), check_keep_last(keep_last)
    digest = config_hash(config)
    manifest = read_manifest(store, run_key, arm) or {
        "run_key": run_key, "arm": arm, "config_hash": digest, "config": dict(config),
        "latest_complete_round": 0, "rounds": {}, "discarded": [], "format_version": FORMAT_VERSION,
    }
    where = f"{manifest_key(run_key, arm)} in {store.uri}"
    if manifest["config_hash"] != digest:
        raise CheckpointError(
            f"{where} was written with config_hash {manifest['config_hash'][:12]}…, got {digest[:12]}… "
            "for this round: a run keeps one config; start a new run key to change it"
        )
    latest = manifest["latest_complete_round"]
    if round not in (latest, latest + 1):
        raise _out_of_order(where, latest, round)
    model_key, metrics_key, meta_key = (f"{prefix}/{name}" for name in (_MODEL, _METRICS, _META))
    metrics_bytes = json_bytes(dict(metrics))
    with spool() as model_file:
        writer = HashingWriter(model_file)
        write_npz(arrays, writer)
        entries = {model_key: {**writer.hexdigests(), "size": writer.size},
                   metrics_key: entry_of(metrics_bytes)}
        if round == latest:
            stored = manifest["rounds"][str(round)]["objects"]
            if all(_same_bytes(stored.get(k), v) for k, v in entries.items()):
                _delete_models(store, run_key, arm, manifest, [int(r) for r in manifest["rounds"]
                                                              if "pruned" in manifest["rounds"][r]])
                return manifest
            raise _out_of_order(where, latest, round)
        now = _now()
        document = {
            "format_version": FORMAT_VERSION, "run_key": run_key, "arm": arm, "round": round,
            "model": described["model"], "arrays": describe_arrays(arrays),
            "config": dict(config), "config_hash": digest, "privacy": described["privacy"], "score": score,
            "objects": {_MODEL: entries[model_key], _METRICS: entries[metrics_key]},
            "code": code_version(source), "created_at": now,
        }
        try:
            meta_bytes = json_bytes(document)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"expected meta of plain JSON values, got {exc}: convert it first") from None
        entries[meta_key] = entry_of(meta_bytes)
        model_file.seek(0)
        store.put_stream(model_key, model_file, writer.size)
    store.put_bytes(metrics_key, metrics_bytes)
    store.put_bytes(meta_key, meta_bytes)
    manifest["rounds"][str(round)] = {"objects": entries, "completed_at": now, "score": score}
    manifest["latest_complete_round"] = round
    manifest["versions"] = code_version(source)
    pruned = prune(manifest["rounds"], keep_last, now)
    if keep_last:
        manifest["retention"] = {"keep_last": keep_last}
    store.put_json(manifest_key(run_key, arm), manifest)
    _delete_models(store, run_key, arm, manifest, pruned)
    return manifest


def _out_of_order(where: str, latest: int, round: int) -> CheckpointError:
    """Return the error for a round that is not the next one."""
    return CheckpointError(
        f"{where}: expected round {latest + 1} (latest complete is {latest}), got round {round}; "
        f"resume from round {latest + 1} or start a new run key"
    )


def _delete_models(store: Store, run_key: str, arm: str, manifest: dict, rounds: list[int]) -> None:
    """Delete the model objects of ``rounds`` (already marked pruned in the published manifest)."""
    for r in sorted(rounds):
        key = f"{round_prefix(run_key, arm, r)}/{_MODEL}"
        if key in manifest["rounds"][str(r)]["objects"]:
            store.delete(key)


def rewind(store: Store, run_key: str, arm: str, to_round: int, reason: str) -> dict:
    """Republish the manifest with ``to_round`` as the latest complete round, discarding the later ones.

    The later rounds move to the manifest's ``discarded`` list (with ``reason`` and the
    time), so that write_round(``to_round`` + 1) is accepted again: a resumed arm
    re-trains them. Their objects stay in the store until rewritten. Pick ``to_round``
    from load_latest_good.

    Args:
        store: where the run's checkpoints are.
        run_key: the run's key.
        arm: the arm's name.
        to_round: the round to go back to; 0 discards every round.
        reason: why, e.g. ``"round 5: corrupt model.npz"``; kept in the manifest.
    Returns:
        The published manifest (unchanged when ``to_round`` is already the latest).
    Raises:
        ValueError: ``to_round`` is not an int >= 0 or ``reason`` is empty.
        CheckpointError: no manifest, ``to_round`` is past the latest round, or its model was pruned.
        StoreError: the store failed (the previous manifest then still stands).
    """
    if isinstance(to_round, bool) or not isinstance(to_round, int) or to_round < 0:
        raise ValueError(f"expected to_round to be an int >= 0, got {to_round!r}")
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError(f"expected a non-empty reason to record, got {reason!r}")
    manifest = require_manifest(store, run_key, arm)
    latest, rounds = manifest["latest_complete_round"], manifest["rounds"]
    where = f"{manifest_key(run_key, arm)} in {store.uri}"
    if to_round > latest:
        raise CheckpointError(f"{where}: cannot rewind to round {to_round}, the latest complete is {latest}: "
                              f"pick a round from 0 to {latest}")
    if to_round and "pruned" in rounds[str(to_round)]:
        kept = sorted(int(r) for r, e in rounds.items() if "pruned" not in e)
        raise CheckpointError(f"{where}: round {to_round}'s model was pruned by retention, so the arm cannot "
                              f"resume from it: rewind to a kept round {kept} or to 0")
    if to_round == latest:
        return manifest
    now = _now()
    for r in sorted(int(k) for k in rounds if int(k) > to_round):
        manifest["discarded"].append({"round": r, "reason": reason, "at": now, "entry": rounds.pop(str(r))})
    manifest["latest_complete_round"] = to_round
    store.put_json(manifest_key(run_key, arm), manifest)
    return manifest


def _load(store: Store, run_key: str, arm: str, round: int, entry: Mapping[str, Any] | Future, *,
          with_metrics: bool = True, with_meta: bool = False) -> tuple[dict[str, np.ndarray], dict, dict | None]:
    """Return a round's verified arrays, and (if asked for) its metrics and checkpoint.json ({} / None if not).

    ``entry`` may be a Future of the round's manifest entry: the model then downloads while
    the manifest is read, and the manifest's errors (no such round, pruned) come first.
    """
    prefix = round_prefix(run_key, arm, round)
    model_key, metrics_key, meta_key = (f"{prefix}/{name}" for name in (_MODEL, _METRICS, _META))

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
    key = f"{round_prefix(run_key, arm, round)}/{_META}"
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
        key = f"{round_prefix(run_key, arm, round)}/{_METRICS}"
        metrics = read_verified_json(store, key, manifest["rounds"][str(round)]["objects"][key])
        out.append({**metrics, "round": round})
    return out
