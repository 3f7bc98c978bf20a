"""Tests of the S3 store riding out outages: a TCP proxy takes the endpoint away, an HTTP server answers 503.

Outages shorter than FEDCOMPARE_S3_RETRY_SECONDS are retried; longer ones fail in one line that names the endpoint.
"""

from __future__ import annotations

import io
import socket
import threading
import time
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

from infra.store import S3Store, StoreError, open_store
from tests.s3server import SECRET
from tests.tcpproxy import TcpProxy


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
