"""`fedcompare superlink start`, `node start|register|unregister` and `certs create`: a real deployment's parts.

`superlink start` and `node start` run Flower in the foreground, show its output, and stop its whole
process group (its `flower-superexec` child included) on Ctrl-C, SIGTERM or SIGHUP.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

from infra import certs
from infra import federation as fed
from infra._foreground import run_foreground as _run_foreground
from infra.federation import FederationError
from infra.stack import CLIENTAPP_FORK_ENV, clientapp_fork_socket, warm_worker_socket
from infra.state import state_dir


def register(commands: argparse._SubParsersAction) -> None:
    """Add `superlink start`, `node start|register|unregister` and `certs create` to `fedcompare`'s subcommands."""
    state = "(default: $FEDCOMPARE_STATE_DIR or ./.fedcompare)"
    link = commands.add_parser("superlink", help="run the Flower SuperLink of a real deployment")
    sub = link.add_subparsers(dest="action", required=True, metavar="ACTION").add_parser(
        "start", help="run the SuperLink in the foreground (Ctrl-C stops it)",
        description="Run a Flower SuperLink in the foreground. With --tls-dir it serves TLS and, if node public "
        "keys are there (nodes/*.pub, or --node-keys), accepts only those nodes: it registers every key at start "
        "(its --database keeps them, with its nodes and runs, across restarts; removing a key file does not "
        "unregister it). Its Control API (runs, node registration) shares the port and has no "
        "login in open-source Flower: let only trusted hosts reach it.")
    sub.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface "
                     "(default 127.0.0.1)")
    sub.add_argument("--port", type=int, default=8000, help="port of its Fleet, Control and Runtime APIs "
                     "(default 8000)")
    sub.add_argument("--tls-dir", help="folder with ca.crt, server.pem and server.key from `fedcompare certs create`")
    sub.add_argument("--insecure", action="store_true", help="no TLS and no node authentication: traffic is "
                     "unencrypted and any node can join (closed lab networks only)")
    sub.add_argument("--node-keys", metavar="DIR", help="folder of node public keys NAME.pub to accept "
                     "(default: TLS_DIR/nodes; none there: any node that trusts the CA can join)")
    sub.add_argument("--no-node-auth", action="store_true", help="accept any node even if node keys exist")
    sub.add_argument("--state-dir", default=argparse.SUPPRESS, help=f"Flower's state goes to STATE_DIR/flwr {state}")
    sub.add_argument("--database", metavar="FILE", help="SQLite file that keeps nodes, registered keys and runs "
                     "across restarts (default STATE_DIR/flwr/superlink/state.db); without it a restarted "
                     "SuperLink forgets its nodes and they exit")
    sub.set_defaults(func=_cmd_superlink_start)

    node = commands.add_parser("node", help="run a Flower SuperNode on a data-holding machine; register its key")
    node_actions = node.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub = node_actions.add_parser(
        "start", help="check the local data, then run a SuperNode in the foreground (Ctrl-C stops it)",
        description="Check this machine's data (only counts and shapes are printed), pick the tier and device, "
        "and run a Flower SuperNode that serves fedcompare's ClientApp on that data; the data stays here.")
    sub.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    sub.add_argument("--data", required=True, help="the node's data: a .csv or .npz file or an image folder")
    sub.add_argument("--data-format", default="auto", choices=fed.DATA_FORMATS,
                     help="how to read --data (default auto: guess from the path)")
    sub.add_argument("--label-column", default="label", help="label column of a CSV file (default label)")
    sub.add_argument("--tier", default="auto", choices=("auto", *fed.TIERS), help="which arm this node serves: "
                     "gpu (large model) or cpu (small); auto: gpu if torch sees a GPU and --device is not cpu "
                     "(default)")
    sub.add_argument("--device", default="auto", choices=fed.DEVICES, help="where the ClientApp trains "
                     "(default auto: cuda if torch sees a GPU, else cpu)")
    sub.add_argument("--root-certificates", metavar="CA_CERT", help="the CA certificate (ca.crt) that signed the "
                     "SuperLink's certificate (default: the system's trusted CAs)")
    sub.add_argument("--auth-key", metavar="KEY", help="this node's private key (nodes/NAME.key from "
                     "`fedcompare certs create`) for SuperLinks that accept registered nodes only")
    sub.add_argument("--insecure", action="store_true", help="connect without TLS (to a SuperLink started "
                     "with --insecure; closed lab networks only)")
    sub.add_argument("--host", default="127.0.0.1", help="address of the node's ClientAppIo (Runtime) API, "
                     "which only its own ClientApp processes use (default 127.0.0.1)")
    sub.add_argument("--port", type=int, default=9094, help="port of that API; distinct per node on one "
                     "host (default 9094)")
    sub.add_argument("--privacy-budget", type=float, metavar="EPSILON", help="lifetime ε that DP-SGD may "
                     "spend on this node's data over all runs (default: no limit; the ledger is kept anyway)")
    sub.add_argument("--client-mods", default="", metavar="MODULE:FUNCTION[,...]", help="Flower client mods "
                     "(mod(msg, context, call_next)) that the ClientApp wraps around every message, outermost "
                     "first, e.g. your own logging; each must import here, installed or on PYTHONPATH, which the "
                     "SuperNode passes on (node config client-mods; default: none)")
    sub.add_argument("--warm-worker", action=argparse.BooleanOptionalAction, default=True,
                     help="start a warm worker beside the SuperNode that keeps torch, scikit-learn and this "
                     "node's data loaded between Flower messages, and a forkserver that starts each message's "
                     "ClientApp process with flwr imported (default: on)")
    sub.add_argument("--state-dir", default=argparse.SUPPRESS, help="Flower's state goes to STATE_DIR/flwr and "
                     f"the node's privacy ledger to STATE_DIR/privacy-ledger.json {state}")
    sub.set_defaults(func=_cmd_node_start)
    control = "(run it where the SuperLink's port is reachable; open-source Flower's Control API has no login)"
    sub = node_actions.add_parser("register", help="register a node's public key with a running SuperLink",
                                  description="Register NAME.pub with a running SuperLink, which then accepts the "
                                  f"node holding NAME.key; prints the node's Flower id {control}.")
    sub.add_argument("public_key", metavar="NAME.pub", help="the node's public key (nodes/NAME.pub from "
                     "`fedcompare certs create --nodes NAME`)")
    sub.add_argument("--name", help="the node's name (default: the key file's name without .pub)")
    sub.set_defaults(func=_cmd_node_register)
    sub_unregister = node_actions.add_parser(
        "unregister", help="unregister a node from a running SuperLink: its key is refused from then on",
        description=f"Unregister a node by the Flower id its registration printed {control}.")
    sub_unregister.add_argument("node_id", type=int, metavar="NODE_ID", help="the node's Flower id")
    sub_unregister.set_defaults(func=_cmd_node_unregister)
    for sub in (sub, sub_unregister):
        sub.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
        sub.add_argument("--root-certificates", required=True, metavar="CA_CERT",
                         help="the CA certificate (ca.crt) that signed the SuperLink's certificate")

    certs_parser = commands.add_parser("certs", help="create the TLS certificates and node keys of a deployment")
    sub = certs_parser.add_subparsers(dest="action", required=True, metavar="ACTION").add_parser(
        "create", help="create a CA, the SuperLink's certificate and node key pairs",
        description="Create a CA, the SuperLink's TLS certificate (when --server-name/--server-ip are given; "
        "localhost, 127.0.0.1 and ::1 are always added, Flower's SuperLink needs them) and one authentication "
        "key pair per node; with --nodes alone only node keys are added and the CA is left as it is. Private keys get "
        "mode 0600; existing files are kept unless --force.")
    sub.add_argument("--out", required=True, help="output folder (created with mode 0700)")
    sub.add_argument("--server-name", action="append", default=[], metavar="DNS[,DNS]",
                     help="DNS name nodes use to reach the SuperLink (repeatable)")
    sub.add_argument("--server-ip", action="append", default=[], metavar="IP[,IP]",
                     help="IP address nodes use to reach the SuperLink (repeatable)")
    sub.add_argument("--nodes", action="append", default=[], metavar="NAME[,NAME]",
                     help="node names, one key pair each: nodes/NAME.key (private) and nodes/NAME.pub")
    sub.add_argument("--days", type=int, default=730, help="validity of the SuperLink certificate "
                     "(default 730; the CA's is 3650)")
    sub.add_argument("--force", action="store_true", help="replace existing files")
    sub.set_defaults(func=_cmd_certs_create)


def _split(values: list[str]) -> list[str]:
    """Return the comma-separated items of repeated flag values."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _cmd_certs_create(args: argparse.Namespace) -> int:
    """Create the CA, server certificate and node keys asked for, and say what was written."""
    written = certs.create_certificates(args.out, server_names=_split(args.server_name),
                                        server_ips=_split(args.server_ip), nodes=_split(args.nodes),
                                        force=args.force, server_days=args.days)
    for file in written:
        print(f"wrote {file.path}{' (0600)' if file.private else ''}  {file.what}")
    return 0


def _cmd_superlink_start(args: argparse.Namespace) -> int:
    """Check the TLS files and node keys, run the SuperLink, and register the node keys once it listens."""
    fed.check_port(args.port)
    fed.check_security_choice(tls=bool(args.tls_dir), insecure=args.insecure)
    tls = fed.tls_files(args.tls_dir) if args.tls_dir else None
    local = fed.local_address(args.host, args.port)
    keys: dict[str, Path] = {}
    if args.node_keys and (args.insecure or args.no_node_auth):
        raise FederationError("--node-keys needs TLS and node authentication: drop --insecure/--no-node-auth")
    if tls is not None and not args.no_node_auth:
        folder = args.node_keys or Path(tls.ca_cert.parent, fed.NODES_DIR)
        keys = {name: certs.check_public_key(path) for name, path in fed.node_public_keys(folder).items()}
        if args.node_keys and not keys:
            raise FederationError(f"expected node public keys NAME.pub in --node-keys {args.node_keys}, found none: "
                                  "create them with `fedcompare certs create --nodes NAME,…`")
    flwr_home = state_dir(getattr(args, "state_dir", None)) / "flwr" / "superlink"
    database = Path(args.database).expanduser().resolve() if args.database else flwr_home / "state.db"
    database.parent.mkdir(parents=True, exist_ok=True)
    command = fed.superlink_command(host=args.host, port=args.port, tls=tls, insecure=args.insecure,
                                    node_auth=bool(keys), database=database)
    if tls is not None:
        certs.check_server_names(tls.server_cert, fed.split_address(local)[0])
    if _listening(local):
        raise FederationError(f"port {args.port} is in use on this host: stop that program or choose another --port")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("fedcompare: note: the Control API (runs, node registration) shares this port and has no login in "
              "open-source Flower: let only trusted hosts reach it", file=sys.stderr)
    if args.insecure:
        print(f"fedcompare: {fed.INSECURE_WARNING}", file=sys.stderr)
    elif not keys:
        print("fedcompare: warning: node authentication is off: any node that trusts the CA can join "
              "(create node keys with `fedcompare certs create --nodes NAME,…`)", file=sys.stderr)

    def registered() -> None:
        for name, node_id in (fed.register_nodes(local, tls.ca_cert, keys).items() if keys else []):
            print(f"registered node {name} " + (f"(Flower node id {node_id})" if node_id is not None else
                  f"(at an earlier start; kept in {database.name})"), flush=True)
        mode = "insecure" if tls is None else f"TLS, {'node keys: ' + ', '.join(keys) if keys else 'no node auth'}"
        print(f"superlink ready at {args.host}:{args.port} ({mode}); Ctrl-C stops it", flush=True)

    env = fed.flower_env(flwr_home)
    return _run_foreground("superlink", command, env, ready=lambda: _listening(local),
                           on_ready=registered)


def _listening(address: str) -> bool:
    """Return whether something accepts TCP connections at HOST:PORT."""
    try:
        socket.create_connection(fed.split_address(address), timeout=0.5).close()
    except OSError:
        return False
    return True


def _speaks_tls(address: str) -> bool:
    """Return whether the server at HOST:PORT completes a TLS handshake (False if unreachable)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # a probe only: no trust is derived
    try:
        with socket.create_connection(fed.split_address(address), timeout=3) as sock:
            with context.wrap_socket(sock, server_hostname=fed.split_address(address)[0]):
                return True
    except (OSError, ssl.SSLError):
        return False


def _detect_gpu() -> fed.Gpu | None:
    """Return the first GPU torch sees, or None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return fed.Gpu(props.name, props.total_memory / 2**30)


def _cmd_node_start(args: argparse.Namespace) -> int:
    """Check the node's data and settings, print one line about them, and run the SuperNode."""
    from clients.client_mods import ClientModsError, load_client_mods
    from clients.node_data import NodeDataError, inspect_node_data

    fed.split_address(args.superlink)
    try:
        load_client_mods(args.client_mods, named_by="--client-mods")  # refused here in one line, not by every message
    except ClientModsError as exc:
        raise FederationError(str(exc)) from None
    root = certs.check_root_certificates(args.root_certificates) if args.root_certificates else None
    key, key_warning = certs.check_auth_key(args.auth_key) if args.auth_key else (None, "")
    try:
        info = inspect_node_data(Path(args.data).expanduser().resolve(), data_format=args.data_format,
                                 label_column=args.label_column)
    except NodeDataError as exc:
        raise FederationError(str(exc)) from None
    hardware = fed.resolve_hardware(args.tier, args.device, _detect_gpu() if args.device != "cpu" else None)
    data_format = info.data_format if info.data_format in fed.DATA_FORMATS else args.data_format
    state = state_dir(getattr(args, "state_dir", None))
    socket_path = warm_worker_socket(state / "node") if args.warm_worker else None
    config = fed.node_config(data_path=info.path, data_format=data_format, tier=hardware.tier,
                             device=hardware.device, label_column=args.label_column if data_format == "csv" else None,
                             privacy_ledger=state / "privacy-ledger.json", privacy_budget=args.privacy_budget,
                             worker_socket=socket_path, client_mods=args.client_mods)
    command = fed.supernode_command(superlink=args.superlink, root_certificates=root, auth_key=key,
                                    insecure=args.insecure, host=args.host, port=args.port, node_config=config)
    if _listening(fed.local_address(args.host, args.port)):
        raise FederationError(f"port {args.port} is in use on this host: stop that program or choose another --port")
    if args.insecure and _speaks_tls(args.superlink):  # Flower would retry a plain connection to it forever
        raise FederationError(f"the SuperLink at {args.superlink} speaks TLS: drop --insecure and pass "
                              "--root-certificates ca.crt (and --auth-key if it accepts registered nodes only)")
    for warning in (key_warning, hardware.warning, fed.INSECURE_WARNING if args.insecure else ""):
        if warning:
            print(f"fedcompare: {warning}", file=sys.stderr)
    device = hardware.device + (f" ({hardware.gpu.name}, {hardware.gpu.memory_gib:.1f} GiB)" if hardware.gpu else "")
    counts = sorted(info.class_counts.items())
    classes = ", ".join(f"{label}: {count}" for label, count in counts[:20]) + (", …" if len(counts) > 20 else "")
    security = "insecure" if args.insecure else f"TLS, {'node key' if key else 'no node key'}"
    print(f"node start: tier {hardware.tier}, device {device}, {info.num_examples} examples "
          f"({data_format}, features {tuple(info.feature_shape)}), {len(counts)} classes {{{classes}}}, "
          f"SuperLink {args.superlink} ({security})", flush=True)

    def joined(line: str) -> None:
        if match := re.search(r"SuperNode ID: (\d+)", line):
            print(f"node joined the SuperLink at {args.superlink} as Flower node {match.group(1)}", flush=True)

    env = fed.flower_env(state / "flwr" / "node")
    helpers = []  # the warm worker and the clientapp forkserver, stopped with the node
    if socket_path:
        helpers.append(_start_warm_worker(socket_path, env))
        fork_socket = clientapp_fork_socket(state / "node")
        helpers.append(_start_helper([sys.executable, "-m", "infra._clientapp_fork", "--socket", str(fork_socket)],
                                     fork_socket.with_name("clientapp-fork.log"), env))
        env = {**env, CLIENTAPP_FORK_ENV: str(fork_socket)}
    try:
        return _run_foreground("node", command, env, on_line=joined, explain=fed.explain_refusal)
    finally:
        for helper in helpers:
            _stop_group(helper)


def _start_warm_worker(socket_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start the node's warm worker (clients/_warm.py) in its own process group, logging to a file beside it.

    Messages that arrive before it listens (it imports torch first) are answered in the ClientApp's process.
    """
    log_path = socket_path.with_name("worker.log")
    process = _start_helper([sys.executable, "-m", "clients._warm", "--socket", str(socket_path)], log_path, env)
    print(f"warm worker: {socket_path} (log {log_path})", flush=True)
    return process


def _start_helper(command: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start one of the node's helper processes in its own process group, logging to ``log_path``."""
    log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)


def _stop_group(process: subprocess.Popen) -> None:
    """Kill ``process``'s whole group (its forkserver and workers) and reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait(timeout=30)


def _cmd_node_register(args: argparse.Namespace) -> int:
    """Register one node's public key with a running SuperLink and print its Flower node id."""
    fed.split_address(args.superlink)
    key = certs.check_public_key(Path(args.public_key).expanduser().resolve())
    name = args.name or key.stem
    node_id = fed.register_nodes(args.superlink, certs.check_root_certificates(args.root_certificates),
                                 {name: key})[name]
    print(f"registered node {name} (Flower node id {node_id})" if node_id is not None else
          f"node {name}'s key is known to the SuperLink already: registered before, or unregistered (an "
          "unregistered key cannot come back: create a new one with `fedcompare certs create --nodes NAME --force`)")
    return 0


def _cmd_node_unregister(args: argparse.Namespace) -> int:
    """Unregister a node from a running SuperLink by its Flower node id."""
    fed.split_address(args.superlink)
    fed.unregister_node(args.superlink, certs.check_root_certificates(args.root_certificates), args.node_id)
    print(f"unregistered Flower node {args.node_id}: the SuperLink refuses its key from now on")
    return 0
