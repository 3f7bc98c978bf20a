"""Tests of checkpoint retention (``keep_last``): which models are kept, that metrics and checkpoint.json stay,
and how loads explain a pruned round; on a local directory and a real S3 server.
"""

from __future__ import annotations

import pytest

from infra.checkpoints import (
    CheckpointError, load_latest_good, load_model, load_round, read_checkpoint, read_manifest, round_metrics,
)
from infra.store import Store
from tests.store_helpers import assert_same_arrays, flip_byte, model_arrays, model_key, write_rounds


def test_retention_keeps_the_last_rounds_and_the_best(store: Store) -> None:
    # Arrange / Act: six rounds, keep the last 2; round 2 scores best
    scores = [0.5, 0.9, 0.6, 0.7, 0.65, 0.8]
    manifest = write_rounds(store, "run-k", "large", scores, keep_last=2)
    # Assert
    kept = {r for r in range(1, 7) if store.exists(model_key("run-k", "large", r))}
    assert kept == {2, 5, 6}
    assert {int(r) for r, e in manifest["rounds"].items() if "pruned" in e} == {1, 3, 4}
    assert manifest == read_manifest(store, "run-k", "large") and manifest["retention"] == {"keep_last": 2}
    assert [m["accuracy"] for m in round_metrics(store, "run-k", "large")] == scores
    with pytest.raises(CheckpointError, match="round 3 .* pruned by retention") as info:
        load_round(store, "run-k", "large", 3)
    assert "\n" not in str(info.value)
    assert read_checkpoint(store, "run-k", "large", 3)["score"] == 0.6  # the description stays
    arrays, _ = load_round(store, "run-k", "large", 2)
    assert_same_arrays(arrays, model_arrays(2))


def test_load_model_verifies_while_the_manifest_is_read(store: Store) -> None:
    # Arrange: rounds 1-3 with retention keeping the last 1 and the best (round 2)
    write_rounds(store, "run-m", "large", [0.3, 0.9, 0.5], keep_last=1)
    # Act / Assert: a kept round loads and equals what was written
    assert_same_arrays(load_model(store, "run-m", "large", 3), model_arrays(3))
    assert_same_arrays(load_model(store, "run-m", "large", 2), model_arrays(2))
    # the manifest's reasons win over the failed download they cause
    with pytest.raises(CheckpointError, match="pruned by retention"):
        load_model(store, "run-m", "large", 1)
    with pytest.raises(CheckpointError, match="round 4 .* is not complete .*latest complete round: 3"):
        load_model(store, "run-m", "large", 4)
    with pytest.raises(CheckpointError, match="no checkpoint for run 'run-x'"):
        load_model(store, "run-x", "large", 1)
    flip_byte(store, model_key("run-m", "large", 3))
    with pytest.raises(CheckpointError, match="round-0003/model.npz .* is corrupt: expected xxh3_128"):
        load_model(store, "run-m", "large", 3)


def test_retention_off_keeps_every_model(store: Store) -> None:
    write_rounds(store, "run-k", "small", [0.3, 0.2, 0.1])
    assert all(store.exists(model_key("run-k", "small", r)) for r in (1, 2, 3))


def test_load_latest_good_reports_pruned_rounds_it_passes(store: Store) -> None:
    write_rounds(store, "run-k", "large", [0.9, 0.5, 0.6], keep_last=1)  # kept: 1 (best), 3 (last)
    flip_byte(store, model_key("run-k", "large", 3))
    good = load_latest_good(store, "run-k", "large")
    assert good.round == 1 and [(s.round, s.reason) for s in good.skipped] == [(3, "corrupt"), (2, "pruned")]
