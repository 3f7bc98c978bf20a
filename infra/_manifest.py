"""Reading an arm's manifest: parse, validate, explain what is wrong (private; use infra.checkpoints)."""

from __future__ import annotations

import json

from infra._layout import manifest_key
from infra._verified import CheckpointError
from infra.store import Store

__all__ = ["FORMAT_VERSION", "read_manifest", "require_manifest", "round_entry"]

FORMAT_VERSION = 1  # manifest and checkpoint.json layout; later fields are additive


def read_manifest(store: Store, run_key: str, arm: str) -> dict | None:
    """Return the manifest of one arm of one run, or None if nothing was checkpointed yet.

    Args:
        store: where the run's checkpoints are.
        run_key: the run's key.
        arm: the arm's name.
    Returns:
        The manifest, or None when there is none.
    Raises:
        CheckpointError: the manifest is not JSON, not a manifest, or has an unknown format version.
        StoreError: the store failed.
    """
    key = manifest_key(run_key, arm)
    try:
        data = store.get_bytes(key)
    except KeyError:
        return None
    where = f"{key} in {store.uri}"
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{where} is not JSON ({type(exc).__name__}: {str(exc).splitlines()[0]}): it was damaged after "
            "it was written; restore it from a backup, or delete it to train the arm again from round 1"
        ) from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{where} has format_version {version!r}, expected {FORMAT_VERSION}: "
            "read it with the fedcompare release that wrote it"
        )
    if not isinstance(manifest.get("rounds"), dict) or not isinstance(manifest.get("latest_complete_round"), int):
        raise CheckpointError(
            f"{where} lacks 'rounds' or 'latest_complete_round': it was edited by hand or damaged; "
            "restore it from a backup, or delete it to train the arm again from round 1"
        )
    manifest.setdefault("discarded", [])
    return manifest


def require_manifest(store: Store, run_key: str, arm: str) -> dict:
    """Return the manifest, or raise CheckpointError saying there is none and what to check."""
    manifest = read_manifest(store, run_key, arm)
    if manifest is None:
        raise CheckpointError(
            f"no checkpoint for run {run_key!r} arm {arm!r} in {store.uri} "
            f"({manifest_key(run_key, arm)} is missing): check the run key, arm and store URI"
        )
    return manifest


def round_entry(store: Store, run_key: str, arm: str, round: int) -> dict:
    """Return the manifest entry of a complete round, or raise CheckpointError saying which exist."""
    manifest = require_manifest(store, run_key, arm)
    entry = manifest["rounds"].get(str(round))
    if entry is None:
        latest = manifest["latest_complete_round"]
        raise CheckpointError(
            f"round {round} of run {run_key!r} arm {arm!r} is not complete in {store.uri} "
            f"(latest complete round: {latest}): load a round from 1 to {latest}"
        )
    return entry
