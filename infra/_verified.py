"""Checkpoint errors and reads verified against manifest entries (private; use infra.checkpoints)."""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping

import numpy as np

from infra._npz import BackgroundWriter, HashingWriter, NpzStreamReader, entry_of, read_digest
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


def _corrupt(store: Store, key: str, entry: Mapping[str, Any], digest: str, got: str, size: int) -> CorruptObject:
    """Return the error for an object whose digest or size differs from its manifest entry."""
    return CorruptObject(
        f"checkpoint object {key} in {store.uri} is corrupt: expected {digest} {entry[digest]} "
        f"({entry['size']} bytes), got {got} ({size} bytes); "
        "restore it from a backup or resume from an earlier round (load_latest_good, rewind)"
    )


def read_verified(store: Store, key: str, entry: Mapping[str, Any]) -> bytes:
    """Return a small object's bytes after checking them against its manifest entry."""
    try:
        data = store.get_bytes(key)
    except KeyError:
        raise _missing(store, key) from None
    digest = read_digest(entry)
    got = entry_of(data)[digest]
    if got != entry[digest] or len(data) != entry["size"]:
        raise _corrupt(store, key, entry, digest, got, len(data))
    return data


def read_verified_json(store: Store, key: str, entry: Mapping[str, Any]) -> Any:
    """Return a verified JSON object's value."""
    data = read_verified(store, key, entry)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:  # hashes match: it was written so
        raise CorruptObject(f"checkpoint object {key} in {store.uri} matches its digest but is not JSON "
                             f"({exc}): resume from an earlier round (load_latest_good, rewind)") from None


def read_model(store: Store, key: str, entry: Mapping[str, Any] | Callable[[], Mapping[str, Any]]
               ) -> dict[str, np.ndarray]:
    """Stream a model from the store, hashing it and decoding its arrays as it arrives; return them if it verifies.

    ``entry`` may be a function returning the manifest entry: the download then starts
    before the manifest has been read, and the entry is asked for when the first bytes arrive.
    """
    sink = _VerifyingSink(entry if callable(entry) else lambda: entry)
    try:
        with BackgroundWriter(sink) as background:  # hash and decode while the next bytes arrive
            store.get_stream(key, background)
    except KeyError:
        raise _missing(store, key) from None
    known = sink.start()
    got = sink.hasher.hexdigests()[sink.digest]
    if got != known[sink.digest] or sink.hasher.size != known["size"]:
        raise _corrupt(store, key, known, sink.digest, got, sink.hasher.size)
    try:
        return sink.reader.arrays()
    except ValueError as exc:
        raise CorruptObject(f"checkpoint object {key} in {store.uri} matches its digest but is not an "
                            f"uncompressed .npz ({exc}): resume from an earlier round (load_latest_good, rewind)"
                            ) from None


class _VerifyingSink:
    """A write-only file that hashes and decodes a model against its manifest entry, asked for at the first write."""

    def __init__(self, entry: Callable[[], Mapping[str, Any]]) -> None:
        self._entry = entry
        self._known: Mapping[str, Any] | None = None

    def start(self) -> Mapping[str, Any]:
        """Return the manifest entry; on the first call, set up the hash and decoder it calls for."""
        if self._known is None:
            self._known = self._entry()
            self.digest = read_digest(self._known)
            self.reader = NpzStreamReader(limit=int(self._known["size"]))  # bounds what a damaged header asks for
            self.hasher = HashingWriter(self.reader, digests=(self.digest,))
        return self._known

    def write(self, data: Any) -> int:
        """Hash and decode the next bytes."""
        self.start()
        return self.hasher.write(data)

    def flush(self) -> None:
        """Do nothing: nothing is buffered."""
