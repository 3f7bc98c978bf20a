"""The local stack: Prefect server, work pool, worker and deployment, a Flower SuperLink and SuperNodes.

Every part runs in the background in its own process group, with a PID file and a log
under one state directory, so `up` is idempotent and `down` stops whole groups
(a SuperNode's `flower-superexec` child included).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from infra.state import STATE_DIR_ENV

ROOT = Path(__file__).resolve().parents[1]
WORK_POOL = "fedcompare-local"
DEPLOYMENT = "federated-compare/local"


class StackError(RuntimeError):
    """The local stack cannot do what was asked; the message says what to do."""


@dataclass(frozen=True)
class Node:
    """One local SuperNode: its partition of the data, tier and Runtime API port."""

    name: str
    partition_id: int
    num_partitions: int
    tier: str
    port: int


@dataclass(frozen=True)
class StackSettings:
    """Addresses and layout of one local stack, kept in `<state dir>/stack.json`."""

    state_dir: str
    host: str = "127.0.0.1"
    prefect_port: int = 4200
    superlink_port: int = 8000
    node_base_port: int = 9101
    gpu_nodes: int = 2
    cpu_nodes: int = 2
    node_privacy_budget: float = 0.0  # lifetime ε per node's data; 0: no limit
    warm_workers: bool = True  # a warm worker beside each SuperNode answers its messages (clients/_warm.py)
    # seconds between a SuperExec's polls for work (Flower's FLWR_SUPEREXEC_TASK_POLL_INTERVAL, 0.01-60)
    superexec_poll_s: float = 1.0
    reply_poll_s: float = 0.5  # seconds between the ServerApp's polls for the nodes' replies
    concurrency: int = 1  # comparisons (flow runs) at once: the work pool's limit and the worker's; others wait
    nodes: list[Node] = field(default_factory=list)

    @classmethod
    def create(cls, state_dir: Path, **overrides: float) -> StackSettings:
        """Lay out the nodes for the given counts and ports."""
        base = cls(state_dir=str(state_dir), **overrides)
        if not 0.01 <= base.superexec_poll_s <= 60:
            raise StackError(f"--superexec-poll: expected seconds in 0.01..60 (Flower's bounds), "
                             f"got {base.superexec_poll_s}")
        if not 0.01 <= base.reply_poll_s <= 60:
            raise StackError(f"--reply-poll: expected seconds in 0.01..60, got {base.reply_poll_s}")
        tiers = ["gpu"] * base.gpu_nodes + ["cpu"] * base.cpu_nodes
        nodes = [
            Node(f"node-{i}", i, len(tiers), tier, base.node_base_port + i) for i, tier in enumerate(tiers)
        ]
        return cls(**{**asdict(base), "nodes": nodes})

    @classmethod
    def load(cls, state_dir: Path) -> StackSettings | None:
        """Read the settings of the stack in `state_dir`, if one was started there."""
        path = state_dir / "stack.json"
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        return cls(**{**raw, "nodes": [Node(**n) for n in raw["nodes"]]})

    def save(self) -> None:
        """Write the settings next to the PID files."""
        path = Path(self.state_dir) / "stack.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))

    @property
    def prefect_api(self) -> str:
        """Return the Prefect API URL."""
        return f"http://{self.host}:{self.prefect_port}/api"

    @property
    def prefect_ui(self) -> str:
        """Return the Prefect UI URL."""
        return f"http://{self.host}:{self.prefect_port}"

    @property
    def superlink(self) -> str:
        """Return the SuperLink address (Fleet and Control APIs share one port)."""
        return f"{self.host}:{self.superlink_port}"

    @property
    def store_uri(self) -> str:
        """Return the default checkpoint store of this stack."""
        return "file://" + str(Path(self.state_dir) / "store")

    def env(self) -> dict[str, str]:
        """Return the environment every part of the stack (and the flows it runs) sees."""
        state = Path(self.state_dir)
        env = {
            **os.environ,
            "PATH": flower_path(),
            "FEDCOMPARE_ROOT": str(ROOT),
            STATE_DIR_ENV: str(state),
            "FEDCOMPARE_SUPERLINK": self.superlink,
            "PREFECT_HOME": str(state / "prefect"),
            "PREFECT_API_URL": self.prefect_api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_HOST": self.host,
            "PREFECT_SERVER_API_PORT": str(self.prefect_port),
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_CLI_COLORS": "false",
            "PYTHONUNBUFFERED": "1",
        }
        env.setdefault("FEDCOMPARE_STORE", self.store_uri)
        return env


FLWR_LAUNCHERS = Path(__file__).resolve().parent / "flwr_bin"


def flower_path() -> str:
    """Return the PATH of Flower's processes: fedcompare's launchers, this environment's scripts, then PATH.

    Flower's SuperLink and SuperNodes start `flower-superexec` from PATH, and each SuperExec a
    `flwr-clientapp` per message: `flwr_bin/flwr-clientapp` is Flower's own command without the
    SuperNode's imports (0.9 s of CPU less per message; see the script). An install that lost the
    script's executable bit gets Flower's own command.
    """
    first = [str(FLWR_LAUNCHERS)] if os.access(FLWR_LAUNCHERS / "flwr-clientapp", os.X_OK) else []
    return os.pathsep.join([*first, str(Path(sys.executable).parent), os.environ.get("PATH", "")])


@dataclass(frozen=True)
class Service:
    """One background process of the stack."""

    name: str
    command: list[str]
    address: str
    port: int | None
    env: dict[str, str] = field(default_factory=dict)


def _bin(name: str) -> str:
    """Return an executable of this Python environment, failing clearly if it is missing."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise StackError(
            f"`{name}` is not installed in {Path(sys.executable).parent}: run `make setup` "
            "(or `pip install -e .`) in this environment"
        )
    return str(path)


# The SuperLink and every SuperNode start a `flower-superexec` child that polls for work
# (a ServerApp or ClientApp to launch) every `superexec_poll_s` (Flower's
# FLWR_SUPEREXEC_TASK_POLL_INTERVAL); every Flower message waits for that poll, after the
# SuperNode's own poll of the SuperLink (3 s after an empty pull, hard-coded in Flower 1.41's
# `start_client_internal`). Flower's default, once a second, is kept: at 0.25 s the idle local
# stack took 30% of a core instead of 17%. The ServerApp polls for replies every `reply_poll_s`
# (fedcompare's grid; Flower's own waits 3 s), read from FEDCOMPARE_REPLY_POLL_S.
def _poll_env(settings: StackSettings) -> dict[str, str]:
    """Return the environment that sets Flower's and fedcompare's poll intervals."""
    return {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(settings.superexec_poll_s),
            "FEDCOMPARE_REPLY_POLL_S": str(settings.reply_poll_s)}


def services(settings: StackSettings) -> list[Service]:
    """Return the stack's background processes in start order."""
    state = Path(settings.state_dir)
    found = [
        Service(
            "prefect-server",
            [_bin("prefect"), "server", "start", "--host", settings.host, "--port", str(settings.prefect_port)],
            settings.prefect_ui,
            settings.prefect_port,
        ),
        Service(
            "prefect-worker",
            [_bin("prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process",
             "--limit", str(settings.concurrency)],
            f"pool {WORK_POOL}",
            None,
        ),
        Service(
            "superlink",
            # the state database keeps nodes and runs across a SuperLink crash: without it the
            # restarted SuperLink answers the nodes' heartbeats with 401 and every SuperNode exits
            [_bin("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
             "--host", settings.host, "--port", str(settings.superlink_port),
             "--database", str(state / "flwr" / "superlink" / "state.db")],
            settings.superlink,
            settings.superlink_port,
            {"FLWR_HOME": str(state / "flwr" / "superlink"), **_poll_env(settings)},
        ),
    ]
    # nodes share this host's cores: one torch thread pool each, not one per core each
    threads = str(max(1, (os.cpu_count() or 1) // max(1, len(settings.nodes))))
    for node in settings.nodes:
        ledger = state / "nodes" / node.name / "privacy-ledger.json"
        socket = worker_socket(settings, node)
        node_config = (
            f'partition-id={node.partition_id} num-partitions={node.num_partitions} tier="{node.tier}" '
            f'privacy-ledger="{ledger}"'
            + (f" privacy-budget={settings.node_privacy_budget}" if settings.node_privacy_budget else "")
            + (f' worker-socket="{socket}"' if settings.warm_workers else "")
        )
        if settings.warm_workers:
            # the node's warm worker (clients/_warm.py): keeps torch, scikit-learn and the node's data loaded,
            # so that each Flower message costs its training and not a fresh process's imports
            found.append(
                Service(
                    f"worker-{node.partition_id}",
                    [sys.executable, "-m", "clients._warm", "--socket", str(socket)],
                    f"{socket}",
                    None,
                    {"OMP_NUM_THREADS": threads},
                )
            )
        found.append(
            Service(
                f"supernode-{node.partition_id}",
                [_bin("flower-supernode"), "--insecure", "--superlink", settings.superlink,
                 "--host", settings.host, "--port", str(node.port), "--node-config", node_config],
                f"{settings.host}:{node.port} tier={node.tier} partition={node.partition_id}",
                node.port,
                {"FLWR_HOME": str(state / "flwr" / node.name), "OMP_NUM_THREADS": threads, **_poll_env(settings)},
            )
        )
    return found


def worker_socket(settings: StackSettings, node: Node) -> Path:
    """Return the Unix socket of ``node``'s warm worker (its authkey sits beside it, mode 0600)."""
    return warm_worker_socket(Path(settings.state_dir) / "nodes" / node.name)


def warm_worker_socket(node_state_dir: Path) -> Path:
    """Return the warm worker's socket for a node whose state lives in ``node_state_dir``.

    AF_UNIX paths are limited to 107 bytes: a deeper state directory gets a socket in a
    private folder under /tmp named by the directory's hash.
    """
    path = Path(node_state_dir).resolve() / "worker.sock"
    if len(str(path)) <= 100:
        return path
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    return Path("/tmp") / f"fedcompare-{os.getuid()}-{digest}" / "worker.sock"


def _pid_file(settings: StackSettings, name: str) -> Path:
    """Return the PID file of service `name`."""
    return Path(settings.state_dir) / "pids" / f"{name}.pid"


def _log_file(settings: StackSettings, name: str) -> Path:
    """Return the log file of service `name`."""
    return Path(settings.state_dir) / "logs" / f"{name}.log"


def running_pid(settings: StackSettings, name: str) -> int | None:
    """Return the PID of service `name` if its process is alive, clearing a stale PID file."""
    path = _pid_file(settings, name)
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


def _start(settings: StackSettings, service: Service) -> int:
    """Start `service` in its own process group unless it already runs; return its PID."""
    pid = running_pid(settings, service.name)
    if pid:
        return pid
    if service.port is not None and port_in_use(settings.host, service.port):
        raise StackError(
            f"port {service.port} for {service.name} is in use by another program: stop it, or start the "
            f"stack on other ports (`fedcompare up --help`)"
        )
    log_path = _log_file(settings, service.name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    _pid_file(settings, service.name).parent.mkdir(parents=True, exist_ok=True)
    env = {**settings.env(), **service.env}
    for key in ("FLWR_HOME", "PREFECT_HOME"):
        if key in env:
            Path(env[key]).mkdir(parents=True, exist_ok=True)
    _log_start_file(settings, service.name).write_text(str(log_path.stat().st_size if log_path.exists() else 0))
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            service.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=ROOT, start_new_session=True,
        )
    _pid_file(settings, service.name).write_text(str(process.pid))
    return process.pid


def _wait(settings: StackSettings, service: Service, ready, timeout: float) -> None:
    """Wait until `ready()` holds, failing with the service's log tail if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if not running_pid(settings, service.name):
            break
        time.sleep(0.5)
    tail = _tail(_log_file(settings, service.name))
    state = "exited" if not running_pid(settings, service.name) else f"is not ready after {timeout:.0f} s"
    raise StackError(f"{service.name} {state}; see {_log_file(settings, service.name)}. Last lines:\n{tail}")


def _log_start_file(settings: StackSettings, name: str) -> Path:
    """Return the file that holds where in its log the current process of service `name` began."""
    return Path(settings.state_dir) / "pids" / f"{name}.log-offset"


def _log_since_start(settings: StackSettings, name: str, limit: int = 1 << 20) -> str:
    """Return up to `limit` bytes that service `name` logged since its current process started."""
    offset_file, log_path = _log_start_file(settings, name), _log_file(settings, name)
    offset = int(offset_file.read_text() or 0) if offset_file.exists() else 0
    if not log_path.exists():
        return ""
    with open(log_path, "rb") as log:
        log.seek(offset)
        return log.read(limit).decode(errors="replace")


def _tail(path: Path, lines: int = 8) -> str:
    """Return the last lines of a log file."""
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _http_ok(url: str) -> bool:
    """Return whether `url` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _prefect(settings: StackSettings, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a Prefect CLI command against the stack's server."""
    done = subprocess.run(
        [_bin("prefect"), *args], capture_output=True, text=True, env=settings.env(), cwd=ROOT, timeout=180
    )
    if check and done.returncode != 0:
        raise StackError(f"`prefect {' '.join(args)}` failed: {(done.stderr or done.stdout).strip()[-400:]}")
    return done


def up(settings: StackSettings, *, echo=print) -> None:
    """Start every part of the stack that is not running yet and deploy the flows."""
    settings.save()
    by_name = {service.name: service for service in services(settings)}

    server = by_name["prefect-server"]
    _start(settings, server)
    _wait(settings, server, lambda: _http_ok(f"{settings.prefect_api}/health"), timeout=120)
    echo(f"prefect server   {settings.prefect_ui}")

    _prefect(settings, "work-pool", "create", WORK_POOL, "--type", "process", "--overwrite")
    # the pool's own limit makes the setting visible in the UI (Work Pools) for every deployment on it
    _prefect(settings, "work-pool", "set-concurrency-limit", WORK_POOL, str(settings.concurrency))
    _prefect(settings, "--no-prompt", "deploy", "--all")
    echo(f"deployment       {DEPLOYMENT} (work pool {WORK_POOL}, {settings.concurrency} comparison(s) at once)")
    _start(settings, by_name["prefect-worker"])

    link = by_name["superlink"]
    _start(settings, link)
    _wait(settings, link, lambda: port_in_use(settings.host, settings.superlink_port), timeout=60)
    echo(f"flower superlink {settings.superlink}")

    for node in settings.nodes:
        if settings.warm_workers:
            _start(settings, by_name[f"worker-{node.partition_id}"])
        _start(settings, by_name[f"supernode-{node.partition_id}"])
    for node in settings.nodes:
        service = by_name[f"supernode-{node.partition_id}"]
        _wait(settings, service, lambda n=node: port_in_use(settings.host, n.port), timeout=60)
        echo(f"flower supernode {service.address}")
    for node in settings.nodes:
        if settings.warm_workers:  # ready once its forkserver has imported torch and scikit-learn
            worker = by_name[f"worker-{node.partition_id}"]
            _wait(settings, worker, lambda s=worker_socket(settings, node): s.exists(), timeout=180)
            echo(f"warm worker      {worker.address}")
    worker = by_name["prefect-worker"]
    # The worker logs "Worker '…' started!" once; later flow runs push that line far from the log's end.
    _wait(settings, worker, lambda: "started!" in _log_since_start(settings, worker.name), timeout=60)


def down(settings: StackSettings, *, timeout: float = 15.0) -> list[str]:
    """Stop every running part of the stack (whole process groups); return what was stopped."""
    stopped = []
    for service in reversed(services(settings)):
        pid = running_pid(settings, service.name)
        if not pid:
            continue
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and running_pid(settings, service.name):
            time.sleep(0.2)
        if running_pid(settings, service.name):
            _signal_group(pid, signal.SIGKILL)
        _signal_group(pid, signal.SIGKILL)  # children left behind in the group, e.g. flower-superexec
        _pid_file(settings, service.name).unlink(missing_ok=True)
        _log_start_file(settings, service.name).unlink(missing_ok=True)
        stopped.append(service.name)
    return stopped


def _signal_group(pid: int, sig: int) -> None:
    """Send `sig` to the process group led by `pid`, ignoring groups that are gone."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def status(settings: StackSettings) -> list[tuple[str, str, int | None]]:
    """Return (service, address, pid or None) for every part of the stack."""
    return [(s.name, s.address, running_pid(settings, s.name)) for s in services(settings)]
