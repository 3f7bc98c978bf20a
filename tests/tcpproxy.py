"""A threaded TCP forwarder on 127.0.0.1 that tests stop and restart to inject a server outage.

This is a fault injector, not a stand-in for a server: the real server sits behind it.
Usage::

    with TcpProxy("127.0.0.1", 9000) as proxy:   # listens on proxy.port
        ...                                       # clients use proxy.endpoint
        proxy.stop()                              # connections drop, new ones are refused
        proxy.start()                             # the same port forwards again
        proxy.stop_after(8 << 20, restart_after=1.0)  # a 1 s outage in the middle of a transfer
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from types import TracebackType

__all__ = ["TcpProxy"]

HOST = "127.0.0.1"
_BUFFER = 1 << 16
_POLL_S = 0.05  # how often the accept loop checks whether it was stopped


class TcpProxy:
    """Forward every TCP connection made to ``127.0.0.1:port`` to ``target_host:target_port``.

    ``target`` may be reassigned, e.g. between stop() and start(): new connections use it.
    """

    def __init__(self, target_host: str, target_port: int, *, port: int = 0) -> None:
        """Prepare a proxy to ``target_host:target_port``; ``port`` 0 picks a free one at the first start."""
        self.target = (target_host, target_port)
        self._port = port
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._budget: int | None = None  # bytes left before a stop_after() outage
        self._restart_after: float | None = None
        self._epoch = 0  # counts stop() calls, so that a planned restart yields to a later stop()

    @property
    def port(self) -> int:
        """Return the port the proxy listens on (fixed after the first start)."""
        if not self._port:
            raise RuntimeError("the proxy has no port before its first start(): call start() first")
        return self._port

    @property
    def endpoint(self) -> str:
        """Return ``http://127.0.0.1:<port>``, the URL clients should use."""
        return f"http://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        """Return whether the proxy is accepting connections."""
        return self._listener is not None

    def start(self) -> TcpProxy:
        """Listen again on the same port (a free one the first time) and forward new connections.

        Raises:
            OSError: the port is taken by someone else meanwhile.
        """
        if self._listener is not None:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # rebind despite TIME_WAIT
        try:
            listener.bind((HOST, self._port))
            listener.listen(64)
        except OSError:
            listener.close()
            raise
        self._port = listener.getsockname()[1]
        self._stopping.clear()
        self._listener = listener
        self._spawn(self._accept_loop, listener)
        return self

    def stop_after(self, nbytes: int, *, restart_after: float | None = None) -> None:
        """Stop once ``nbytes`` more bytes were forwarded (either way); start again ``restart_after`` s later.

        ``restart_after`` None leaves the proxy stopped. A stop() meanwhile cancels the restart.
        """
        if nbytes < 1:
            raise ValueError(f"expected nbytes >= 1, got {nbytes!r}")
        with self._lock:
            self._budget, self._restart_after = nbytes, restart_after

    def stop(self) -> None:
        """Close the listener and every open connection (with a reset), so clients see refused connections."""
        self._epoch += 1
        listener, self._listener = self._listener, None
        if listener is None:
            return
        self._stopping.set()
        listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
            threads, self._threads = self._threads, []
        for sock in sockets:
            _reset(sock)
        for thread in threads:
            thread.join(timeout=5)

    def __enter__(self) -> TcpProxy:
        """Start the proxy."""
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Stop the proxy (and cancel a pending stop_after() restart)."""
        self.stop()

    def _spawn(self, target, *args) -> None:
        """Run ``target(*args)`` in a daemon thread that stop() joins (finished threads are forgotten)."""
        thread = threading.Thread(target=target, args=args, daemon=True, name=f"tcpproxy-{self._port}")
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _track(self, *socks: socket.socket) -> bool:
        """Remember ``socks`` for stop(); return False when the proxy is already stopping."""
        with self._lock:
            if self._stopping.is_set():
                return False
            self._sockets.update(socks)
            return True

    def _accept_loop(self, listener: socket.socket) -> None:
        """Accept clients until stopped; connect each to the target and pump both ways."""
        while not self._stopping.is_set():
            try:
                ready, _, _ = select.select([listener], [], [], _POLL_S)
                if not ready:
                    continue
                client, _ = listener.accept()
            except (OSError, ValueError):  # the listener was closed by stop()
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)  # the target is down: the client sees its connection dropped
                continue
            if not self._track(client, upstream):
                _reset(client)
                _reset(upstream)
                return
            ends = [2]  # pumps still running; the last one closes both sockets
            self._spawn(self._pump, client, upstream, ends)
            self._spawn(self._pump, upstream, client, ends)

    def _pump(self, src: socket.socket, dst: socket.socket, ends: list[int]) -> None:
        """Copy bytes from ``src`` to ``dst`` until ``src`` ends (half-close ``dst``) or fails (reset both)."""
        try:
            while data := src.recv(_BUFFER):
                if self._spend(len(data)):  # drop the data that crossed the budget; stop() resets both
                    threading.Thread(target=self._outage, daemon=True, name="tcpproxy-outage").start()
                    break
                dst.sendall(data)
            else:
                dst.shutdown(socket.SHUT_WR)  # src ended cleanly: pass the end on
        except OSError:
            _reset(src)
            _reset(dst)
        with self._lock:
            ends[0] -= 1
            if ends[0]:
                return
            self._sockets.difference_update((src, dst))
        src.close()
        dst.close()


    def _spend(self, nbytes: int) -> bool:
        """Count ``nbytes`` against the stop_after() budget; return True once when it runs out."""
        with self._lock:
            if self._budget is None:
                return False
            self._budget -= nbytes
            if self._budget > 0:
                return False
            self._budget = None
            return True

    def _outage(self) -> None:
        """Stop now and, if stop_after() asked for it, start again later unless stopped again meanwhile."""
        restart_after = self._restart_after
        self.stop()
        epoch = self._epoch
        if restart_after is None:
            return
        time.sleep(restart_after)
        if self._epoch == epoch:
            self.start()


def _reset(sock: socket.socket) -> None:
    """Drop ``sock`` abortively (SO_LINGER 0), waking any thread blocked on it; ignore errors."""
    for step in (
        lambda: sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)),
        lambda: sock.shutdown(socket.SHUT_RDWR),  # close() alone does not wake a blocked recv()
        sock.close,
    ):
        try:
            step()
        except OSError:
            pass
