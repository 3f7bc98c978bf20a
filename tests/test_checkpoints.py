"""Tests of round checkpoints on a local directory and a real S3 server: keys and config hash, writing and loading
rounds, verification against the manifest, the write guards, and the self-describing checkpoint.json.

Skipping bad rounds and rewinding: tests/test_checkpoint_resume.py; retention: tests/test_checkpoint_retention.py;
large models and outages: tests/test_checkpoint_s3.py; the .npz encoding: tests/test_checkpoint_npz.py.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import xxhash

from infra._layout import manifest_key
from infra.checkpoints import (
    CheckpointError, config_hash, load_latest, load_round, read_checkpoint, read_manifest, round_metrics, round_prefix,
    write_round,
)
from infra.store import Store
from tests.store_helpers import CONFIG, META, assert_same_arrays, model_arrays


def test_round_prefix_and_config_hash() -> None:
    assert round_prefix("run1", "large", 7) == "runs/run1/large/round-0007"
    with pytest.raises(ValueError, match="round"):
        round_prefix("run1", "large", 0)
    with pytest.raises(ValueError, match="arm"):
        round_prefix("run1", "a/b", 1)
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_write_two_rounds_and_load_them(store: Store) -> None:
    # Arrange
    run, arm = "run-abc", "large"
    assert read_manifest(store, run, arm) is None and round_metrics(store, run, arm) == []
    # Act
    write_round(store, run, arm, 1, model_arrays(1), {"accuracy": 0.5, "loss": 1.2}, CONFIG)
    manifest = write_round(store, run, arm, 2, model_arrays(2), {"accuracy": 0.7, "loss": 0.9}, CONFIG)
    # Assert
    assert read_manifest(store, run, arm) == manifest
    assert manifest["latest_complete_round"] == 2 and manifest["format_version"] == 1
    assert manifest["config"] == CONFIG and manifest["config_hash"] == config_hash(CONFIG)
    assert sorted(manifest["rounds"]) == ["1", "2"]
    for r in (1, 2):
        objects = manifest["rounds"][str(r)]["objects"]
        prefix = round_prefix(run, arm, r)
        assert sorted(objects) == [f"{prefix}/checkpoint.json", f"{prefix}/metrics.json", f"{prefix}/model.npz"]
        for key, entry in objects.items():
            data = store.get_bytes(key)
            assert entry["size"] == len(data)
            assert entry["sha256"] == hashlib.sha256(data).hexdigest()
            assert entry["xxh3_128"] == xxhash.xxh3_128(data).hexdigest()
    arrays, metrics = load_round(store, run, arm, 1)
    assert_same_arrays(arrays, model_arrays(1))
    assert metrics == {"accuracy": 0.5, "loss": 1.2}
    latest, arrays, metrics = load_latest(store, run, arm)
    assert latest == 2 and metrics["accuracy"] == 0.7
    assert_same_arrays(arrays, model_arrays(2))
    assert round_metrics(store, run, arm) == [
        {"accuracy": 0.5, "loss": 1.2, "round": 1}, {"accuracy": 0.7, "loss": 0.9, "round": 2}]


def test_corrupt_model_is_detected(store: Store) -> None:
    # Arrange
    write_round(store, "r", "small", 1, model_arrays(1), {"accuracy": 0.5}, CONFIG)
    key = f"{round_prefix('r', 'small', 1)}/model.npz"
    data = bytearray(store.get_bytes(key))
    data[len(data) // 2] ^= 0xFF
    store.put_bytes(key, bytes(data))
    # Act / Assert
    with pytest.raises(CheckpointError) as info:
        load_round(store, "r", "small", 1)
    message = str(info.value)
    assert key in message and "expected xxh3_128" in message and "\n" not in message


def test_rounds_recorded_before_xxh3_are_verified_by_sha256(store: Store) -> None:
    # Arrange: a manifest as written before xxh3-128 was recorded, then a flipped byte
    write_round(store, "r", "small", 1, model_arrays(1), {"accuracy": 0.5}, CONFIG)
    manifest = read_manifest(store, "r", "small")
    for entry in manifest["rounds"]["1"]["objects"].values():
        del entry["xxh3_128"]
    store.put_json(manifest_key("r", "small"), manifest)
    arrays, _ = load_round(store, "r", "small", 1)  # the sha256-only entries still verify
    assert_same_arrays(arrays, model_arrays(1))
    key = f"{round_prefix('r', 'small', 1)}/model.npz"
    data = bytearray(store.get_bytes(key))
    data[len(data) // 2] ^= 0xFF
    store.put_bytes(key, bytes(data))
    # Act / Assert
    with pytest.raises(CheckpointError, match="expected sha256"):
        load_round(store, "r", "small", 1)


def test_missing_object_and_incomplete_round_are_explained(store: Store) -> None:
    write_round(store, "r", "small", 1, model_arrays(1), {"accuracy": 0.5}, CONFIG)
    with pytest.raises(CheckpointError, match="latest complete round: 1"):
        load_round(store, "r", "small", 2)
    store.delete(f"{round_prefix('r', 'small', 1)}/metrics.json")
    with pytest.raises(CheckpointError, match="missing"):
        round_metrics(store, "r", "small")
    with pytest.raises(CheckpointError, match="no complete round"):
        load_latest(store, "r", "large")


def test_write_round_guards_order_and_config(store: Store) -> None:
    first = write_round(store, "r", "large", 1, model_arrays(1), {"accuracy": 0.5}, CONFIG)
    again = write_round(store, "r", "large", 1, model_arrays(1), {"accuracy": 0.5}, CONFIG)
    assert again == first  # an identical retry of the latest round is a no-op
    with pytest.raises(CheckpointError, match="expected round 2"):
        write_round(store, "r", "large", 3, model_arrays(3), {}, CONFIG)
    with pytest.raises(CheckpointError, match="expected round 2"):
        write_round(store, "r", "large", 1, model_arrays(9), {"accuracy": 0.1}, CONFIG)
    with pytest.raises(CheckpointError, match="config_hash"):
        write_round(store, "r", "large", 2, model_arrays(2), {}, {**CONFIG, "lr": 0.1})


# --- checkpoint.json ------------------------------------------------------------------


def test_checkpoint_json_describes_the_round(store: Store) -> None:
    # Arrange
    before = datetime.now(timezone.utc).replace(microsecond=0)
    # Act
    manifest = write_round(store, "run-m", "large", 1, model_arrays(1), {"accuracy": 0.5}, CONFIG,
                           meta=META, score=0.5)
    doc = read_checkpoint(store, "run-m", "large", 1)
    # Assert: the document
    assert doc["format_version"] == 1 and (doc["run_key"], doc["arm"], doc["round"]) == ("run-m", "large", 1)
    assert doc["model"] == META["model"] and doc["privacy"] == META["privacy"] and doc["score"] == 0.5
    assert doc["config"] == CONFIG and doc["config_hash"] == config_hash(CONFIG)
    assert doc["arrays"][0] == {"name": "conv1.weight", "dtype": "float32", "shape": [4, 3, 3]}
    assert [a["name"] for a in doc["arrays"]] == list(model_arrays(1)), "arrays keep the model's order"
    assert doc["code"]["fedcompare"] == metadata.version("fedcompare")
    assert doc["code"]["python"] and doc["code"]["numpy"] == np.__version__
    if shutil.which("git"):
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               cwd=Path(__file__).parent).stdout.strip() != ""
        assert (doc["code"]["git_commit"], doc["code"]["git_dirty"]) == (head, dirty)
        assert "git_commit_reason" not in doc["code"]
    assert doc["code"]["fab_hash"] is None, "written from the checkout, not from a FAB"
    assert datetime.fromisoformat(doc["created_at"]) >= before
    # Assert: the manifest lists it with its hash, and the document pins the other objects' hashes
    objects = manifest["rounds"]["1"]["objects"]
    prefix = round_prefix("run-m", "large", 1)
    assert f"{prefix}/checkpoint.json" in objects
    assert doc["objects"]["model.npz"] == objects[f"{prefix}/model.npz"]
    assert doc["objects"]["metrics.json"] == objects[f"{prefix}/metrics.json"]
    assert manifest["rounds"]["1"]["score"] == 0.5


def test_checkpoint_json_without_meta_and_bad_meta(store: Store) -> None:
    write_round(store, "run-m", "small", 1, model_arrays(1), {}, CONFIG)
    doc = read_checkpoint(store, "run-m", "small", 1)
    assert doc["model"] is None and doc["privacy"] is None and doc["score"] is None
    with pytest.raises(ValueError, match="unknown \\['modle'\\]"):
        write_round(store, "run-m", "small", 2, model_arrays(2), {}, CONFIG, meta={"modle": {"name": "cnn"}})
    with pytest.raises(ValueError, match="meta\\['model'\\]"):
        write_round(store, "run-m", "small", 2, model_arrays(2), {}, CONFIG, meta={"model": {"args": {}}})
    with pytest.raises(ValueError, match="score"):
        write_round(store, "run-m", "small", 2, model_arrays(2), {}, CONFIG, score=float("nan"))
    with pytest.raises(ValueError, match="keep_last"):
        write_round(store, "run-m", "small", 2, model_arrays(2), {}, CONFIG, keep_last=-1)
    assert read_manifest(store, "run-m", "small")["latest_complete_round"] == 1


def test_identical_retry_is_a_no_op_despite_a_new_timestamp(store: Store) -> None:
    first = write_round(store, "r", "large", 1, model_arrays(1), {"accuracy": 0.5}, CONFIG, meta=META)
    doc = read_checkpoint(store, "r", "large", 1)
    again = write_round(store, "r", "large", 1, model_arrays(1), {"accuracy": 0.5}, CONFIG, meta=META)
    assert again == first and read_checkpoint(store, "r", "large", 1) == doc
