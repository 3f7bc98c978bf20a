"""The local stack: Prefect server, work pool, worker and deployment, a Flower SuperLink and SuperNodes.

Every part runs in the background in its own process group, with a PID file and a log
under one state directory, so `up` is idempotent and `down` stops whole groups
(a SuperNode's `flower-superexec` child included). The settings and the services' command
lines live in ``infra._stack_services``, the process handling in ``infra._stack_processes``;
this module brings the stack up and down and is their public home.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from infra._stack_processes import (
    http_ok, log_since_start, log_start_file, pid_file, port_in_use, running_pid, signal_group, start, wait,
)
from infra._stack_services import (
    CLIENTAPP_FORK_ENV, DEPLOYMENT, FLWR_LAUNCHERS, ROOT, SUPERNODE_POLL_ENV, SUPERNODE_POLL_S, WORK_POOL, Node,
    Service, StackError, StackSettings, clientapp_fork_socket, executable, flower_path, services,
    supernode_executable, warm_worker_socket, worker_socket,
)

__all__ = [
    "CLIENTAPP_FORK_ENV", "DEPLOYMENT", "FLWR_LAUNCHERS", "ROOT", "SUPERNODE_POLL_ENV", "SUPERNODE_POLL_S", "WORK_POOL",
    "Node", "Service", "StackError", "StackSettings", "clientapp_fork_socket", "down", "flower_path", "port_in_use",
    "running_pid", "services", "status", "supernode_executable", "up", "warm_worker_socket", "worker_socket",
]


def _prefect(settings: StackSettings, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a Prefect CLI command against the stack's server."""
    done = subprocess.run(
        [executable("prefect"), *args], capture_output=True, text=True, env=settings.env(), cwd=ROOT, timeout=180
    )
    if check and done.returncode != 0:
        raise StackError(f"`prefect {' '.join(args)}` failed: {(done.stderr or done.stdout).strip()[-400:]}")
    return done


def up(settings: StackSettings, *, echo=print) -> None:
    """Start every part of the stack that is not running yet and deploy the flows."""
    settings.save()
    by_name = {service.name: service for service in services(settings)}

    server = by_name["prefect-server"]
    start(settings, server)
    wait(settings, server, lambda: http_ok(f"{settings.prefect_api}/health"), timeout=120)
    echo(f"prefect server   {settings.prefect_ui}")

    _prefect(settings, "work-pool", "create", WORK_POOL, "--type", "process", "--overwrite")
    # the pool's own limit makes the setting visible in the UI (Work Pools) for every deployment on it
    _prefect(settings, "work-pool", "set-concurrency-limit", WORK_POOL, str(settings.concurrency))
    _prefect(settings, "--no-prompt", "deploy", "--all")
    echo(f"deployment       {DEPLOYMENT} (work pool {WORK_POOL}, {settings.concurrency} comparison(s) at once)")
    start(settings, by_name["prefect-worker"])

    link = by_name["superlink"]
    start(settings, link)
    wait(settings, link, lambda: port_in_use(settings.host, settings.superlink_port), timeout=60)
    echo(f"flower superlink {settings.superlink}")

    for node in settings.nodes:
        if settings.warm_workers:
            start(settings, by_name[f"worker-{node.partition_id}"])
            start(settings, by_name[f"clientapp-fork-{node.partition_id}"])
        start(settings, by_name[f"supernode-{node.partition_id}"])
    for node in settings.nodes:
        service = by_name[f"supernode-{node.partition_id}"]
        wait(settings, service, lambda n=node: port_in_use(settings.host, n.port), timeout=60)
        echo(f"flower supernode {service.address}")
    for node in settings.nodes:
        if settings.warm_workers:  # ready once its forkserver has imported torch and scikit-learn
            worker = by_name[f"worker-{node.partition_id}"]
            wait(settings, worker, lambda s=worker_socket(settings, node): s.exists(), timeout=180)
            echo(f"warm worker      {worker.address}")
            fork = by_name[f"clientapp-fork-{node.partition_id}"]
            wait(settings, fork, lambda s=Path(fork.address): s.exists(), timeout=60)
            echo(f"clientapp fork   {fork.address}")
    worker = by_name["prefect-worker"]
    # The worker logs "Worker '…' started!" once; later flow runs push that line far from the log's end.
    wait(settings, worker, lambda: "started!" in log_since_start(settings, worker.name), timeout=60)


def down(settings: StackSettings, *, timeout: float = 15.0) -> list[str]:
    """Stop every running part of the stack (whole process groups); return what was stopped."""
    stopped = []
    for service in reversed(services(settings)):
        pid = running_pid(settings, service.name)
        if not pid:
            continue
        signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and running_pid(settings, service.name):
            time.sleep(0.2)
        if running_pid(settings, service.name):
            signal_group(pid, signal.SIGKILL)
        signal_group(pid, signal.SIGKILL)  # children left behind in the group, e.g. flower-superexec
        pid_file(settings, service.name).unlink(missing_ok=True)
        log_start_file(settings, service.name).unlink(missing_ok=True)
        stopped.append(service.name)
    return stopped


def status(settings: StackSettings) -> list[tuple[str, str, int | None]]:
    """Return (service, address, pid or None) for every part of the stack."""
    return [(s.name, s.address, running_pid(settings, s.name)) for s in services(settings)]
