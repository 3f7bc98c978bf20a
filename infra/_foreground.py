"""Run a Flower process in the foreground: echo its output, forward stop signals, stop its whole group."""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from infra.federation import FederationError

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run_foreground(name: str, command: list[str], env: dict[str, str], *, ready: Callable[[], bool] | None = None,
                   on_ready: Callable[[], None] | None = None, on_line: Callable[[str], None] | None = None,
                   explain: Callable[[str], str] | None = None, ready_timeout: float = 120.0) -> int:
    """Run `command` in its own process group, echo its output, forward stop signals; 0 once stopped by one."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env=env, start_new_session=True)
    stopping = threading.Event()
    tail: collections.deque[str] = collections.deque(maxlen=200)

    def forward(signum: int, _frame: object) -> None:
        _signal_group(process.pid, signal.SIGKILL if stopping.is_set() else signum)  # twice: kill it
        stopping.set()

    def pump() -> None:
        for raw in iter(process.stdout.readline, b""):
            line = raw.decode(errors="replace")
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(_ANSI.sub("", line))
            if on_line:
                on_line(tail[-1])

    previous = {sig: signal.signal(sig, forward) for sig in _STOP_SIGNALS}
    reader = threading.Thread(target=pump, name=f"{name}-output", daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + ready_timeout
        while ready is not None and not ready() and process.poll() is None and not stopping.is_set():
            if time.monotonic() > deadline:
                raise FederationError(f"{name} did not listen within {ready_timeout:.0f} s: see its messages above")
            time.sleep(0.2)
        if on_ready and process.poll() is None and not stopping.is_set():
            on_ready()
        code = process.wait()
    except FederationError:
        if not stopping.is_set():  # a Ctrl-C during on_ready also stops its `flwr` calls: not an error
            raise
        code = 0
    finally:
        _stop_group(process)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        reader.join(timeout=5)
    if stopping.is_set():
        print(f"{name} stopped", flush=True)
        return 0
    raise FederationError((explain("".join(tail)) if explain else "")
                          or f"{name} exited with code {code}: see Flower's messages above")


def _stop_group(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Stop `process` (SIGTERM, then SIGKILL) and kill what is left of its group (flower-superexec)."""
    if process.poll() is None:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(process.pid, signal.SIGKILL)
    process.wait()


def _signal_group(pid: int, sig: int) -> None:
    """Send `sig` to the process group led by `pid`, ignoring a group that is gone."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
