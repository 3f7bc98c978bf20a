"""Start a real S3-compatible server (moto_server) on a free local port for tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

HOST = "127.0.0.1"
ACCESS = "test-access"  # the credentials the tests hand the server (moto accepts any)
SECRET = "test-secret-do-not-print"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def moto_server_path() -> str | None:
    """Return the moto_server executable beside this interpreter, else on PATH, else None."""
    beside = Path(sys.executable).parent / "moto_server"
    return str(beside) if beside.is_file() else shutil.which("moto_server")


def _answers_http(url: str) -> bool:
    """Return whether ``url`` gives any HTTP response (an error status counts as an answer)."""
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server's process group, killing it if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    except ProcessLookupError:
        pass


@contextmanager
def running_s3_server(timeout_s: float = 30.0) -> Iterator[str]:
    """Run moto_server on a free port, yield its endpoint ``http://127.0.0.1:PORT``, always stop it.

    Raises:
        FileNotFoundError: moto_server is not installed.
        RuntimeError: the server exited or did not answer HTTP within ``timeout_s`` (log included).
    """
    exe = moto_server_path()
    if exe is None:
        raise FileNotFoundError(
            f"moto_server not found beside {sys.executable} or on PATH: install 'moto[server]'"
        )
    port = free_port()
    endpoint = f"http://{HOST}:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [exe, "-H", HOST, "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + timeout_s
            while not _answers_http(endpoint + "/"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    state = f"exited with {proc.returncode}" if proc.poll() is not None else (
                        f"did not answer within {timeout_s:.0f} s")
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-4000:]
                    raise RuntimeError(f"moto_server at {endpoint} {state}; its log:\n{tail}")
                time.sleep(0.1)
            yield endpoint
        finally:
            _stop(proc)
