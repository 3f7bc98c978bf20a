"""Build and check the command lines of a real deployment's Flower SuperLink and SuperNodes.

Flower 1.41 facts, read from its installed source (flwr/superlink/cli/flower_superlink.py,
flwr/supernode/cli/flower_supernode.py, flwr/cli/supernode/register.py,
flwr/supernode/fleet_http_connection.py, flwr/supercore/retry/http_retry.py):

- `flower-superlink` serves the Fleet, Control and Runtime APIs on one HTTP(S) port
  (`--host`/`--port`, default 127.0.0.1:8000). TLS takes `--ssl-ca-certfile`, `--ssl-certfile`
  and `--ssl-keyfile` (all three, PEM); without them it exits unless `--insecure`. Its own
  `flower-superexec` reaches host:port (0.0.0.0 read as 127.0.0.1) over TLS trusting that CA,
  so the server certificate must name that address too.
- `flower-supernode --root-certificates CA.pem` (default: the system's CAs) or `--insecure`;
  `--host`/`--port` (default 127.0.0.1:9094) is the node's Runtime (ClientAppIo) API —
  `--clientappio-api-address` was removed; `--node-config 'k="v" n=1'`.
- SuperNode authentication: `flower-superlink --enable-supernode-auth` (refused with `--insecure`;
  the old `--auth-list-public-keys` CSV makes it exit). Keys are registered through the Control API,
  `flwr supernode register KEY.pub CONNECTION` (OpenSSH EC public key, NIST curve); the registry lives
  in the SuperLink's database (in memory unless `--database FILE`; a registered key is answered
  "[code: 23] Public key already in use" when registered again). Without a database file a restarted
  SuperLink has forgotten its nodes: it answers their heartbeats with 401 and every SuperNode exits. The node
  signs every Fleet request with `--auth-supernode-private-key KEY` (OpenSSH EC private key, no
  passphrase; TLS required).
- A refused node exits 1 (Flower exit code 305) after "Failed to initialize the connection to the
  SuperLink." and a reason: "[code: 2004] Failed to activate SuperNode." (key not registered),
  "[code: 2001] … must be registered via the CLI." (no key), or, after "SSL/TLS handshake error
  detected.", "[SSL: CERTIFICATE_VERIFY_FAILED] …" (wrong CA or name); its `flower-superexec` child
  keeps running. A plain (--insecure) node retries a TLS SuperLink forever.
- Open-source Flower has no account login on the Control API (OIDC is enterprise-only): whoever
  reaches the port can submit runs and register keys. Expose the port to trusted hosts only.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from infra.stack import SUPERNODE_POLL_ENV, SUPERNODE_POLL_S, StackError, flower_path, supernode_executable

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, NODES_DIR = "ca.crt", "ca.key", "server.pem", "server.key", "nodes"
TIERS, DEVICES = ("gpu", "cpu"), ("auto", "cpu", "cuda")
DATA_FORMATS = ("auto", "csv", "npz", "image-folder")
INSECURE_WARNING = ("warning: --insecure: traffic is unencrypted and any node can join; "
                    "use it only on a closed lab network")
# what flower-supernode 1.41 prints when it is refused, and the fix (tests/test_federation.py checks both)
NODE_REFUSALS = (
    ("[code: 2004]", "the SuperLink refused this node: its public key is not registered there; register it "
     "with `fedcompare node register NAME.pub --superlink HOST:PORT --root-certificates ca.crt` where the "
     "SuperLink runs (or put NAME.pub in its --node-keys folder and restart it)"),
    ("[code: 2001]", "the SuperLink accepts registered nodes only: pass --auth-key with this node's key"),
    ("mismatch, certificate is not valid", "TLS failed: the SuperLink's certificate does not name the "
     "--superlink host; recreate it with `fedcompare certs create --server-name/--server-ip HOST --force`"),
    ("CERTIFICATE_VERIFY_FAILED", "TLS failed: --root-certificates did not sign the SuperLink's certificate; "
     "pass the ca.crt from the `fedcompare certs create` run that made its server.pem"),
    ("WRONG_VERSION_NUMBER", "TLS failed: the SuperLink does not speak TLS (it runs with --insecure); start it "
     "with --tls-dir, or pass --insecure here on a closed lab network"),
)
_CERTS_FIX = "run `fedcompare certs create` (see `fedcompare certs create --help`)"
_CONNECTION = "fedcompare"
_KEY_IN_USE = "[code: 23] Public key already in use"  # Flower 1.41's answer to a key registered before


class FederationError(StackError, ValueError):
    """A deployment setting is wrong; the message is one line naming the problem and the fix."""


@dataclass(frozen=True)
class TlsFiles:
    """The SuperLink's TLS files: the CA that signed it, its certificate and its private key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class Gpu:
    """The GPU torch sees on a node."""

    name: str
    memory_gib: float


@dataclass(frozen=True)
class NodeHardware:
    """A node's tier and the device its ClientApp trains on; `warning` is '' or one line."""

    tier: str
    device: str
    gpu: Gpu | None
    warning: str = ""


def tls_files(tls_dir: str | Path) -> TlsFiles:
    """Return the SuperLink's TLS files in `tls_dir`.

    Args: tls_dir: a folder written by `fedcompare certs create`.
    Returns: the CA certificate, server certificate and server key paths (absolute).
    Raises: FederationError naming the first missing file.
    """
    folder = Path(tls_dir).expanduser().resolve()
    if not folder.is_dir():
        raise FederationError(f"--tls-dir {folder} is not a folder: {_CERTS_FIX}")
    files = TlsFiles(folder / CA_CERT, folder / SERVER_CERT, folder / SERVER_KEY)
    for path in (files.ca_cert, files.server_cert, files.server_key):
        if not path.is_file():
            raise FederationError(f"expected {path.name} in --tls-dir {folder}, found none: {_CERTS_FIX}")
    return files


def split_address(address: str) -> tuple[str, int]:
    """Return (host, port) of 'host:port' or '[v6]:port'; raise FederationError if malformed."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\s\[\]]+):(\d+)", address.strip())
    if not match:
        raise FederationError(f"expected HOST:PORT (e.g. coord.example:8000), got {address!r}")
    host, port = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
    return host, check_port(int(port))


def check_port(port: int) -> int:
    """Return `port` if it is a TCP port number; raise FederationError otherwise."""
    if not 1 <= port <= 65535:
        raise FederationError(f"expected a port in 1..65535, got {port}")
    return port


def local_address(host: str, port: int) -> str:
    """Return the address a process on the same host uses to reach a server bound to host:port."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def node_public_keys(keys_dir: str | Path) -> dict[str, Path]:
    """Return {node name: public key file} for every `<name>.pub` in `keys_dir` (empty if none)."""
    folder = Path(keys_dir).expanduser().resolve()
    return {path.stem: path for path in sorted(folder.glob("*.pub"))} if folder.is_dir() else {}


def flower_bin(name: str) -> str:
    """Return a Flower executable of this Python environment; raise FederationError if missing."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FederationError(f"`{name}` is not installed in {path.parent}: run `pip install -e .` there")
    return str(path)


def check_security_choice(*, tls: bool, insecure: bool) -> None:
    """Raise FederationError unless exactly one of TLS and --insecure is chosen."""
    if insecure == tls:
        raise FederationError("choose one of --tls-dir DIR (encrypted, see `fedcompare certs create`) "
                              f"or --insecure (lab only), got {'both' if insecure else 'neither'}")


def superlink_command(*, host: str, port: int, tls: TlsFiles | None, insecure: bool, node_auth: bool,
                      database: Path | None = None) -> list[str]:
    """Return the `flower-superlink` command line.

    Args: host/port: where it listens; tls: its TLS files, or None with insecure=True;
        node_auth: accept only SuperNodes whose public key is registered; database: the SQLite file that
        keeps nodes, registered keys and runs across restarts (None: Flower's in-memory state, which a
        restart loses, and every SuperNode then exits on a refused heartbeat).
    Returns: the command as a list of strings.
    Raises: FederationError if TLS and --insecure are both or neither chosen, or node auth lacks TLS.
    """
    check_security_choice(tls=tls is not None, insecure=insecure)
    if node_auth and insecure:
        raise FederationError("node authentication needs TLS: use --tls-dir instead of --insecure")
    command = [flower_bin("flower-superlink"), "--host", host, "--port", str(check_port(port)),
               # fedcompare's dependencies are installed; a submitted app must not pip-install more
               "--disable-runtime-dependency-installation"]
    if database is not None:
        command += ["--database", str(database)]
    if tls is None:
        return [*command, "--insecure"]
    command += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                "--ssl-keyfile", str(tls.server_key)]
    return [*command, "--enable-supernode-auth"] if node_auth else command


def _config_value(key: str, value: str | float) -> str:
    """Return `value` as a --node-config value (TOML), refusing what Flower's parser cannot carry."""
    if isinstance(value, (int, float)):
        return repr(float(value))
    if '"' in value or any(ord(c) < 32 for c in value):
        raise FederationError(f"node config {key} {value!r} contains a double quote or control character, "
                              "which Flower's --node-config cannot carry: rename or move it")
    return '"' + value.replace("\\", "\\\\") + '"'


def node_config(*, data_path: str | Path, data_format: str, tier: str, device: str,
                label_column: str | None = None, privacy_ledger: str | Path | None = None,
                privacy_budget: float | None = None, worker_socket: str | Path | None = None,
                client_mods: str = "") -> str:
    """Return the SuperNode's --node-config string with the keys the ClientApp reads.

    Args: data_path: the node's data file or image folder (made absolute); data_format:
        auto|csv|npz|image-folder; tier: gpu|cpu; device: auto|cpu|cuda; label_column: the CSV label
        column (omitted if None); privacy_ledger: file of ε spent on this data; privacy_budget: lifetime ε;
        worker_socket: the Unix socket of the node's warm worker (omitted if None); client_mods: the
        Flower client mods the ClientApp installs, "module:function,…" (omitted if "").
    Returns: space-separated key="value" pairs.
    Raises: FederationError for a value outside its choices or one Flower cannot parse.
    """
    for key, value, choices in (("data-format", data_format, DATA_FORMATS), ("tier", tier, TIERS),
                                ("device", device, DEVICES)):
        if value not in choices:
            raise FederationError(f"expected {key} in {'|'.join(choices)}, got {value!r}")
    pairs: dict[str, str | float] = {"data-path": str(Path(data_path).expanduser().resolve()),
                                     "data-format": data_format, "tier": tier, "device": device}
    if label_column is not None:
        pairs["label-column"] = label_column
    if privacy_ledger is not None:
        pairs["privacy-ledger"] = str(Path(privacy_ledger).expanduser().resolve())
    if privacy_budget is not None:
        if privacy_budget <= 0:
            raise FederationError(f"expected a privacy budget ε > 0, got {privacy_budget}")
        pairs["privacy-budget"] = float(privacy_budget)
    if worker_socket is not None:
        pairs["worker-socket"] = str(worker_socket)
    if client_mods:
        pairs["client-mods"] = client_mods
    return " ".join(f"{key}={_config_value(key, value)}" for key, value in pairs.items())


def supernode_command(*, superlink: str, root_certificates: Path | None, auth_key: Path | None,
                      insecure: bool, host: str, port: int, node_config: str) -> list[str]:
    """Return the `flower-supernode` command line.

    Args: superlink: the SuperLink's HOST:PORT; root_certificates: the CA to trust (None: the system's);
        auth_key: this node's private key (None: no node authentication); insecure: no TLS;
        host/port: the node's Runtime (ClientAppIo) API; node_config: from `node_config()`.
    Returns: the command as a list of strings.
    Raises: FederationError for a malformed address or --insecure combined with TLS or a key.
    """
    split_address(superlink)
    if insecure and (root_certificates is not None or auth_key is not None):
        raise FederationError("--insecure turns TLS off, which --root-certificates and --auth-key need: "
                              "drop --insecure, or drop them for a lab network")
    command = [*supernode_executable(), "--superlink", superlink, "--host", host,
               "--port", str(check_port(port)), "--node-config", node_config]
    if insecure:
        return [*command, "--insecure"]
    if root_certificates is not None:
        command += ["--root-certificates", str(root_certificates)]
    if auth_key is not None:
        command += ["--auth-supernode-private-key", str(auth_key)]
    return command


def resolve_hardware(tier: str, device: str, gpu: Gpu | None) -> NodeHardware:
    """Return the node's tier and training device given what torch sees.

    Args: tier: auto|gpu|cpu (auto: gpu if a GPU is usable); device: auto|cpu|cuda; gpu: torch's GPU or None.
    Returns: the resolved tier and device (cuda or cpu) with a warning for a gpu tier without a GPU.
    Raises: FederationError for unknown values or --device cuda without a GPU.
    """
    if tier not in ("auto", *TIERS) or device not in DEVICES:
        raise FederationError(f"expected --tier auto|gpu|cpu and --device auto|cpu|cuda, got {tier}/{device}")
    if device == "cuda" and gpu is None:
        raise FederationError("--device cuda, but torch sees no GPU: use --device auto or cpu, "
                              "or install a CUDA build of torch")
    use_gpu = gpu is not None and device != "cpu"
    resolved = tier if tier != "auto" else ("gpu" if use_gpu else "cpu")
    warning = ("warning: tier gpu without a GPU: this node will train the large model on its CPU (slow)"
               if resolved == "gpu" and not use_gpu else "")
    return NodeHardware(resolved, "cuda" if use_gpu else "cpu", gpu if use_gpu else None, warning)


def explain_refusal(output: str) -> str:
    """Return the fix for a node refusal Flower printed, or ''."""
    return next((fix for marker, fix in NODE_REFUSALS if marker in output), "")


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Return the environment of a Flower process whose state lives in `flwr_home`.

    A SuperNode started with it waits SUPERNODE_POLL_S when idle, unless FEDCOMPARE_SUPERNODE_POLL_S says otherwise.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    return {SUPERNODE_POLL_ENV: str(SUPERNODE_POLL_S), **os.environ, "FLWR_HOME": str(flwr_home),
            "PYTHONUNBUFFERED": "1", "PATH": flower_path()}


def _flwr_control(address: str, ca_cert: Path, calls: Mapping[str, list[str]], *,
                  timeout: float) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run `flwr ARGS… CONNECTION --format json` per call against the SuperLink's Control API, side by side.

    Args: address: the SuperLink's HOST:PORT; ca_cert: the CA that signed it; calls: {what: `flwr` arguments}.
    Returns: {what: the finished process}.
    Raises: FederationError naming `what` if the SuperLink does not answer within `timeout` seconds.
    """
    import tomli_w

    with tempfile.TemporaryDirectory(prefix="fedcompare-control-") as home:
        connection = {"address": address, "root-certificates": str(Path(ca_cert).resolve())}
        Path(home, "config.toml").write_text(tomli_w.dumps({"superlink": {"default": _CONNECTION,
                                                                          _CONNECTION: connection}}))
        env = {**flower_env(Path(home)), "NO_COLOR": "1", "COLUMNS": "200"}

        def one(what: str, args: list[str]) -> subprocess.CompletedProcess[str]:
            command = [flower_bin("flwr"), *args, _CONNECTION, "--format", "json"]
            try:
                return subprocess.run(command, capture_output=True, text=True, env=env, cwd=home, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise FederationError(f"the SuperLink at {address} did not answer within {timeout:.0f} s while "
                                      f"{what}: check that it runs and that this host may reach it") from None

        # each `flwr` call spends seconds starting up: run them side by side
        with ThreadPoolExecutor(max_workers=min(8, max(1, len(calls)))) as pool:
            futures = {what: pool.submit(one, what, args) for what, args in calls.items()}
            return {what: future.result() for what, future in futures.items()}


def register_nodes(address: str, ca_cert: Path, public_keys: Mapping[str, Path], *,
                   timeout: float = 60.0) -> dict[str, int | None]:
    """Register node public keys with a running SuperLink through `flwr supernode register`.

    Args: address: the SuperLink's HOST:PORT as seen from here; ca_cert: the CA that signed it;
        public_keys: {node name: OpenSSH public key file}.
    Returns: {node name: Flower node id, or None if its key was registered before (kept in --database)}.
    Raises: FederationError with Flower's reason if a key is refused or the SuperLink does not answer.
    """
    calls = {name: ["supernode", "register", str(Path(key).resolve()), "--name", name]
             for name, key in public_keys.items()}
    done = _flwr_control(address, ca_cert, calls, timeout=timeout)
    return {name: _node_id(done[name], name, Path(key)) for name, key in public_keys.items()}


def unregister_node(address: str, ca_cert: Path, node_id: int, *, timeout: float = 60.0) -> None:
    """Unregister a node from a running SuperLink (`flwr supernode unregister`): its key is refused from now on.

    Args: address: the SuperLink's HOST:PORT; ca_cert: the CA that signed it; node_id: the Flower node id
        that registration printed.
    Raises: FederationError with Flower's reason if the SuperLink refuses or does not answer.
    """
    done = _flwr_control(address, ca_cert, {"node": ["supernode", "unregister", str(node_id)]}, timeout=timeout)
    answer = _answer(done["node"])
    if not answer.get("success"):
        reason = _reason(answer, done["node"]).rstrip(".")
        raise FederationError(f"unregistering Flower node {node_id} failed: {reason}; the ids are those "
                              "`fedcompare superlink start` and `fedcompare node register` printed")


def _answer(done: subprocess.CompletedProcess[str]) -> dict:
    """Return the JSON object a `flwr … --format json` call printed, or its error output as one."""
    try:
        return json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        return {"error-message": (done.stderr or done.stdout).strip()}


def _reason(answer: dict, done: subprocess.CompletedProcess[str]) -> str:
    """Return the last meaningful line of Flower's error message (at most 300 characters)."""
    lines = [line.strip() for line in str(answer.get("error-message") or "").splitlines()
             if line.strip() and not line.startswith("For more information")]
    return (lines[-1] if lines else f"`flwr` exited with code {done.returncode}")[-300:]


def _node_id(done: subprocess.CompletedProcess[str], name: str, key: Path) -> int | None:
    """Return the node id `flwr supernode register` printed, None for a key registered before; else raise."""
    answer = _answer(done)
    if answer.get("success") and "node-id" in answer:
        return int(answer["node-id"])
    reason = _reason(answer, done)
    if _KEY_IN_USE in reason:  # registered at an earlier start: the SuperLink's database kept it
        return None
    raise FederationError(f"registering node {name}'s key {key} failed: {reason}")
