"""An arm's exported models in the store, with their ``deploy.json``, and verified reads of them.

Layout (identical on every backend)::

    runs/<run_key>/<arm>/deploy/fp32.onnx     the exported graph (int8.onnx, fp16.onnx: its compressed variants)
    runs/<run_key>/<arm>/deploy/deploy.json   per variant: key, bytes, sha256, measurements; opset, input
                                              schema, the training round it came from; written last

Like an arm's manifest, ``deploy.json`` is the commit point: a variant is deployed once it
lists it. A read checks the object's size and sha256 against its entry before anyone
loads it (a model is small next to a checkpoint history, and a server loads it once).
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any, Mapping

from infra._layout import deploy_prefix
from infra.store import ObjectNotFound, Store, StoreError

__all__ = ["DEPLOY_FORMAT_VERSION", "DeploymentError", "deploy_json_key", "latest_deployed_run", "load_variant",
           "read_deployment", "variant_key", "write_deployment"]

DEPLOY_FORMAT_VERSION = 1


class DeploymentError(RuntimeError):
    """An arm's deployment is missing, incomplete or corrupt; the message says which and what to do."""


def variant_key(run_key: str, arm: str, variant: str) -> str:
    """Return the key of one exported variant: ``runs/<run_key>/<arm>/deploy/<variant>.onnx``."""
    return f"{deploy_prefix(run_key, arm)}/{variant}.onnx"


def deploy_json_key(run_key: str, arm: str) -> str:
    """Return the key of an arm's ``deploy.json``."""
    return f"{deploy_prefix(run_key, arm)}/deploy.json"


def write_deployment(store: Store, run_key: str, arm: str, *, models: Mapping[str, bytes],
                     document: Mapping[str, Any]) -> dict[str, Any]:
    """Write every variant's ONNX bytes, then ``deploy.json`` (``document`` plus keys, sizes, digests) last.

    Args:
        store: where to write.
        run_key: the run's key.
        arm: the arm's name.
        models: variant name -> serialized ONNX model.
        document: what deploy.json says besides the objects: ``variants`` (variant -> its
            measurements), the model, training round, opset, input schema, ...
    Returns:
        The published deploy.json.
    Raises:
        ValueError: ``document["variants"]`` does not name exactly the variants of ``models``.
        StoreError: the store failed (before deploy.json: any earlier deployment still stands).
    """
    described = dict(document.get("variants") or {})
    if set(described) != set(models):
        raise ValueError(f"deploy.json would describe variants {sorted(described)} but the models are "
                         f"{sorted(models)}: pass one description per model")
    variants = {}
    for name, data in models.items():
        key = variant_key(run_key, arm, name)
        store.put_bytes(key, data)
        variants[name] = {**described[name], "variant": name, "key": key, "bytes": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()}
    published = {**document, "format_version": DEPLOY_FORMAT_VERSION, "run_key": run_key, "arm": arm,
                 "variants": variants, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    store.put_json(deploy_json_key(run_key, arm), published)
    return published


def read_deployment(store: Store, run_key: str, arm: str) -> dict[str, Any]:
    """Return an arm's deploy.json.

    Raises:
        DeploymentError: there is none, or it is not a deploy.json this version reads.
        StoreError: the store failed.
    """
    key = deploy_json_key(run_key, arm)
    try:
        document = store.get_json(key)
    except ObjectNotFound:
        raise DeploymentError(f"no deployment of arm {arm!r} in run {run_key!r} in {store.uri} ({key} is missing): "
                              "check the run key and arm, or run the comparison again to export it") from None
    if not isinstance(document, dict) or document.get("format_version") != DEPLOY_FORMAT_VERSION:
        raise DeploymentError(f"{key} in {store.uri} is not a deploy.json of format {DEPLOY_FORMAT_VERSION}: "
                              "read it with the fedcompare release that wrote it")
    return document


def load_variant(store: Store, run_key: str, arm: str, variant: str) -> tuple[bytes, dict[str, Any]]:
    """Return one variant's ONNX bytes, verified against deploy.json, and the deploy.json.

    Raises:
        DeploymentError: no such deployment or variant, or the bytes differ from their entry.
        StoreError: the store failed.
    """
    document = read_deployment(store, run_key, arm)
    entry = document["variants"].get(variant)
    if entry is None:
        skipped = document.get("skipped", {}).get(variant)
        why = f" ({skipped})" if skipped else ""
        raise DeploymentError(f"arm {arm!r} of run {run_key!r} has no {variant} variant{why}: pick one of "
                              f"{', '.join(document['variants'])}")
    try:
        data = store.get_bytes(entry["key"])
    except ObjectNotFound:
        raise DeploymentError(f"{entry['key']} is listed in deploy.json but missing from {store.uri}: "
                              "run the comparison again to export it") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"] or len(data) != entry["bytes"]:
        raise DeploymentError(f"{entry['key']} in {store.uri} is corrupt: expected sha256 {entry['sha256']} "
                              f"({entry['bytes']} bytes), got {digest} ({len(data)} bytes); refusing to serve it: "
                              "run the comparison again to export it")
    return data, document


def latest_deployed_run(store: Store, arm: str) -> str:
    """Return the run key of the newest deployment of ``arm`` (by deploy.json's created_at).

    Raises:
        DeploymentError: no run in the store deployed that arm.
        StoreError: the store failed.
    """
    found = []
    for key in store.list_keys("runs/"):
        parts = key.split("/")
        if len(parts) == 5 and parts[2] == arm and parts[3:] == ["deploy", "deploy.json"]:
            try:
                found.append((store.get_json(key).get("created_at", ""), parts[1]))
            except (StoreError, AttributeError):
                continue
    if not found:
        raise DeploymentError(f"no run in {store.uri} deployed an arm {arm!r}: run `fedcompare demo` first, "
                              "or check --arm and --store")
    return max(found)[1]
