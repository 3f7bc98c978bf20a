"""Tests of self-describing, verified checkpoints: checkpoint.json, skipping bad rounds, rewind, retention,
large models and S3 outages, on a local directory and a real S3 server."""

from __future__ import annotations

import io
import shutil
import subprocess
import threading
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from minio import Minio

from infra._npz import NpzStreamReader
from infra.checkpoints import (
    CheckpointError, GoodRound, SkippedRound, arrays_to_npz_bytes, config_hash, load_latest, load_latest_good,
    load_model, load_round, read_checkpoint, read_manifest, rewind, round_metrics, round_prefix, write_round,
)
from infra.store import S3Store, Store, StoreError, open_store
from tests.tcpproxy import TcpProxy
from tests.test_store import (  # noqa: F401 - fixtures shared with the store tests
    ACCESS, CONFIG, SECRET, _arrays, _assert_same_arrays, proxied_env, proxy, s3_env, s3_server, store,
)

META = {"model": {"name": "cnn", "args": {"input_shape": [1, 28, 28], "num_classes": 10}},
        "privacy": {"accountant": "rdp", "history": [[1.1, 0.01, 30]], "epsilon": 2.5}}


def _flip_byte(store: Store, key: str) -> None:
    """Flip one byte in the middle of a stored object (a bit-rot fault injected on purpose)."""
    data = bytearray(store.get_bytes(key))
    data[len(data) // 2] ^= 0x01
    store.put_bytes(key, bytes(data))


def _write_rounds(store: Store, run: str, arm: str, scores: list[float], *, keep_last: int = 0) -> dict:
    """Write rounds 1..len(scores) with models _arrays(r) and the given scores; return the last manifest."""
    manifest = {}
    for r, score in enumerate(scores, start=1):
        manifest = write_round(store, run, arm, r, _arrays(r), {"accuracy": score}, CONFIG,
                               meta=META, score=score, keep_last=keep_last)
    return manifest


def _model_key(run: str, arm: str, r: int) -> str:
    """Return the key of a round's model."""
    return f"{round_prefix(run, arm, r)}/model.npz"


def _large_arrays(megabytes: int) -> dict[str, np.ndarray]:
    """Return about ``megabytes`` MB of float32 arrays in three layers."""
    rng = np.random.default_rng(7)
    n = megabytes * 1_000_000 // 4
    return {"embed.weight": rng.standard_normal(n // 2, dtype=np.float32).reshape(-1, 100),
            "fc.weight": rng.standard_normal(n // 2 - 10, dtype=np.float32),
            "fc.bias": np.arange(10, dtype=np.float32)}


# --- checkpoint.json -------------------------------------------------------------------


def test_checkpoint_json_describes_the_round(store: Store) -> None:
    # Arrange
    before = datetime.now(timezone.utc).replace(microsecond=0)
    # Act
    manifest = write_round(store, "run-m", "large", 1, _arrays(1), {"accuracy": 0.5}, CONFIG,
                           meta=META, score=0.5)
    doc = read_checkpoint(store, "run-m", "large", 1)
    # Assert: the document
    assert doc["format_version"] == 1 and (doc["run_key"], doc["arm"], doc["round"]) == ("run-m", "large", 1)
    assert doc["model"] == META["model"] and doc["privacy"] == META["privacy"] and doc["score"] == 0.5
    assert doc["config"] == CONFIG and doc["config_hash"] == config_hash(CONFIG)
    assert doc["arrays"][0] == {"name": "conv1.weight", "dtype": "float32", "shape": [4, 3, 3]}
    assert [a["name"] for a in doc["arrays"]] == list(_arrays(1)), "arrays keep the model's order"
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
    write_round(store, "run-m", "small", 1, _arrays(1), {}, CONFIG)
    doc = read_checkpoint(store, "run-m", "small", 1)
    assert doc["model"] is None and doc["privacy"] is None and doc["score"] is None
    with pytest.raises(ValueError, match="unknown \\['modle'\\]"):
        write_round(store, "run-m", "small", 2, _arrays(2), {}, CONFIG, meta={"modle": {"name": "cnn"}})
    with pytest.raises(ValueError, match="meta\\['model'\\]"):
        write_round(store, "run-m", "small", 2, _arrays(2), {}, CONFIG, meta={"model": {"args": {}}})
    with pytest.raises(ValueError, match="score"):
        write_round(store, "run-m", "small", 2, _arrays(2), {}, CONFIG, score=float("nan"))
    with pytest.raises(ValueError, match="keep_last"):
        write_round(store, "run-m", "small", 2, _arrays(2), {}, CONFIG, keep_last=-1)
    assert read_manifest(store, "run-m", "small")["latest_complete_round"] == 1


def test_identical_retry_is_a_no_op_despite_a_new_timestamp(store: Store) -> None:
    first = write_round(store, "r", "large", 1, _arrays(1), {"accuracy": 0.5}, CONFIG, meta=META)
    doc = read_checkpoint(store, "r", "large", 1)
    again = write_round(store, "r", "large", 1, _arrays(1), {"accuracy": 0.5}, CONFIG, meta=META)
    assert again == first and read_checkpoint(store, "r", "large", 1) == doc


# --- skipping bad rounds and rewinding ------------------------------------------------


def test_flipped_byte_makes_load_latest_good_return_the_previous_round(store: Store) -> None:
    # Arrange: three rounds, one byte of round 3's model flipped
    _write_rounds(store, "run-c", "large", [0.5, 0.6, 0.7])
    _flip_byte(store, _model_key("run-c", "large", 3))
    # Act
    good = load_latest_good(store, "run-c", "large")
    # Assert
    assert isinstance(good, GoodRound) and good.round == 2
    _assert_same_arrays(good.arrays, _arrays(2))
    assert good.metrics == {"accuracy": 0.6} and good.meta["round"] == 2 and good.meta["model"] == META["model"]
    assert [(s.round, s.reason) for s in good.skipped] == [(3, "corrupt")]
    assert _model_key("run-c", "large", 3) in good.skipped[0].detail and "expected xxh3_128" in good.skipped[0].detail
    with pytest.raises(CheckpointError, match="corrupt"):
        load_latest(store, "run-c", "large")  # the strict loader still refuses


def test_missing_object_is_skipped_with_its_reason(store: Store) -> None:
    _write_rounds(store, "run-c", "small", [0.5, 0.6])
    store.delete(f"{round_prefix('run-c', 'small', 2)}/checkpoint.json")
    good = load_latest_good(store, "run-c", "small")
    assert good.round == 1 and good.skipped == (SkippedRound(2, "missing", good.skipped[0].detail),)
    assert "checkpoint.json" in good.skipped[0].detail and "missing" in good.skipped[0].detail


def test_no_good_round_is_explained(store: Store) -> None:
    _write_rounds(store, "run-c", "large", [0.5])
    _flip_byte(store, _model_key("run-c", "large", 1))
    with pytest.raises(CheckpointError, match="round 1 corrupt.*rewind to round 0") as info:
        load_latest_good(store, "run-c", "large")
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="no complete round"):
        load_latest_good(store, "run-c", "other-arm")


def test_rewind_then_rewrite_the_corrupt_round(store: Store) -> None:
    # Arrange: round 3 of 3 is corrupt
    _write_rounds(store, "run-r", "large", [0.5, 0.6, 0.7])
    _flip_byte(store, _model_key("run-r", "large", 3))
    good = load_latest_good(store, "run-r", "large")
    # Act: rewind to the good round and re-train round 3
    rewound = rewind(store, "run-r", "large", good.round, "round 3: corrupt model.npz")
    with pytest.raises(CheckpointError, match="expected round 3"):
        write_round(store, "run-r", "large", 4, _arrays(4), {}, CONFIG)
    write_round(store, "run-r", "large", 3, _arrays(33), {"accuracy": 0.75}, CONFIG, meta=META, score=0.75)
    # Assert
    assert rewound["latest_complete_round"] == 2 and sorted(rewound["rounds"]) == ["1", "2"]
    [discarded] = read_manifest(store, "run-r", "large")["discarded"]
    assert discarded["round"] == 3 and discarded["reason"] == "round 3: corrupt model.npz"
    assert datetime.fromisoformat(discarded["at"]) and _model_key("run-r", "large", 3) in discarded["entry"]["objects"]
    latest, arrays, metrics = load_latest(store, "run-r", "large")
    assert latest == 3 and metrics == {"accuracy": 0.75}
    _assert_same_arrays(arrays, _arrays(33))
    assert [m["accuracy"] for m in round_metrics(store, "run-r", "large")] == [0.5, 0.6, 0.75]


def test_rewind_guards(store: Store) -> None:
    _write_rounds(store, "run-r", "small", [0.9, 0.1, 0.2], keep_last=1)  # round 2 pruned
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
    write_round(store, "run-r", "small", 1, _arrays(1), {"accuracy": 0.3}, CONFIG)
    assert len(read_manifest(store, "run-r", "small")["discarded"]) == 3


def test_corrupt_manifest_is_a_one_line_checkpoint_error(store: Store) -> None:
    _write_rounds(store, "run-x", "large", [0.5])
    key = "runs/run-x/large/manifest.json"
    store.put_bytes(key, b'{"format_version": 1, "rounds": {')
    for call in (lambda: read_manifest(store, "run-x", "large"),
                 lambda: load_latest_good(store, "run-x", "large"),
                 lambda: write_round(store, "run-x", "large", 2, _arrays(2), {}, CONFIG)):
        with pytest.raises(CheckpointError) as info:
            call()
        message = str(info.value)
        assert key in message and store.uri in message and "not JSON" in message
        assert "restore it from a backup" in message and "\n" not in message


# --- retention ------------------------------------------------------------------------


def test_retention_keeps_the_last_rounds_and_the_best(store: Store) -> None:
    # Arrange / Act: six rounds, keep the last 2; round 2 scores best
    scores = [0.5, 0.9, 0.6, 0.7, 0.65, 0.8]
    manifest = _write_rounds(store, "run-k", "large", scores, keep_last=2)
    # Assert
    kept = {r for r in range(1, 7) if store.exists(_model_key("run-k", "large", r))}
    assert kept == {2, 5, 6}
    assert {int(r) for r, e in manifest["rounds"].items() if "pruned" in e} == {1, 3, 4}
    assert manifest == read_manifest(store, "run-k", "large") and manifest["retention"] == {"keep_last": 2}
    assert [m["accuracy"] for m in round_metrics(store, "run-k", "large")] == scores
    with pytest.raises(CheckpointError, match="round 3 .* pruned by retention") as info:
        load_round(store, "run-k", "large", 3)
    assert "\n" not in str(info.value)
    assert read_checkpoint(store, "run-k", "large", 3)["score"] == 0.6  # the description stays
    arrays, _ = load_round(store, "run-k", "large", 2)
    _assert_same_arrays(arrays, _arrays(2))


def test_load_model_verifies_while_the_manifest_is_read(store: Store) -> None:
    # Arrange: rounds 1-3 with retention keeping the last 1 and the best (round 2)
    _write_rounds(store, "run-m", "large", [0.3, 0.9, 0.5], keep_last=1)
    # Act / Assert: a kept round loads and equals what was written
    _assert_same_arrays(load_model(store, "run-m", "large", 3), _arrays(3))
    _assert_same_arrays(load_model(store, "run-m", "large", 2), _arrays(2))
    # the manifest's reasons win over the failed download they cause
    with pytest.raises(CheckpointError, match="pruned by retention"):
        load_model(store, "run-m", "large", 1)
    with pytest.raises(CheckpointError, match="round 4 .* is not complete .*latest complete round: 3"):
        load_model(store, "run-m", "large", 4)
    with pytest.raises(CheckpointError, match="no checkpoint for run 'run-x'"):
        load_model(store, "run-x", "large", 1)
    _flip_byte(store, _model_key("run-m", "large", 3))
    with pytest.raises(CheckpointError, match="round-0003/model.npz .* is corrupt: expected xxh3_128"):
        load_model(store, "run-m", "large", 3)


def test_retention_off_keeps_every_model(store: Store) -> None:
    _write_rounds(store, "run-k", "small", [0.3, 0.2, 0.1])
    assert all(store.exists(_model_key("run-k", "small", r)) for r in (1, 2, 3))


def test_load_latest_good_reports_pruned_rounds_it_passes(store: Store) -> None:
    _write_rounds(store, "run-k", "large", [0.9, 0.5, 0.6], keep_last=1)  # kept: 1 (best), 3 (last)
    _flip_byte(store, _model_key("run-k", "large", 3))
    good = load_latest_good(store, "run-k", "large")
    assert good.round == 1 and [(s.round, s.reason) for s in good.skipped] == [(3, "corrupt"), (2, "pruned")]


# --- large models and outages (S3) ---------------------------------------------------


def test_large_model_round_trips_through_s3_multipart(s3_server: str, s3_env: str) -> None:
    # Arrange
    store = open_store(f"s3://{s3_env}/big")
    arrays = _large_arrays(40)
    # Act
    manifest = write_round(store, "run-big", "large", 1, arrays, {"accuracy": 0.5}, CONFIG)
    got, _ = load_round(store, "run-big", "large", 1)
    # Assert
    raw = Minio(s3_server.removeprefix("http://"), access_key=ACCESS, secret_key=SECRET, secure=False)
    stat = raw.stat_object(s3_env, f"big/{_model_key('run-big', 'large', 1)}")
    assert stat.etag.strip('"').endswith("-3"), f"expected a 3-part multipart ETag, got {stat.etag}"
    assert stat.size == manifest["rounds"]["1"]["objects"][_model_key("run-big", "large", 1)]["size"] > 40e6
    _assert_same_arrays(got, arrays)


def _open_proxied(bucket: str, monkeypatch: pytest.MonkeyPatch, retry_seconds: str) -> S3Store:
    """Open the store behind the proxy with the given retry bound."""
    monkeypatch.setenv("FEDCOMPARE_S3_RETRY_SECONDS", retry_seconds)
    store = open_store(f"s3://{bucket}")
    assert isinstance(store, S3Store)
    return store


def test_write_round_waits_out_a_two_second_outage(
    proxy: TcpProxy, proxied_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange
    store = _open_proxied(proxied_env, monkeypatch, "20")
    write_round(store, "run-o", "large", 1, _arrays(1), {"accuracy": 0.5}, CONFIG)
    proxy.stop()
    restart = threading.Timer(2.0, proxy.start)
    restart.start()
    started = time.monotonic()
    # Act
    write_round(store, "run-o", "large", 2, _arrays(2), {"accuracy": 0.6}, CONFIG)
    elapsed = time.monotonic() - started
    restart.join()
    # Assert
    assert elapsed > 1.5, f"the outage should have delayed the write, took {elapsed:.1f} s"
    good = load_latest_good(store, "run-o", "large")
    assert good.round == 2 and good.skipped == ()
    _assert_same_arrays(good.arrays, _arrays(2))


def test_write_round_during_a_lasting_outage_records_nothing(
    proxy: TcpProxy, proxied_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: the endpoint goes away for good 8 MiB into round 2's 20 MB model
    store = _open_proxied(proxied_env, monkeypatch, "2")
    write_round(store, "run-o", "small", 1, _arrays(1), {"accuracy": 0.5}, CONFIG)
    proxy.stop_after(8 << 20)
    started = time.monotonic()
    # Act
    with pytest.raises(StoreError) as info:
        write_round(store, "run-o", "small", 2, _large_arrays(20), {"accuracy": 0.6}, CONFIG)
    elapsed = time.monotonic() - started
    # Assert
    assert not proxy.running and 2 <= elapsed < 10, f"expected to give up after the 2 s bound, took {elapsed:.1f} s"
    message = str(info.value)
    assert proxy.endpoint in message and "after retrying for 2 s" in message and "\n" not in message
    proxy.start()
    assert read_manifest(store, "run-o", "small")["latest_complete_round"] == 1, "round 2 was never published"
    write_round(store, "run-o", "small", 2, _arrays(2), {"accuracy": 0.6}, CONFIG)  # a retry goes through
    assert load_latest_good(store, "run-o", "small").round == 2


@pytest.mark.parametrize("direction", ["upload", "download"])
def test_connection_cut_mid_transfer_resumes_and_verifies(
    proxy: TcpProxy, proxied_env: str, monkeypatch: pytest.MonkeyPatch, direction: str
) -> None:
    # Arrange: a 20 MB model; the proxy drops every connection 8 MiB into the transfer, for 1 s
    store = _open_proxied(proxied_env, monkeypatch, "20")
    arrays = _large_arrays(20)
    if direction == "download":
        write_round(store, "run-t", "large", 1, arrays, {}, CONFIG)
    proxy.stop_after(8 << 20, restart_after=1.0)
    started = time.monotonic()
    # Act
    if direction == "upload":
        write_round(store, "run-t", "large", 1, arrays, {}, CONFIG)
    got, _ = load_round(store, "run-t", "large", 1)
    elapsed = time.monotonic() - started
    # Assert
    assert elapsed > 0.9, f"the cut should have cost about 1 s, took {elapsed:.1f} s"
    _assert_same_arrays(got, arrays)


# --- streaming .npz decoding ------------------------------------------------------------


def _odd_arrays() -> dict[str, np.ndarray]:
    """Return arrays that stress the decoder: 0-d, empty, Fortran order, structured, bool, big-endian."""
    return {
        "scalar": np.array(3.5),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "fortran": np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4)),
        "record": np.array([(1, 2.0), (3, 4.0)], dtype=[("a", "<i4"), ("b", "<f8")]),
        "mask": np.array([True, False, True]),
        "big_endian": np.arange(5, dtype=">u4"),
    }


def _np_savez_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Return what np.savez writes (seekable zip, sizes in the local headers, no data descriptors)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 30])
@pytest.mark.parametrize("writer", ["write_npz", "np.savez"])
def test_stream_reader_decodes_npz_in_any_chunking(chunk: int, writer: str) -> None:
    arrays = _odd_arrays()
    data = arrays_to_npz_bytes(arrays) if writer == "write_npz" else _np_savez_bytes(arrays)
    reader = NpzStreamReader(limit=len(data))
    for start in range(0, len(data), chunk):
        reader.write(data[start:start + chunk])
    got = reader.arrays()
    _assert_same_arrays(got, arrays)
    assert got["fortran"].flags.f_contiguous and got["big_endian"].dtype == np.dtype(">u4")


def test_stream_reader_rejects_what_it_cannot_decode() -> None:
    arrays = _odd_arrays()
    data = arrays_to_npz_bytes(arrays)
    truncated = NpzStreamReader(limit=len(data))
    truncated.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="ended inside a member"):
        truncated.arrays()
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    compressed = NpzStreamReader(limit=len(buf.getvalue()))
    compressed.write(buf.getvalue())
    with pytest.raises(ValueError, match="compression method 8"):
        compressed.arrays()
    greedy = NpzStreamReader(limit=100)  # a damaged header must not allocate more than the object holds
    greedy.write(arrays_to_npz_bytes({"big": np.zeros(1000)}))
    with pytest.raises(ValueError, match="more than the 100 expected"):
        greedy.arrays()
