"""The node's warm worker: a long-lived process that keeps torch, scikit-learn and the node's data loaded.

Flower 1.41 starts a fresh ClientApp process for every message, which pays Python, flwr,
torch, torch._dynamo and scikit-learn imports and the node's data loading each time (several
CPU-seconds for a fraction of a second of training). With a warm worker the ClientApp is a
relay: it hands the message to this node's supervisor and returns its answer.

Processes, all on the node's host:

* the **supervisor** (``python -m clients._warm --socket PATH``, started beside the SuperNode by
  the local stack and by ``fedcompare node start``) listens on a Unix socket. Only holders of the
  authkey in ``PATH.key`` (mode 0600, in the node's state directory) can talk to it
  (``multiprocessing.connection``'s HMAC challenge), and the socket itself is 0600.
* a **forkserver** that imported the heavy libraries once (:data:`PRELOAD`);
* one **worker** per version of the app's code (a hash of the FAB's installed files), forked
  from the forkserver. It imports fedcompare's node code from that FAB's folder, so a run always
  executes the code it was submitted with; a new FAB gets a new worker, and only the
  :data:`MAX_WORKERS` most recent are kept. Its only state between messages is
  ``clients.node_tasks``' cache of the node's data splits, keyed by what they are made of.

A worker that dies mid-message is started again and the message is tried once more; the reply
says so (``worker-restarts``). One that does not answer within the run's round timeout (the
server stopped waiting by then) is killed and started again, and the message fails with that
reason. A DP round is charged to the node's privacy ledger once per message id, so a retried
message is not charged twice. Standard library only: the relay must stay cheap to import.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import secrets
import signal
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

log = logging.getLogger("fedcompare.worker")

# imported once by the forkserver, so that every worker starts with them loaded
PRELOAD = ["numpy", "torch", "torch.nn", "torch.optim", "torch._dynamo", "torch.utils.data",
           "sklearn.linear_model", "sklearn.metrics", "sklearn.model_selection", "opacus", "codecarbon",
           "cpuinfo", "psutil"]
MAX_WORKERS = 2  # app versions kept warm at once (a newly submitted FAB and the one before it)
_APP_PACKAGES = ("clients", "privacy", "server", "infra", "flows")  # what a worker imports from the app folder
_MAX_SOCKET_PATH = 107  # AF_UNIX paths are limited to 107 bytes on Linux


class WorkerUnavailable(RuntimeError):
    """The node's warm worker cannot be reached; the ClientApp answers in its own process instead."""


class WorkerFailed(RuntimeError):
    """The warm worker ran the message and it failed; the message names the original error."""


def key_path(socket_path: str | Path) -> Path:
    """Return the authkey file of the worker listening on ``socket_path``."""
    return Path(f"{socket_path}.key")


def pid_path(socket_path: str | Path) -> Path:
    """Return the file holding the PID of the worker process that currently serves ``socket_path``."""
    return Path(f"{socket_path}.worker-pid")


def code_key(app_dir: str | Path) -> str:
    """Return a hash of the app's node code in ``app_dir``: names, sizes and modification times of its .py files."""
    root = Path(app_dir)
    digest = hashlib.sha256(str(root.resolve()).encode())
    for package in _APP_PACKAGES:
        for path in sorted((root / package).glob("**/*.py")):
            stat = path.stat()
            digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def ask(socket_path: str | Path, request: dict[str, Any], *, app_dir: str | Path, timeout: float) -> tuple[Any, int]:
    """Have the node's warm worker answer ``request``; return (its result, how often the worker was restarted).

    Raises:
        WorkerUnavailable: no supervisor answers on the socket, the key is missing or wrong, or the
            connection broke before an answer came.
        WorkerFailed: the task itself failed (or the worker timed out); the message says why.
    """
    try:
        key = key_path(socket_path).read_bytes()
        conn = multiprocessing.connection.Client(str(socket_path), family="AF_UNIX", authkey=key)
    except (OSError, multiprocessing.AuthenticationError, EOFError) as exc:
        raise WorkerUnavailable(f"no warm worker answers on {socket_path} ({exc})") from None
    with conn:
        try:
            conn.send({"app_dir": str(app_dir), "code_key": code_key(app_dir), "timeout": timeout,
                       "task": request})
            answer = conn.recv()
        except (OSError, EOFError) as exc:
            raise WorkerUnavailable(f"the warm worker on {socket_path} broke off ({exc!r})") from None
    status, payload, restarts = answer
    if status == "error":
        raise WorkerFailed(payload)
    return payload, restarts


# ---- the worker process -------------------------------------------------------------------------

def _use_app_code(app_dir: str) -> None:
    """Make this process import fedcompare's packages from ``app_dir`` (the FAB), not from where it started."""
    for name in list(sys.modules):
        if name.split(".")[0] in _APP_PACKAGES:
            del sys.modules[name]
    sys.path.insert(0, app_dir)


def _worker_main(conn: multiprocessing.connection.Connection, app_dir: str) -> None:
    """Serve tasks from the supervisor until it closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when a worker stops
    _use_app_code(app_dir)
    from clients import node_tasks

    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        try:
            result = node_tasks.handle(node_tasks.Task(**request))
            conn.send(("ok", {"values": result.values, "arrays": result.arrays}))
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the ClientApp, named
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


def _ready() -> None:
    """Do nothing: starting this process makes the forkserver import PRELOAD first."""


# ---- the supervisor -----------------------------------------------------------------------------

class _Died(Exception):
    """The worker process ended before it answered."""


class _Hung(Exception):
    """The worker did not answer in time."""


class _Orphaned(Exception):
    """The ClientApp that asked went away (its SuperNode was stopped or killed) before the answer."""


class _Worker:
    """One worker process for one version of the app's code, and the pipe to it."""

    def __init__(self, context: multiprocessing.context.BaseContext, app_dir: str, pid_file: Path) -> None:
        self._context, self.app_dir, self._pid_file = context, app_dir, pid_file
        self.lock = threading.Lock()  # one message at a time per worker
        self._start()

    def _start(self) -> None:
        parent, child = self._context.Pipe()
        self.process = self._context.Process(target=_worker_main, args=(child, self.app_dir), daemon=True,
                                             name="fedcompare-worker")
        self.process.start()
        child.close()
        self.conn = parent
        self._pid_file.write_text(str(self.process.pid))

    def call(self, task: dict[str, Any], timeout: float,
             asker: multiprocessing.connection.Connection | None = None) -> tuple:
        """Send one task and wait for its answer; give up if ``asker`` (the ClientApp's connection) goes away."""
        try:
            self.conn.send(task)
            ready = multiprocessing.connection.wait([self.conn, *([asker] if asker else [])], timeout)
            if not ready:
                raise _Hung
            if self.conn not in ready:  # the ClientApp sends nothing more: readable means it is gone
                raise _Orphaned
            return self.conn.recv()
        except (EOFError, OSError):
            raise _Died from None

    def restart(self) -> None:
        """Kill the worker process (if alive) and start a fresh one."""
        self.stop()
        self._start()

    def stop(self) -> None:
        """Kill the worker process and close the pipe."""
        self.conn.close()
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)


class Supervisor:
    """Listen on a Unix socket and hand each task to the worker of its app version."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(PRELOAD)
        self._workers: OrderedDict[str, _Worker] = OrderedDict()
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        """Start the forkserver and wait until it has imported PRELOAD."""
        process = self._context.Process(target=_ready)
        process.start()
        process.join()

    def serve_forever(self) -> None:
        """Accept connections until killed; each is served in its own thread."""
        self.socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = _authkey(key_path(self.socket_path))
        self.socket_path.unlink(missing_ok=True)  # a stale socket of a previous supervisor
        previous = os.umask(0o177)  # the socket file is created 0600
        try:
            listener = multiprocessing.connection.Listener(str(self.socket_path), family="AF_UNIX", authkey=key)
        finally:
            os.umask(previous)
        log.info("warm worker listening on %s", self.socket_path)
        with listener:
            while True:
                try:
                    conn = listener.accept()
                except (multiprocessing.AuthenticationError, OSError, EOFError) as exc:
                    log.warning("refused a connection: %s", exc)
                    continue
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: multiprocessing.connection.Connection) -> None:
        """Answer one request on ``conn``."""
        with conn:
            try:
                request = conn.recv()
                conn.send(self.run(request["code_key"], request["app_dir"], request["task"],
                                   timeout=float(request["timeout"]), asker=conn))
            except (EOFError, OSError) as exc:
                log.warning("a ClientApp went away before its answer: %r", exc)

    def run(self, key: str, app_dir: str, task: dict[str, Any], *, timeout: float,
            asker: multiprocessing.connection.Connection | None = None) -> tuple:
        """Run ``task`` in the worker of ``key``; return (status, payload, restarts).

        When ``asker`` goes away mid-task nobody can take the answer: the worker is restarted at
        once, so that the node's next messages (a restarted SuperNode's) do not wait behind it.
        """
        worker = self._worker(key, app_dir)
        restarts = 0
        with worker.lock:
            while True:
                try:
                    answer = worker.call(task, timeout, asker)
                    return (*answer, restarts)
                except _Orphaned:
                    worker.restart()
                    log.warning("the ClientApp went away mid-message; restarted the worker instead of finishing")
                    return ("error", "Orphaned: the ClientApp went away", restarts + 1)
                except _Hung:
                    worker.restart()
                    return ("error", f"WorkerTimeout: the node's warm worker did not answer within {timeout:.0f} s "
                                     "(the round timeout) and was restarted", restarts + 1)
                except _Died:
                    code = worker.process.exitcode
                    worker.restart()
                    restarts += 1
                    log.warning("worker died mid-message (exit code %s); restarted it (%d)", code, restarts)
                    if restarts > 1:
                        return ("error", f"WorkerDied: the node's warm worker died twice on this message "
                                         f"(last exit code {code})", restarts)

    def _worker(self, key: str, app_dir: str) -> _Worker:
        """Return the worker for app version ``key``, starting it (and retiring the oldest) if needed."""
        with self._lock:
            if key in self._workers:
                self._workers.move_to_end(key)
                return self._workers[key]
            worker = _Worker(self._context, app_dir, pid_path(self.socket_path))
            self._workers[key] = worker
            while len(self._workers) > MAX_WORKERS:
                _, old = self._workers.popitem(last=False)
                with old.lock:
                    old.stop()
            return worker


def _authkey(path: Path) -> bytes:
    """Return the authkey in ``path``, creating it (32 random bytes, mode 0600) if missing."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_bytes(32))
    path.chmod(0o600)
    return path.read_bytes()


def main(argv: list[str] | None = None) -> int:
    """Run a node's warm-worker supervisor until it is stopped."""
    parser = argparse.ArgumentParser(prog="python -m clients._warm", description=main.__doc__)
    parser.add_argument("--socket", required=True, type=Path, help="Unix socket to listen on (its key: SOCKET.key)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    socket_path = args.socket.expanduser().resolve()
    if len(str(socket_path)) > _MAX_SOCKET_PATH:
        parser.error(f"--socket {socket_path} is longer than a Unix socket path may be: choose a shorter path")
    supervisor = Supervisor(socket_path)
    supervisor.warm_up()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        supervisor.serve_forever()
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
