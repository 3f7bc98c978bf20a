"""A forkserver for Flower's `flwr-clientapp`: each message's ClientApp process starts with flwr already imported.

Flower 1.41's SuperExec starts a fresh `flwr-clientapp` process for every message a node
answers. Even through `flwr_bin/flwr-clientapp` (Flower's module without the SuperNode's
package) that process spends 0.6 s of CPU importing flwr, gRPC and protobuf before it asks
for its message; four nodes starting one each at the start of a round share two cores for
that. Beside each SuperNode of the local stack (and of `fedcompare node start`) this server
(``python -m infra._clientapp_fork --socket PATH``) imports Flower's `flwr_clientapp` module
once and forks a child per request:

* `flwr_bin/flwr-clientapp`, started by the SuperExec as before, finds the socket in
  FEDCOMPARE_CLIENTAPP_FORK (set in the SuperNode's environment), sends its arguments,
  environment and working directory and passes its stdin, stdout and stderr; the child takes
  them over and runs Flower's `flwr_clientapp()` with those arguments: the same parser, run
  loop and exit code, which the launcher waits for and exits with. Nothing of the app is
  imported before the fork: the child loads the run's FAB as Flower does.
* The server is single-threaded (forking from a threaded process can copy a held lock), and
  talks only to processes of its own user (SO_PEERCRED) on a socket of mode 0600.
* Where the socket is unset, missing or refuses, the launcher runs Flower's module in its own
  process, as without this server.

Standard library only at import: the launcher imports this module on every message.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import struct
import sys
from pathlib import Path

from infra._flower_pulls import shorten_pull_backoff

SOCKET_ENV = "FEDCOMPARE_CLIENTAPP_FORK"  # the socket a node's `flwr-clientapp` launcher asks
_HEADER = struct.Struct("!I")  # length of the JSON request that follows
_STDIO = 3  # stdin, stdout and stderr travel with the request
_REAP_S = 0.05  # how often the server looks for children that exited
_CHECKOUT = str(Path(__file__).resolve().parents[1])


class ForkRefused(RuntimeError):
    """The forkserver could not be reached or did not start the ClientApp; the launcher runs it itself."""


def flowers_clientapp_module():
    """Return Flower's flwr_clientapp module loaded from its file, or None when it is not where expected.

    Flower's package `flwr.supernode.cli` imports the whole `flower-supernode` command first
    (FastAPI, Alembic, SQLAlchemy); its module file alone needs only the runtime.
    """
    import importlib.util

    runtime = importlib.util.find_spec("flwr.supernode.runtime")
    if runtime is None or runtime.origin is None:
        return None
    path = Path(runtime.origin).parents[1] / "cli" / "flwr_clientapp.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("flwr.supernode.cli.flwr_clientapp", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module if callable(getattr(module, "flwr_clientapp", None)) else None


def release_checkout() -> None:
    """Forget this checkout's `infra` modules and path: the run's FAB provides the app and its own `infra`.

    The folders on this process's PYTHONPATH (the ClientApp's) stay on ``sys.path``, in front, as
    they would in a process started with that environment: a node's operator may have put this
    checkout there on purpose, for example for a module named in node config ``client-mods``.
    """
    for name in [n for n in sys.modules if n == "infra" or n.startswith("infra.")]:
        del sys.modules[name]
    wanted = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    rest = [p for p in sys.path if p not in ("", _CHECKOUT) and p not in wanted]
    sys.path[:] = wanted + rest


# --- the launcher's side -----------------------------------------------------------------------


def run_forked(socket_path: str, argv: list[str]) -> int:
    """Have the forkserver at ``socket_path`` run `flwr-clientapp` ``argv``; return its exit code.

    Raises:
        ForkRefused: the server is not there or did not start the child (nothing has run yet).
    """
    request = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(socket_path)
        socket.send_fds(conn, [_HEADER.pack(len(request))], list(range(_STDIO)))
        conn.sendall(request)
        answers = conn.makefile("rb")
        started = answers.readline().decode().strip()
    except OSError as exc:
        raise ForkRefused(f"no clientapp forkserver at {socket_path} ({exc})") from None
    if not started.startswith("started "):
        raise ForkRefused(f"the clientapp forkserver at {socket_path} refused: {started or 'no answer'}")
    try:
        finished = answers.readline().decode().strip()
    except OSError:
        finished = ""
    # the server went away before the child ended: Flower's SuperExec reads no exit code anyway
    return int(finished.split()[1]) if finished.startswith("exit ") else 1


# --- the server ----------------------------------------------------------------------------


def _child(conn: socket.socket, listener: socket.socket, fds: list[int], request: dict, flower,
           others: list[socket.socket]) -> None:
    """Become the requested `flwr-clientapp` process; never returns."""
    code = 1
    try:
        for open_socket in (listener, conn, *others):  # the other launchers' connections stay the server's
            open_socket.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        release_checkout()  # after the launcher's environment: sys.path as its PYTHONPATH makes it
        os.chdir(request["cwd"])
        sys.argv = list(request["argv"])
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        code = flower.flwr_clientapp() or 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:  # noqa: BLE001 - a child must exit with a code, whatever happened
        print(f"flwr-clientapp (forked): {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    """Read one request and its file descriptors from ``conn``."""
    header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, _STDIO)
    if len(header) != _HEADER.size or len(fds) != _STDIO:
        for fd in fds:
            os.close(fd)
        raise ValueError("a request without its length or its stdin, stdout and stderr")
    (size,) = _HEADER.unpack(header)
    body = b""
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ValueError("the request ended early")
        body += chunk
    return json.loads(body), fds


def _same_user(conn: socket.socket) -> bool:
    """Return whether the peer of ``conn`` runs as this process's user."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid == os.getuid()


def serve(socket_path: Path, flower) -> None:
    """Fork a `flwr-clientapp` child per request on ``socket_path`` until SIGTERM."""
    socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(socket_path))
    finally:
        os.umask(old_umask)
    listener.listen(64)
    print(f"clientapp forkserver listening on {socket_path}", flush=True)
    waiting: dict[int, socket.socket] = {}  # child pid -> the launcher waiting for its exit code
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop:
            if selector.select(timeout=_REAP_S):
                conn, _ = listener.accept()
                _start(conn, listener, flower, waiting)
            _reap(waiting)
    finally:
        socket_path.unlink(missing_ok=True)


def _start(conn: socket.socket, listener: socket.socket, flower, waiting: dict[int, socket.socket]) -> None:
    """Answer one launcher: fork its child, or say why not and close."""
    try:
        conn.settimeout(5)
        if not _same_user(conn):
            raise ValueError("the caller runs as another user")
        request, fds = _receive(conn)
    except (OSError, ValueError) as exc:
        _send(conn, f"refused {exc}")
        conn.close()
        return
    pid = os.fork()
    if pid == 0:
        _child(conn, listener, fds, request, flower, list(waiting.values()))
    for fd in fds:
        os.close(fd)
    _send(conn, f"started {pid}")
    waiting[pid] = conn


def _reap(waiting: dict[int, socket.socket]) -> None:
    """Tell each launcher whose child exited its exit code."""
    while waiting:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = waiting.pop(pid, None)
        if conn is not None:
            _send(conn, f"exit {os.waitstatus_to_exitcode(status)}")
            conn.close()


def _send(conn: socket.socket, line: str) -> None:
    """Send one line to a launcher that may have gone away."""
    try:
        conn.sendall(f"{line}\n".encode())
    except OSError:
        pass


def main(argv: list[str] | None = None) -> None:
    """Run the forkserver on ``--socket``."""
    parser = argparse.ArgumentParser(description="fork Flower's flwr-clientapp with flwr imported once")
    parser.add_argument("--socket", required=True, type=Path, help="the Unix socket to listen on (made mode 0600)")
    args = parser.parse_args(argv)
    flower = flowers_clientapp_module()
    if flower is None:
        sys.exit("clientapp forkserver: Flower's flwr_clientapp.py is not where Flower 1.41 keeps it; the nodes' "
                 "flwr-clientapp runs Flower's own command instead")
    shorten_pull_backoff()  # the children inherit it
    serve(args.socket, flower)


if __name__ == "__main__":
    main()
