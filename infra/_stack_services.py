"""The local stack's settings and services: ports, nodes, environment, and the command of every background process.

What the stack is, not how it runs (that is ``infra._stack_processes``); private, use infra.stack.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from infra._clientapp_fork import SOCKET_ENV as CLIENTAPP_FORK_ENV
from infra.state import STATE_DIR_ENV

ROOT = Path(__file__).resolve().parents[1]
WORK_POOL = "fedcompare-local"
DEPLOYMENT = "federated-compare/local"


class StackError(RuntimeError):
    """The local stack cannot do what was asked; the message says what to do."""


SUPERNODE_POLL_ENV = "FEDCOMPARE_SUPERNODE_POLL_S"  # read by flwr_bin/flower-supernode
SUPERNODE_POLL_S = 0.5  # an idle SuperNode's wait between pulls: 2 pulls a second, against Flower's 3 s


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
    # seconds an idle SuperNode waits before it asks the SuperLink for messages again (Flower's 3, hard-coded;
    # flwr_bin/flower-supernode makes it a setting)
    supernode_poll_s: float = SUPERNODE_POLL_S
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
        if not 0.05 <= base.supernode_poll_s <= 60:
            raise StackError(f"--supernode-poll: expected seconds in 0.05..60, got {base.supernode_poll_s}")
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


def executable(name: str) -> str:
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
# SuperNode's own poll of the SuperLink: 3 s after an empty pull, hard-coded in Flower 1.41's
# `start_client_internal`, which `flwr_bin/flower-supernode` sets to `supernode_poll_s`. Flower's
# SuperExec default, once a second, is kept: at 0.25 s the idle local stack took 30% of a core
# instead of 17%. The ServerApp polls for replies every `reply_poll_s` (fedcompare's grid;
# Flower's own waits 3 s), read from FEDCOMPARE_REPLY_POLL_S.
def _poll_env(settings: StackSettings) -> dict[str, str]:
    """Return the environment that sets Flower's and fedcompare's poll intervals."""
    return {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(settings.superexec_poll_s),
            "FEDCOMPARE_REPLY_POLL_S": str(settings.reply_poll_s),
            SUPERNODE_POLL_ENV: str(settings.supernode_poll_s)}


def supernode_executable() -> list[str]:
    """Return the command that starts a SuperNode: fedcompare's launcher of Flower's, or Flower's own script.

    The launcher (`flwr_bin/flower-supernode`) runs Flower's command with its idle wait set
    from SUPERNODE_POLL_ENV; an install that lost the file gets Flower's script.
    """
    launcher = FLWR_LAUNCHERS / "flower-supernode"
    flowers = executable("flower-supernode")  # Flower installed: the launcher imports it
    return [sys.executable, str(launcher)] if launcher.is_file() else [flowers]


def services(settings: StackSettings) -> list[Service]:
    """Return the stack's background processes in start order."""
    state = Path(settings.state_dir)
    found = [
        Service(
            "prefect-server",
            [executable("prefect"), "server", "start", "--host", settings.host, "--port", str(settings.prefect_port)],
            settings.prefect_ui,
            settings.prefect_port,
        ),
        Service(
            "prefect-worker",
            [executable("prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process",
             "--limit", str(settings.concurrency)],
            f"pool {WORK_POOL}",
            None,
        ),
        Service(
            "superlink",
            # the state database keeps nodes and runs across a SuperLink crash: without it the
            # restarted SuperLink answers the nodes' heartbeats with 401 and every SuperNode exits
            [executable("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
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
        node_env = {"FLWR_HOME": str(state / "flwr" / node.name), "OMP_NUM_THREADS": threads, **_poll_env(settings)}
        if settings.warm_workers:
            # the node's clientapp forkserver (infra/_clientapp_fork.py): each message's `flwr-clientapp` is a
            # child forked with flwr imported, in the node's environment
            fork = clientapp_fork_socket(Path(state / "nodes" / node.name))
            found.append(Service(f"clientapp-fork-{node.partition_id}",
                                 [sys.executable, "-m", "infra._clientapp_fork", "--socket", str(fork)],
                                 f"{fork}", None, node_env))
            node_env = {**node_env, CLIENTAPP_FORK_ENV: str(fork)}
        found.append(
            Service(
                f"supernode-{node.partition_id}",
                [*supernode_executable(), "--insecure", "--superlink", settings.superlink,
                 "--host", settings.host, "--port", str(node.port), "--node-config", node_config],
                f"{settings.host}:{node.port} tier={node.tier} partition={node.partition_id}",
                node.port,
                node_env,
            )
        )
    return found


def worker_socket(settings: StackSettings, node: Node) -> Path:
    """Return the Unix socket of ``node``'s warm worker (its authkey sits beside it, mode 0600)."""
    return warm_worker_socket(Path(settings.state_dir) / "nodes" / node.name)


def warm_worker_socket(node_state_dir: Path, name: str = "worker.sock") -> Path:
    """Return the warm worker's socket (or another of the node's, ``name``) for a node whose state is in ``node_state_dir``.

    AF_UNIX paths are limited to 107 bytes: a deeper state directory gets a socket in a
    private folder under /tmp named by the directory's hash.
    """
    path = Path(node_state_dir).resolve() / name
    if len(str(path)) <= 100:
        return path
    digest = hashlib.sha256(str(path.parent).encode()).hexdigest()[:16]
    return Path("/tmp") / f"fedcompare-{os.getuid()}-{digest}" / name


def clientapp_fork_socket(node_state_dir: Path) -> Path:
    """Return the socket of the clientapp forkserver of the node whose state is in ``node_state_dir``."""
    return warm_worker_socket(node_state_dir, "clientapp.sock")
