"""Key layout of run checkpoints and the config hash (private; use infra.checkpoints)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

__all__ = ["META", "METRICS", "MODEL", "arm_prefix", "config_hash", "deploy_prefix", "federation_key", "manifest_key",
           "plot_key", "report_key", "round_prefix"]

MODEL, METRICS, META = "model.npz", "metrics.json", "checkpoint.json"  # a round's objects, under round_prefix


def _check_name(what: str, value: str) -> str:
    """Return ``value`` after checking it is one path part (non-empty, no '/', not '.' or '..')."""
    if not isinstance(value, str) or not value or "/" in value or value in (".", ".."):
        raise ValueError(f"expected {what} to be a non-empty name without '/', got {value!r}")
    return value


def arm_prefix(run_key: str, arm: str) -> str:
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
    return f"{arm_prefix(run_key, arm)}/round-{round:04d}"


def deploy_prefix(run_key: str, arm: str) -> str:
    """Return the key prefix of an arm's exported models: ``runs/<run_key>/<arm>/deploy``."""
    return f"{arm_prefix(run_key, arm)}/deploy"


def manifest_key(run_key: str, arm: str) -> str:
    """Return the manifest's key for one arm of one run."""
    return f"{arm_prefix(run_key, arm)}/manifest.json"


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
