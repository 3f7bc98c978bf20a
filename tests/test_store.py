"""Tests of the object store and round checkpoints, on a local directory and a real S3 server."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import threading
import time
import urllib.request
import uuid
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import numpy as np
import pytest
import xxhash

from infra.checkpoints import (
    CheckpointError, arrays_to_npz_bytes, config_hash, load_latest, load_round,
    npz_bytes_to_arrays, read_manifest, round_metrics, round_prefix, write_round,
)
from infra._layout import manifest_key
from infra.store import LocalStore, ObjectNotFound, S3Store, Store, StoreError, open_store
from tests.s3server import free_port, running_s3_server
from tests.tcpproxy import TcpProxy

SECRET = "test-secret-do-not-print"
ACCESS = "test-access"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Run one moto S3 server for the session and yield its endpoint URL."""
    with running_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the FEDCOMPARE_S3_* environment at the test server and return a fresh bucket name."""
    monkeypatch.setenv("FEDCOMPARE_S3_ENDPOINT", s3_server)
    monkeypatch.setenv("FEDCOMPARE_S3_ACCESS_KEY", ACCESS)
    monkeypatch.setenv("FEDCOMPARE_S3_SECRET_KEY", SECRET)
    monkeypatch.delenv("FEDCOMPARE_S3_SECURE", raising=False)
    monkeypatch.delenv("FEDCOMPARE_S3_REGION", raising=False)
    return f"fc-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """Return an empty store of each backend (S3 with a prefix inside a fresh bucket)."""
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    bucket = request.getfixturevalue("s3_env")
    return open_store(f"s3://{bucket}/team/fedcompare")


@pytest.fixture
def proxy(s3_server: str) -> Iterator[TcpProxy]:
    """Run a TCP proxy in front of the session's S3 server: stopping it injects an outage."""
    parts = urlsplit(s3_server)
    with TcpProxy(parts.hostname, parts.port) as proxy:
        yield proxy


@pytest.fixture
def proxied_env(proxy: TcpProxy, s3_env: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point FEDCOMPARE_S3_ENDPOINT at the proxy and return a fresh bucket name."""
    monkeypatch.setenv("FEDCOMPARE_S3_ENDPOINT", proxy.endpoint)
    return s3_env


@contextmanager
def answering_503() -> Iterator[tuple[str, int]]:
    """Run an HTTP server on 127.0.0.1 that answers every request 503 with an S3 error (an injected fault)."""

    class Unavailable(BaseHTTPRequestHandler):
        def answer(self) -> None:
            """Read the request body, then answer 503 ServiceUnavailable."""
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
                    b"<Message>injected outage</Message><Resource>/</Resource><RequestId>1</RequestId></Error>")
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = answer

        def log_message(self, *args: object) -> None:
            """Keep the test output quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield "127.0.0.1", server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --- store ---------------------------------------------------------------------------


def test_put_get_exists_delete(store: Store) -> None:
    # Arrange / Act
    store.put_bytes("runs/a/b.bin", b"\x00\x01payload")
    # Assert
    assert store.get_bytes("runs/a/b.bin") == b"\x00\x01payload"
    assert store.exists("runs/a/b.bin")
    assert not store.exists("runs/a/other.bin")
    store.put_bytes("runs/a/b.bin", b"replaced")
    assert store.get_bytes("runs/a/b.bin") == b"replaced"
    store.delete("runs/a/b.bin")
    assert not store.exists("runs/a/b.bin")
    store.delete("runs/a/b.bin")  # deleting a missing key is a no-op on both backends
    assert store.list_keys() == []


def test_json_round_trip(store: Store) -> None:
    obj = {"b": [1, 2.5, None], "a": {"ü": "ok"}, "flag": True}
    store.put_json("runs/x/report.json", obj)
    assert store.get_json("runs/x/report.json") == obj
    text = store.get_bytes("runs/x/report.json").decode("utf-8")
    assert text.index('"a"') < text.index('"b"') and '\n  "a"' in text  # sorted, indent 2


def test_missing_key_raises_key_error(store: Store) -> None:
    with pytest.raises(KeyError) as info:
        store.get_bytes("runs/nope.bin")
    assert isinstance(info.value, ObjectNotFound)
    assert info.value.args[0] == "runs/nope.bin"
    assert "runs/nope.bin" in str(info.value) and store.uri in str(info.value)


def test_list_keys_sorted_recursive_with_prefix(store: Store) -> None:
    for key in ["runs/r2/x", "runs/r1/large/round-0001/model.npz", "runs/r1/small/m", "top.txt"]:
        store.put_bytes(key, b"1")
    assert store.list_keys() == sorted(
        ["runs/r1/large/round-0001/model.npz", "runs/r1/small/m", "runs/r2/x", "top.txt"])
    assert store.list_keys("runs/r1/") == ["runs/r1/large/round-0001/model.npz", "runs/r1/small/m"]
    assert store.list_keys("runs/r") == ["runs/r1/large/round-0001/model.npz",
                                         "runs/r1/small/m", "runs/r2/x"]
    assert store.list_keys("nothing/") == []


@pytest.mark.parametrize("key", ["../escape", "runs/../../etc", "/abs", "a//b", "", "runs/"])
def test_unsafe_keys_rejected(store: Store, key: str) -> None:
    with pytest.raises(ValueError, match="relative"):
        store.put_bytes(key, b"x")


def test_local_store_writes_atomically_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("a/b/c.bin", b"x" * 1000)
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["c.bin"]
    store.delete("a/b/c.bin")
    assert list(tmp_path.iterdir()) == []  # empty directories are pruned


def test_open_store_local_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    by_uri = open_store((tmp_path / "u").as_uri())
    by_rel = open_store("rel/dir")
    assert isinstance(by_uri, LocalStore) and by_uri.root == tmp_path.resolve() / "u"
    assert isinstance(by_rel, LocalStore) and by_rel.root == tmp_path.resolve() / "rel" / "dir"
    assert by_rel.uri == (tmp_path.resolve() / "rel" / "dir").as_uri()


@pytest.mark.parametrize("uri", ["gs://bucket", "http://host/x", "s3://"])
def test_open_store_rejects_other_schemes(uri: str) -> None:
    with pytest.raises(ValueError, match="s3://"):
        open_store(uri)


def test_open_store_s3_parses_bucket_and_prefix_and_creates_bucket(
    s3_server: str, s3_env: str
) -> None:
    from minio import Minio

    raw = Minio(s3_server.removeprefix("http://"), access_key=ACCESS, secret_key=SECRET,
                secure=False)
    assert not raw.bucket_exists(s3_env)
    store = open_store(f"s3://{s3_env}/a/b/")
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.uri) == (s3_env, "a/b", f"s3://{s3_env}/a/b")
    assert raw.bucket_exists(s3_env)
    store.put_bytes("k.txt", b"v")
    assert [o.object_name for o in raw.list_objects(s3_env, recursive=True)] == ["a/b/k.txt"]
    assert open_store(f"s3://{s3_env}").list_keys() == ["a/b/k.txt"]  # existing bucket is reused
    assert open_store(f"s3://{s3_env}/other").list_keys() == []  # prefixes isolate stores


def test_unreachable_s3_fails_fast_without_leaking_secret(
    s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("FEDCOMPARE_S3_ENDPOINT", endpoint)
    started = time.monotonic()
    with pytest.raises(StoreError) as info:
        open_store(f"s3://{s3_env}")
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert endpoint in message and "FEDCOMPARE_S3_ENDPOINT" in message
    assert SECRET not in message and "\n" not in message
    assert elapsed < 15, f"took {elapsed:.1f} s to report a dead endpoint"


def test_missing_endpoint_says_which_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDCOMPARE_S3_ENDPOINT", raising=False)
    with pytest.raises(StoreError, match="set FEDCOMPARE_S3_ENDPOINT"):
        open_store("s3://bucket/prefix")


@pytest.mark.parametrize(("endpoint", "secure", "match"), [
    ("ftp://h:1", None, "FEDCOMPARE_S3_ENDPOINT"),
    ("http://h:1/path", None, "drop any path"),
    ("h:1", "maybe", "FEDCOMPARE_S3_SECURE"),
    ("http://h:1", "true", "agree"),
])
def test_bad_s3_settings_are_explained(
    monkeypatch: pytest.MonkeyPatch, endpoint: str, secure: str | None, match: str
) -> None:
    monkeypatch.setenv("FEDCOMPARE_S3_ENDPOINT", endpoint)
    if secure is None:
        monkeypatch.delenv("FEDCOMPARE_S3_SECURE", raising=False)
    else:
        monkeypatch.setenv("FEDCOMPARE_S3_SECURE", secure)
    with pytest.raises(StoreError, match=match):
        open_store("s3://bucket")


def test_endpoint_without_scheme_defaults_to_https(
    s3_server: str, s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    host_port = s3_server.removeprefix("http://")
    monkeypatch.setenv("FEDCOMPARE_S3_ENDPOINT", host_port)
    with pytest.raises(StoreError, match=f"https://{host_port}"):  # the test server speaks http
        open_store(f"s3://{s3_env}")
    monkeypatch.setenv("FEDCOMPARE_S3_SECURE", "false")
    assert open_store(f"s3://{s3_env}").list_keys() == []


def test_s3_credentials_fall_back_to_aws_variables(
    s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FEDCOMPARE_S3_ACCESS_KEY")
    monkeypatch.delenv("FEDCOMPARE_S3_SECRET_KEY")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(StoreError, match="FEDCOMPARE_S3_SECRET_KEY"):
        open_store(f"s3://{s3_env}")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    open_store(f"s3://{s3_env}").put_bytes("k", b"v")


def test_streams_round_trip_from_the_current_position(store: Store) -> None:
    # Arrange: a payload between a header and a trailer, the stream positioned at the payload
    payload = os.urandom(5_000_003)
    src = io.BytesIO(b"HEAD" + payload + b"TAIL")
    src.seek(4)
    # Act
    store.put_stream("runs/s/blob.bin", src, len(payload))
    out = io.BytesIO()
    size = store.get_stream("runs/s/blob.bin", out)
    # Assert
    assert src.tell() == 4 + len(payload), "put_stream reads exactly `length` bytes"
    assert size == len(payload) and out.getvalue() == payload
    assert store.get_bytes("runs/s/blob.bin") == payload
    with pytest.raises(ObjectNotFound):
        store.get_stream("runs/s/none.bin", io.BytesIO())


def test_short_stream_is_rejected_and_stores_nothing(store: Store) -> None:
    store.put_bytes("runs/s/x.bin", b"old")
    with pytest.raises(ValueError, match="expected 10 bytes from the stream, got 3"):
        store.put_stream("runs/s/x.bin", io.BytesIO(b"abc"), 10)
    assert store.get_bytes("runs/s/x.bin") == b"old", "a failed write keeps the previous object whole"
    assert store.list_keys() == ["runs/s/x.bin"]
    with pytest.raises(ValueError, match="length"):
        store.put_stream("runs/s/y.bin", io.BytesIO(b"abc"), -1)


def test_tcp_proxy_refuses_while_stopped_and_keeps_its_port(proxy: TcpProxy) -> None:
    port = proxy.port
    assert urllib.request.urlopen(proxy.endpoint + "/", timeout=5).status == 200
    proxy.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    proxy.start()
    assert proxy.port == port and urllib.request.urlopen(proxy.endpoint + "/", timeout=5).status == 200


def test_retry_seconds_setting_is_checked(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDCOMPARE_S3_RETRY_SECONDS", "soon")
    with pytest.raises(StoreError, match="FEDCOMPARE_S3_RETRY_SECONDS to be a number of seconds >= 0, got 'soon'"):
        open_store(f"s3://{s3_env}")
    monkeypatch.setenv("FEDCOMPARE_S3_RETRY_SECONDS", "2.5")
    store = open_store(f"s3://{s3_env}")
    assert isinstance(store, S3Store) and store.retry_seconds == 2.5
    glance = open_store(f"s3://{s3_env}", retry_seconds=0)  # what a progress display opens
    assert isinstance(glance, S3Store) and glance.retry_seconds == 0.0


def test_s3_outage_shorter_than_the_bound_is_retried(
    proxy: TcpProxy, proxied_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: an open store whose endpoint goes away for 2 s
    monkeypatch.setenv("FEDCOMPARE_S3_RETRY_SECONDS", "20")
    store = open_store(f"s3://{proxied_env}")
    store.put_bytes("runs/o/before.bin", b"1")
    proxy.stop()
    restart = threading.Timer(2.0, proxy.start)
    restart.start()
    started = time.monotonic()
    # Act
    store.put_stream("runs/o/during.bin", io.BytesIO(b"x" * 1000), 1000)  # the body must be rewound
    elapsed = time.monotonic() - started
    restart.join()
    # Assert
    assert 1.5 < elapsed < 15, f"the write should wait out the 2 s outage, took {elapsed:.1f} s"
    assert store.get_bytes("runs/o/during.bin") == b"x" * 1000


def test_s3_outage_longer_than_the_bound_names_the_endpoint(
    proxy: TcpProxy, proxied_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDCOMPARE_S3_RETRY_SECONDS", "2")
    store = open_store(f"s3://{proxied_env}")
    glance = open_store(f"s3://{proxied_env}", retry_seconds=0)  # what a progress display opens
    proxy.stop()
    started = time.monotonic()
    with pytest.raises(StoreError) as info:
        store.get_bytes("runs/o/any.bin")
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert 2 <= elapsed < 8, f"expected to give up after the 2 s bound, took {elapsed:.1f} s"
    assert proxy.endpoint in message and "after retrying for 2 s" in message
    assert "FEDCOMPARE_S3_RETRY_SECONDS" in message and "\n" not in message and SECRET not in message

    started = time.monotonic()
    with pytest.raises(StoreError):
        glance.get_bytes("runs/o/any.bin")
    assert time.monotonic() - started < 1.5, "a store opened with retry_seconds=0 fails at once"


def test_s3_5xx_answers_are_retried_then_reported(
    proxy: TcpProxy, proxied_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: the store opens against the real server, then every request gets 503
    monkeypatch.setenv("FEDCOMPARE_S3_RETRY_SECONDS", "1.5")
    store = open_store(f"s3://{proxied_env}")
    real = proxy.target
    with answering_503() as failing:
        proxy.stop()
        proxy.target = failing
        proxy.start()
        started = time.monotonic()
        with pytest.raises(StoreError) as info:
            store.put_bytes("runs/o/k.bin", b"v")
        elapsed = time.monotonic() - started
        # Act: the server recovers 1 s into the next call
        store.retry_seconds = 20.0

        def recover() -> None:
            proxy.stop()
            proxy.target = real
            proxy.start()

        timer = threading.Timer(1.0, recover)
        timer.start()
        store.put_bytes("runs/o/k.bin", b"v2")
        timer.join()
    # Assert
    assert 1.5 <= elapsed < 8, f"expected to retry the 503s for the 1.5 s bound, took {elapsed:.1f} s"
    assert "ServiceUnavailable" in str(info.value) and "after retrying for" in str(info.value)
    assert store.get_bytes("runs/o/k.bin") == b"v2"


# --- checkpoints -----------------------------------------------------------------------

CONFIG = {"model": "cnn", "rounds": 2, "lr": 0.01, "dp": {"noise_multiplier": 1.1}}


def _arrays(seed: int) -> dict[str, np.ndarray]:
    """Return model-like arrays in a deliberately non-alphabetical order with mixed dtypes."""
    rng = np.random.default_rng(seed)
    return {
        "conv1.weight": rng.standard_normal((4, 3, 3)).astype(np.float32),
        "conv1.bias": rng.standard_normal(4),
        "bn.num_batches_tracked": np.array(seed, dtype=np.int64),
        "file": np.arange(5, dtype=np.uint8),  # a name that np.savez(file, **kw) would choke on
        "a.mask": np.array([True, False]),
    }


def _assert_same_arrays(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Assert equal names, order, dtypes, shapes and values."""
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        np.testing.assert_array_equal(got[name], want[name])


def test_npz_bytes_round_trip_and_are_deterministic() -> None:
    arrays = _arrays(0)
    data = arrays_to_npz_bytes(arrays)
    _assert_same_arrays(npz_bytes_to_arrays(data), arrays)
    assert arrays_to_npz_bytes(_arrays(0)) == data
    with pytest.raises(ValueError):
        arrays_to_npz_bytes({"obj": np.array([object()], dtype=object)})


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
    write_round(store, run, arm, 1, _arrays(1), {"accuracy": 0.5, "loss": 1.2}, CONFIG)
    manifest = write_round(store, run, arm, 2, _arrays(2), {"accuracy": 0.7, "loss": 0.9}, CONFIG)
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
    _assert_same_arrays(arrays, _arrays(1))
    assert metrics == {"accuracy": 0.5, "loss": 1.2}
    latest, arrays, metrics = load_latest(store, run, arm)
    assert latest == 2 and metrics["accuracy"] == 0.7
    _assert_same_arrays(arrays, _arrays(2))
    assert round_metrics(store, run, arm) == [
        {"accuracy": 0.5, "loss": 1.2, "round": 1}, {"accuracy": 0.7, "loss": 0.9, "round": 2}]


def test_corrupt_model_is_detected(store: Store) -> None:
    # Arrange
    write_round(store, "r", "small", 1, _arrays(1), {"accuracy": 0.5}, CONFIG)
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
    write_round(store, "r", "small", 1, _arrays(1), {"accuracy": 0.5}, CONFIG)
    manifest = read_manifest(store, "r", "small")
    for entry in manifest["rounds"]["1"]["objects"].values():
        del entry["xxh3_128"]
    store.put_json(manifest_key("r", "small"), manifest)
    arrays, _ = load_round(store, "r", "small", 1)  # the sha256-only entries still verify
    _assert_same_arrays(arrays, _arrays(1))
    key = f"{round_prefix('r', 'small', 1)}/model.npz"
    data = bytearray(store.get_bytes(key))
    data[len(data) // 2] ^= 0xFF
    store.put_bytes(key, bytes(data))
    # Act / Assert
    with pytest.raises(CheckpointError, match="expected sha256"):
        load_round(store, "r", "small", 1)


def test_missing_object_and_incomplete_round_are_explained(store: Store) -> None:
    write_round(store, "r", "small", 1, _arrays(1), {"accuracy": 0.5}, CONFIG)
    with pytest.raises(CheckpointError, match="latest complete round: 1"):
        load_round(store, "r", "small", 2)
    store.delete(f"{round_prefix('r', 'small', 1)}/metrics.json")
    with pytest.raises(CheckpointError, match="missing"):
        round_metrics(store, "r", "small")
    with pytest.raises(CheckpointError, match="no complete round"):
        load_latest(store, "r", "large")


def test_write_round_guards_order_and_config(store: Store) -> None:
    first = write_round(store, "r", "large", 1, _arrays(1), {"accuracy": 0.5}, CONFIG)
    again = write_round(store, "r", "large", 1, _arrays(1), {"accuracy": 0.5}, CONFIG)
    assert again == first  # an identical retry of the latest round is a no-op
    with pytest.raises(CheckpointError, match="expected round 2"):
        write_round(store, "r", "large", 3, _arrays(3), {}, CONFIG)
    with pytest.raises(CheckpointError, match="expected round 2"):
        write_round(store, "r", "large", 1, _arrays(9), {"accuracy": 0.1}, CONFIG)
    with pytest.raises(CheckpointError, match="config_hash"):
        write_round(store, "r", "large", 2, _arrays(2), {}, {**CONFIG, "lr": 0.1})
