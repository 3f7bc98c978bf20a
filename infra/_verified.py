"""Checkpoint errors and reads verified against manifest entries (private; use infra.checkpoints)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import numpy as np

from infra._npz import BackgroundWriter, HashingWriter, NpzStreamReader
from infra.store import Store

__all__ = ["CheckpointError", "CorruptObject", "MissingObject", "PrunedRound", "read_model", "read_verified",
           "read_verified_json"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or inconsistent; the message says which object and what to do."""


CheckpointError.__module__ = "infra.checkpoints"  # its public home


class MissingObject(CheckpointError):
    """An object the manifest lists is missing from the store."""

    reason = "missing"


class CorruptObject(CheckpointError):
    """An object's bytes differ from its manifest entry, or do not decode."""

    reason = "corrupt"


class PrunedRound(CheckpointError):
    """A round's model was deleted by retention."""

    reason = "pruned"


def _missing(store: Store, key: str) -> MissingObject:
    """Return the error for an object the manifest lists but the store lacks."""
    return MissingObject(
        f"checkpoint object {key} is listed in the manifest but missing from {store.uri}: "
        "restore it from a backup or resume from an earlier round (load_latest_good, rewind)"
    )


def _corrupt(store: Store, key: str, entry: Mapping[str, Any], got: str, size: int) -> CorruptObject:
    """Return the error for an object whose sha256 or size differs from its manifest entry."""
    return CorruptObject(
        f"checkpoint object {key} in {store.uri} is corrupt: expected sha256 {entry['sha256']} "
        f"({entry['size']} bytes), got {got} ({size} bytes); "
        "restore it from a backup or resume from an earlier round (load_latest_good, rewind)"
    )


def read_verified(store: Store, key: str, entry: Mapping[str, Any]) -> bytes:
    """Return a small object's bytes after checking them against its manifest entry."""
    try:
        data = store.get_bytes(key)
    except KeyError:
        raise _missing(store, key) from None
    got = hashlib.sha256(data).hexdigest()
    if got != entry["sha256"] or len(data) != entry["size"]:
        raise _corrupt(store, key, entry, got, len(data))
    return data


def read_verified_json(store: Store, key: str, entry: Mapping[str, Any]) -> Any:
    """Return a verified JSON object's value."""
    data = read_verified(store, key, entry)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:  # hashes match: it was written so
        raise CorruptObject(f"checkpoint object {key} in {store.uri} matches its sha256 but is not JSON "
                             f"({exc}): resume from an earlier round (load_latest_good, rewind)") from None


def read_model(store: Store, key: str, entry: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Stream a model from the store, hashing it and decoding its arrays as it arrives; return them if it verifies."""
    reader = NpzStreamReader(limit=int(entry["size"]))
    writer = HashingWriter(reader)
    try:
        with BackgroundWriter(writer) as background:  # hash and decode while the next bytes arrive
            store.get_stream(key, background)
    except KeyError:
        raise _missing(store, key) from None
    got = writer.hexdigest()
    if got != entry["sha256"] or writer.size != entry["size"]:
        raise _corrupt(store, key, entry, got, writer.size)
    try:
        return reader.arrays()
    except ValueError as exc:
        raise CorruptObject(f"checkpoint object {key} in {store.uri} matches its sha256 but is not an "
                            f"uncompressed .npz ({exc}): resume from an earlier round (load_latest_good, rewind)"
                            ) from None
