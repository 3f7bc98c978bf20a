"""Tests of the object store on a local directory and a real S3 server: objects, keys, streams, opening and S3 settings.

Outages of the S3 endpoint are tests/test_store_outages.py's; round checkpoints are tests/test_checkpoint*.py's.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest

from infra.store import LocalStore, ObjectNotFound, S3Store, Store, StoreError, open_store
from tests.s3server import ACCESS, SECRET, free_port


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
