"""Tests of what a resumed arm relies on: load_latest_good skips damaged rounds and says why, rewind discards
rounds so they can be trained again, and a corrupt manifest is a one-line error; on a local directory and real S3.
"""

from __future__ import annotations

from datetime import datetime

import pytest

from infra.checkpoints import (
    CheckpointError, GoodRound, SkippedRound, load_latest, load_latest_good, read_manifest, rewind, round_metrics,
    round_prefix, write_round,
)
from infra.store import Store
from tests.store_helpers import CONFIG, META, assert_same_arrays, flip_byte, model_arrays, model_key, write_rounds


def test_flipped_byte_makes_load_latest_good_return_the_previous_round(store: Store) -> None:
    # Arrange: three rounds, one byte of round 3's model flipped
    write_rounds(store, "run-c", "large", [0.5, 0.6, 0.7])
    flip_byte(store, model_key("run-c", "large", 3))
    # Act
    good = load_latest_good(store, "run-c", "large")
    # Assert
    assert isinstance(good, GoodRound) and good.round == 2
    assert_same_arrays(good.arrays, model_arrays(2))
    assert good.metrics == {"accuracy": 0.6} and good.meta["round"] == 2 and good.meta["model"] == META["model"]
    assert [(s.round, s.reason) for s in good.skipped] == [(3, "corrupt")]
    assert model_key("run-c", "large", 3) in good.skipped[0].detail and "expected xxh3_128" in good.skipped[0].detail
    with pytest.raises(CheckpointError, match="corrupt"):
        load_latest(store, "run-c", "large")  # the strict loader still refuses


def test_missing_object_is_skipped_with_its_reason(store: Store) -> None:
    write_rounds(store, "run-c", "small", [0.5, 0.6])
    store.delete(f"{round_prefix('run-c', 'small', 2)}/checkpoint.json")
    good = load_latest_good(store, "run-c", "small")
    assert good.round == 1 and good.skipped == (SkippedRound(2, "missing", good.skipped[0].detail),)
    assert "checkpoint.json" in good.skipped[0].detail and "missing" in good.skipped[0].detail


def test_no_good_round_is_explained(store: Store) -> None:
    write_rounds(store, "run-c", "large", [0.5])
    flip_byte(store, model_key("run-c", "large", 1))
    with pytest.raises(CheckpointError, match="round 1 corrupt.*rewind to round 0") as info:
        load_latest_good(store, "run-c", "large")
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="no complete round"):
        load_latest_good(store, "run-c", "other-arm")


def test_rewind_then_rewrite_the_corrupt_round(store: Store) -> None:
    # Arrange: round 3 of 3 is corrupt
    write_rounds(store, "run-r", "large", [0.5, 0.6, 0.7])
    flip_byte(store, model_key("run-r", "large", 3))
    good = load_latest_good(store, "run-r", "large")
    # Act: rewind to the good round and re-train round 3
    rewound = rewind(store, "run-r", "large", good.round, "round 3: corrupt model.npz")
    with pytest.raises(CheckpointError, match="expected round 3"):
        write_round(store, "run-r", "large", 4, model_arrays(4), {}, CONFIG)
    write_round(store, "run-r", "large", 3, model_arrays(33), {"accuracy": 0.75}, CONFIG, meta=META, score=0.75)
    # Assert
    assert rewound["latest_complete_round"] == 2 and sorted(rewound["rounds"]) == ["1", "2"]
    [discarded] = read_manifest(store, "run-r", "large")["discarded"]
    assert discarded["round"] == 3 and discarded["reason"] == "round 3: corrupt model.npz"
    assert datetime.fromisoformat(discarded["at"]) and model_key("run-r", "large", 3) in discarded["entry"]["objects"]
    latest, arrays, metrics = load_latest(store, "run-r", "large")
    assert latest == 3 and metrics == {"accuracy": 0.75}
    assert_same_arrays(arrays, model_arrays(33))
    assert [m["accuracy"] for m in round_metrics(store, "run-r", "large")] == [0.5, 0.6, 0.75]


def test_rewind_guards(store: Store) -> None:
    write_rounds(store, "run-r", "small", [0.9, 0.1, 0.2], keep_last=1)  # round 2 pruned
    with pytest.raises(CheckpointError, match="latest complete is 3"):
        rewind(store, "run-r", "small", 4, "x")
    with pytest.raises(CheckpointError, match="pruned by retention.*kept round \\[1, 3\\]"):
        rewind(store, "run-r", "small", 2, "x")
    with pytest.raises(ValueError, match="reason"):
        rewind(store, "run-r", "small", 1, " ")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        rewind(store, "run-r", "large", 0, "x")
    assert rewind(store, "run-r", "small", 3, "nothing to do")["discarded"] == []
    assert rewind(store, "run-r", "small", 0, "start over")["latest_complete_round"] == 0
    assert round_metrics(store, "run-r", "small") == []
    write_round(store, "run-r", "small", 1, model_arrays(1), {"accuracy": 0.3}, CONFIG)
    assert len(read_manifest(store, "run-r", "small")["discarded"]) == 3


def test_corrupt_manifest_is_a_one_line_checkpoint_error(store: Store) -> None:
    write_rounds(store, "run-x", "large", [0.5])
    key = "runs/run-x/large/manifest.json"
    store.put_bytes(key, b'{"format_version": 1, "rounds": {')
    for call in (lambda: read_manifest(store, "run-x", "large"),
                 lambda: load_latest_good(store, "run-x", "large"),
                 lambda: write_round(store, "run-x", "large", 2, model_arrays(2), {}, CONFIG)):
        with pytest.raises(CheckpointError) as info:
            call()
        message = str(info.value)
        assert key in message and store.uri in message and "not JSON" in message
        assert "restore it from a backup" in message and "\n" not in message
