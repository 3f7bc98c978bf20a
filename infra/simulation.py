"""A simulation SuperLink for one comparison: Flower's Simulation Engine behind the same Control API.

`flower-superlink --simulation` accepts runs as a deployment SuperLink does (`flwr run`, `flwr
ls`, `flwr stop`), but runs each with a `flwr-simulation` process that starts Ray (or joins
the cluster named by ``RAY_ADDRESS``) and serves the ServerApp's messages with Ray actors
that import the ClientApp once: thousands of virtual nodes, no SuperNode. The flow starts
one for its simulated arms and stops it, with every process under it, when they are done.

No Prefect import: the flow calls :func:`simulation_superlink`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from infra._stack_processes import http_ok, tail
from infra._stack_services import FLWR_LAUNCHERS

_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 15.0


class SimulationError(RuntimeError):
    """The simulation SuperLink did not start; the message says why and what to do."""


def _free_port(host: str) -> int:
    """Return a TCP port on ``host`` that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _stop_tree(process: subprocess.Popen) -> None:
    """Stop ``process`` and every process under it (its SuperExec, a `flwr-simulation`, Ray's workers)."""
    import psutil

    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=_STOP_TIMEOUT_S)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=_STOP_TIMEOUT_S)


@contextmanager
def simulation_superlink(state: Path, *, ray_address: str = "", host: str = "127.0.0.1") -> Iterator[str]:
    """Run a simulation SuperLink on a free port of ``host`` for the block; yield its address host:port.

    ``ray_address``: the Ray cluster its runs join (`ray.init` reads ``RAY_ADDRESS``); empty:
    each run starts a local Ray instance on this host, listening on 127.0.0.1 only. Its log is
    ``state/simulation/superlink-<port>.log``.

    Raises:
        SimulationError: it exited or did not answer within a minute (the log's last lines say why).
    """
    bin_dir = Path(sys.executable).parent
    executable = bin_dir / "flower-superlink"
    if not executable.exists():
        raise SimulationError(f"`flower-superlink` is not installed in {bin_dir}: run `make setup` there")
    port = _free_port(host)
    address = f"{host}:{port}"
    folder = state / "simulation"
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / f"superlink-{port}.log"
    # the SuperExec it starts and the flwr-simulation processes are executables of this environment; fedcompare's
    # `flwr-simulation` (flwr_bin/, Flower's with a message delivery that scans once per tick) comes first
    launchers = [str(FLWR_LAUNCHERS)] if os.access(FLWR_LAUNCHERS / "flwr-simulation", os.X_OK) else []
    env = {**os.environ, "FLWR_HOME": str(folder / "flwr"),
           "PATH": os.pathsep.join([*launchers, str(bin_dir), os.environ.get("PATH", "")])}
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    else:
        # A local Ray instance takes the host's network address as its node's and its servers (GCS, raylet,
        # workers) listen on every interface; this setting of Ray's (meant for macOS and Windows) makes it
        # take the loopback address, and then they listen on 127.0.0.1 only
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    command = [str(executable), "--insecure", "--simulation", "--isolation", "subprocess",
               # fedcompare's dependencies are installed; a submitted app must not pip-install more
               "--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]
    with open(log_path, "ab") as log:
        # in the caller's process group: cancelling a Prefect flow run stops the group, this SuperLink with it
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not http_ok(f"http://{address}/health"):
            if process.poll() is not None or time.monotonic() > deadline:
                last = " | ".join(tail(log_path, 5).splitlines())
                raise SimulationError(
                    f"the simulation SuperLink on {address} {'exited' if process.poll() is not None else 'did not answer'}"
                    f" (log {log_path}: {last or 'empty'}); check that flwr[simulation] is installed (`make setup`)")
            time.sleep(0.2)
        yield address
    finally:
        _stop_tree(process)
