"""Round checkpoints and their manifest, on top of any Store.

Layout (identical on every backend)::

    runs/<run_key>/<arm>/round-0001/model.npz      the global model's named arrays
    runs/<run_key>/<arm>/round-0001/metrics.json   the round's metrics
    runs/<run_key>/<arm>/manifest.json             sha256/size of every object, written last

The manifest is the commit point: a round exists once the manifest lists it, so a crash
between objects and manifest leaves the previous round as the latest good one.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import zipfile
from datetime import datetime, timezone
from typing import Any, Mapping

import numpy as np

from infra.store import Store, json_bytes

__all__ = [
    "CheckpointError", "FORMAT_VERSION", "arrays_to_npz_bytes", "config_hash", "load_latest",
    "load_round", "npz_bytes_to_arrays", "read_manifest", "round_metrics", "round_prefix",
    "write_round",
]

FORMAT_VERSION = 1
_MODEL = "model.npz"
_METRICS = "metrics.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or inconsistent; the message says which object and what to do."""


def _check_name(what: str, value: str) -> str:
    """Return ``value`` after checking it is one path part (non-empty, no '/', not '.' or '..')."""
    if not isinstance(value, str) or not value or "/" in value or value in (".", ".."):
        raise ValueError(f"expected {what} to be a non-empty name without '/', got {value!r}")
    return value


def _arm_prefix(run_key: str, arm: str) -> str:
    """Return ``runs/<run_key>/<arm>`` after checking both are single path parts."""
    return f"runs/{_check_name('run_key', run_key)}/{_check_name('arm', arm)}"


def federation_key(run_key: str) -> str:
    """Return the key of the nodes' answers to a run's query: ``runs/<run_key>/federation.json``."""
    return f"runs/{_check_name('run_key', run_key)}/federation.json"


def report_key(run_key: str) -> str:
    """Return the key of a run's report: ``runs/<run_key>/report.json``."""
    return f"runs/{_check_name('run_key', run_key)}/report.json"


def plot_key(run_key: str, name: str) -> str:
    """Return the key of one of a run's report plots: ``runs/<run_key>/plots/<name>.png``."""
    return f"runs/{_check_name('run_key', run_key)}/plots/{_check_name('name', name)}.png"


def round_prefix(run_key: str, arm: str, round: int) -> str:
    """Return the key prefix of one round, e.g. ``runs/<run_key>/<arm>/round-0007``.

    Raises:
        ValueError: ``run_key`` or ``arm`` is empty or holds '/', or ``round`` is not a positive int.
    """
    if isinstance(round, bool) or not isinstance(round, int) or round < 1:
        raise ValueError(f"expected round to be an int >= 1, got {round!r}")
    return f"{_arm_prefix(run_key, arm)}/round-{round:04d}"


def _manifest_key(run_key: str, arm: str) -> str:
    """Return the manifest's key for one arm of one run."""
    return f"{_arm_prefix(run_key, arm)}/manifest.json"


def config_hash(config: Mapping[str, Any]) -> str:
    """Return the sha256 hex digest of the config's canonical JSON (sorted keys, no spaces).

    Raises:
        TypeError: the config holds a value JSON cannot encode.
    """
    try:
        canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except TypeError as exc:
        raise TypeError(f"expected a config of plain JSON values, got {exc}: convert it first") from None
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def arrays_to_npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Return an uncompressed .npz archive of the named arrays, in the mapping's order.

    The bytes are deterministic (fixed zip timestamps), so equal arrays hash equally.

    Raises:
        ValueError: a name is empty or an array has object dtype (would need pickle).
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, value in arrays.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"expected array names to be non-empty str, got {name!r}")
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
    return buf.getvalue()


def npz_bytes_to_arrays(data: bytes) -> dict[str, np.ndarray]:
    """Return the named arrays of an .npz archive, in archive order, without unpickling."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def _sha256(data: bytes) -> str:
    """Return the sha256 hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def read_manifest(store: Store, run_key: str, arm: str) -> dict | None:
    """Return the manifest of one arm of one run, or None if nothing was checkpointed yet.

    Raises:
        CheckpointError: the manifest has an unknown format version.
        StoreError: the store failed.
    """
    key = _manifest_key(run_key, arm)
    try:
        manifest = store.get_json(key)
    except KeyError:
        return None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{key} in {store.uri} has format_version {version!r}, expected {FORMAT_VERSION}: "
            "read it with the fedcompare release that wrote it"
        )
    return manifest


def write_round(
    store: Store,
    run_key: str,
    arm: str,
    round: int,
    arrays: Mapping[str, np.ndarray],
    metrics: Mapping[str, Any],
    config: Mapping[str, Any],
) -> dict:
    """Write one round's model and metrics, then publish the updated manifest.

    Rounds are written in order: ``round`` must be the latest complete round + 1.
    Rewriting the latest round with byte-identical objects is a no-op (safe retries).

    Args:
        store: where to write.
        run_key: the run's key (the Prefect flow-run id).
        arm: the arm's name, e.g. ``large``.
        round: the round number, from 1.
        arrays: the global model's named arrays, in the model's order.
        metrics: the round's metrics (JSON values).
        config: the arm's config; its hash must match the manifest's on later rounds.
    Returns:
        The published manifest.
    Raises:
        CheckpointError: the round is out of order or the config differs from the run's.
        StoreError: the store failed (the previous manifest then still stands).
    """
    prefix = round_prefix(run_key, arm, round)
    digest = config_hash(config)
    objects = {f"{prefix}/{_MODEL}": arrays_to_npz_bytes(arrays),
               f"{prefix}/{_METRICS}": json_bytes(dict(metrics))}
    entries = {key: {"sha256": _sha256(data), "size": len(data)} for key, data in objects.items()}
    manifest = read_manifest(store, run_key, arm) or {
        "run_key": run_key, "arm": arm, "config_hash": digest, "config": dict(config),
        "latest_complete_round": 0, "rounds": {}, "format_version": FORMAT_VERSION,
    }
    where = f"{_manifest_key(run_key, arm)} in {store.uri}"
    if manifest["config_hash"] != digest:
        raise CheckpointError(
            f"{where} was written with config_hash {manifest['config_hash'][:12]}…, got {digest[:12]}… "
            "for this round: a run keeps one config; start a new run key to change it"
        )
    latest = manifest["latest_complete_round"]
    if round == latest and manifest["rounds"][str(round)]["objects"] == entries:
        return manifest
    if round != latest + 1:
        raise CheckpointError(
            f"{where}: expected round {latest + 1} (latest complete is {latest}), got round {round}; "
            f"resume from round {latest + 1} or start a new run key"
        )
    for key, data in objects.items():
        store.put_bytes(key, data)
    manifest["rounds"][str(round)] = {
        "objects": entries, "completed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    manifest["latest_complete_round"] = round
    manifest["versions"] = {"numpy": np.__version__, "python": platform.python_version()}
    store.put_json(_manifest_key(run_key, arm), manifest)
    return manifest


def _read_verified(store: Store, key: str, entry: Mapping[str, Any]) -> bytes:
    """Return an object's bytes after checking them against its manifest entry."""
    try:
        data = store.get_bytes(key)
    except KeyError:
        raise CheckpointError(
            f"checkpoint object {key} is listed in the manifest but missing from {store.uri}: "
            "restore it from a backup or resume from an earlier round"
        ) from None
    got = _sha256(data)
    if got != entry["sha256"] or len(data) != entry["size"]:
        raise CheckpointError(
            f"checkpoint object {key} in {store.uri} is corrupt: expected sha256 {entry['sha256']} "
            f"({entry['size']} bytes), got {got} ({len(data)} bytes); "
            "restore it from a backup or resume from an earlier round"
        )
    return data


def _round_entry(store: Store, run_key: str, arm: str, round: int) -> dict:
    """Return the manifest entry of a complete round, or raise CheckpointError saying which exist."""
    manifest = read_manifest(store, run_key, arm)
    if manifest is None:
        raise CheckpointError(
            f"no checkpoint for run {run_key!r} arm {arm!r} in {store.uri} "
            f"({_manifest_key(run_key, arm)} is missing): check the run key, arm and store URI"
        )
    entry = manifest["rounds"].get(str(round))
    if entry is None:
        latest = manifest["latest_complete_round"]
        raise CheckpointError(
            f"round {round} of run {run_key!r} arm {arm!r} is not complete in {store.uri} "
            f"(latest complete round: {latest}): load a round from 1 to {latest}"
        )
    return entry


def load_round(
    store: Store, run_key: str, arm: str, round: int
) -> tuple[dict[str, np.ndarray], dict]:
    """Return one complete round's arrays (in saved order) and metrics, verified by sha256.

    Raises:
        CheckpointError: no manifest, the round is not complete, or an object is missing/corrupt.
        StoreError: the store failed.
    """
    prefix = round_prefix(run_key, arm, round)
    objects = _round_entry(store, run_key, arm, round)["objects"]
    model_key, metrics_key = f"{prefix}/{_MODEL}", f"{prefix}/{_METRICS}"
    model = _read_verified(store, model_key, objects[model_key])
    metrics = _read_verified(store, metrics_key, objects[metrics_key])
    return npz_bytes_to_arrays(model), json.loads(metrics.decode("utf-8"))


def load_latest(store: Store, run_key: str, arm: str) -> tuple[int, dict[str, np.ndarray], dict]:
    """Return the latest complete round's number, arrays and metrics.

    Raises:
        CheckpointError: nothing was checkpointed for this run and arm, or an object is corrupt.
        StoreError: the store failed.
    """
    manifest = read_manifest(store, run_key, arm)
    latest = manifest["latest_complete_round"] if manifest else 0
    if latest < 1:
        raise CheckpointError(
            f"no complete round for run {run_key!r} arm {arm!r} in {store.uri}: "
            "start from round 1, or check the run key, arm and store URI"
        )
    arrays, metrics = load_round(store, run_key, arm, latest)
    return latest, arrays, metrics


def round_metrics(store: Store, run_key: str, arm: str) -> list[dict]:
    """Return the metrics of every complete round in order, each with its ``round`` added.

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
        data = _read_verified(store, key, manifest["rounds"][str(round)]["objects"][key])
        out.append({**json.loads(data.decode("utf-8")), "round": round})
    return out
