"""Writing an arm's rounds: objects first, the manifest last (the commit point), then retention; rewinding.

Private; use infra.checkpoints.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Mapping

import numpy as np

from infra._layout import META, METRICS, MODEL, config_hash, manifest_key, round_prefix
from infra._manifest import FORMAT_VERSION, read_manifest, require_manifest
from infra._npz import HashingWriter, describe_arrays, entry_of, spool, write_npz
from infra._provenance import Source, code_version
from infra._retention import check_keep_last, check_meta, check_score, prune
from infra._verified import CheckpointError
from infra.store import Store, json_bytes


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
    model_key, metrics_key, meta_key = (f"{prefix}/{name}" for name in (MODEL, METRICS, META))
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
            "objects": {MODEL: entries[model_key], METRICS: entries[metrics_key]},
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
        key = f"{round_prefix(run_key, arm, r)}/{MODEL}"
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
