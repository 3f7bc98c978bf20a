"""Tests of checkpoints on a real S3 server: a large model through multipart upload, and writes and reads that
ride out an outage, give up on a lasting one without publishing the round, or resume a transfer cut midway.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from minio import Minio

from infra.checkpoints import load_latest_good, load_round, read_manifest, write_round
from infra.store import S3Store, StoreError, open_store
from tests.s3server import ACCESS, SECRET
from tests.store_helpers import CONFIG, assert_same_arrays, model_arrays, model_key
from tests.tcpproxy import TcpProxy


def _large_arrays(megabytes: int) -> dict[str, np.ndarray]:
    """Return about ``megabytes`` MB of float32 arrays in three layers."""
    rng = np.random.default_rng(7)
    n = megabytes * 1_000_000 // 4
    return {"embed.weight": rng.standard_normal(n // 2, dtype=np.float32).reshape(-1, 100),
            "fc.weight": rng.standard_normal(n // 2 - 10, dtype=np.float32),
            "fc.bias": np.arange(10, dtype=np.float32)}


def test_large_model_round_trips_through_s3_multipart(s3_server: str, s3_env: str) -> None:
    # Arrange
    store = open_store(f"s3://{s3_env}/big")
    arrays = _large_arrays(40)
    # Act
    manifest = write_round(store, "run-big", "large", 1, arrays, {"accuracy": 0.5}, CONFIG)
    got, _ = load_round(store, "run-big", "large", 1)
    # Assert
    raw = Minio(s3_server.removeprefix("http://"), access_key=ACCESS, secret_key=SECRET, secure=False)
    stat = raw.stat_object(s3_env, f"big/{model_key('run-big', 'large', 1)}")
    assert stat.etag.strip('"').endswith("-3"), f"expected a 3-part multipart ETag, got {stat.etag}"
    assert stat.size == manifest["rounds"]["1"]["objects"][model_key("run-big", "large", 1)]["size"] > 40e6
    assert_same_arrays(got, arrays)


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
    write_round(store, "run-o", "large", 1, model_arrays(1), {"accuracy": 0.5}, CONFIG)
    proxy.stop()
    restart = threading.Timer(2.0, proxy.start)
    restart.start()
    started = time.monotonic()
    # Act
    write_round(store, "run-o", "large", 2, model_arrays(2), {"accuracy": 0.6}, CONFIG)
    elapsed = time.monotonic() - started
    restart.join()
    # Assert
    assert elapsed > 1.5, f"the outage should have delayed the write, took {elapsed:.1f} s"
    good = load_latest_good(store, "run-o", "large")
    assert good.round == 2 and good.skipped == ()
    assert_same_arrays(good.arrays, model_arrays(2))


def test_write_round_during_a_lasting_outage_records_nothing(
    proxy: TcpProxy, proxied_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: the endpoint goes away for good 8 MiB into round 2's 20 MB model
    store = _open_proxied(proxied_env, monkeypatch, "2")
    write_round(store, "run-o", "small", 1, model_arrays(1), {"accuracy": 0.5}, CONFIG)
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
    write_round(store, "run-o", "small", 2, model_arrays(2), {"accuracy": 0.6}, CONFIG)  # a retry goes through
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
    assert_same_arrays(got, arrays)
