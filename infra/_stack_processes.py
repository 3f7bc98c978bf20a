"""Background processes of the local stack: each in its own process group, with a PID file and a log.

Starting is idempotent (a live PID file means running); readiness waits fail with the
log's tail; a service's log offset at start lets a check read only what its current
process wrote; stopping signals whole groups. Private; use infra.stack.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from infra._stack_services import ROOT, Service, StackError, StackSettings


def pid_file(settings: StackSettings, name: str) -> Path:
    """Return the PID file of service `name`."""
    return Path(settings.state_dir) / "pids" / f"{name}.pid"


def log_file(settings: StackSettings, name: str) -> Path:
    """Return the log file of service `name`."""
    return Path(settings.state_dir) / "logs" / f"{name}.log"


def running_pid(settings: StackSettings, name: str) -> int | None:
    """Return the PID of service `name` if its process is alive, clearing a stale PID file."""
    path = pid_file(settings, name)
    if not path.exists():
        return None
    pid = int(path.read_text().strip() or 0)
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state != "Z":
            return pid
    except (ProcessLookupError, FileNotFoundError, PermissionError):
        pass
    path.unlink(missing_ok=True)
    return None


def port_in_use(host: str, port: int) -> bool:
    """Return whether something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def start(settings: StackSettings, service: Service) -> int:
    """Start `service` in its own process group unless it already runs; return its PID."""
    pid = running_pid(settings, service.name)
    if pid:
        return pid
    if service.port is not None and port_in_use(settings.host, service.port):
        raise StackError(
            f"port {service.port} for {service.name} is in use by another program: stop it, or start the "
            f"stack on other ports (`fedcompare up --help`)"
        )
    log_path = log_file(settings, service.name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pid_file(settings, service.name).parent.mkdir(parents=True, exist_ok=True)
    env = {**settings.env(), **service.env}
    for key in ("FLWR_HOME", "PREFECT_HOME"):
        if key in env:
            Path(env[key]).mkdir(parents=True, exist_ok=True)
    log_start_file(settings, service.name).write_text(str(log_path.stat().st_size if log_path.exists() else 0))
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            service.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=ROOT, start_new_session=True,
        )
    pid_file(settings, service.name).write_text(str(process.pid))
    return process.pid


def wait(settings: StackSettings, service: Service, ready, timeout: float) -> None:
    """Wait until `ready()` holds, failing with the service's log tail if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if not running_pid(settings, service.name):
            break
        time.sleep(0.5)
    last = tail(log_file(settings, service.name))
    state = "exited" if not running_pid(settings, service.name) else f"is not ready after {timeout:.0f} s"
    raise StackError(f"{service.name} {state}; see {log_file(settings, service.name)}. Last lines:\n{last}")


def log_start_file(settings: StackSettings, name: str) -> Path:
    """Return the file that holds where in its log the current process of service `name` began."""
    return Path(settings.state_dir) / "pids" / f"{name}.log-offset"


def log_since_start(settings: StackSettings, name: str, limit: int = 1 << 20) -> str:
    """Return up to `limit` bytes that service `name` logged since its current process started."""
    offset_file, log_path = log_start_file(settings, name), log_file(settings, name)
    offset = int(offset_file.read_text() or 0) if offset_file.exists() else 0
    if not log_path.exists():
        return ""
    with open(log_path, "rb") as log:
        log.seek(offset)
        return log.read(limit).decode(errors="replace")


def tail(path: Path, lines: int = 8) -> str:
    """Return the last lines of a log file."""
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def http_ok(url: str) -> bool:
    """Return whether `url` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def signal_group(pid: int, sig: int) -> None:
    """Send `sig` to the process group led by `pid`, ignoring groups that are gone."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
