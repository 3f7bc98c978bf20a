"""Submit, follow and stop Flower runs as the `flwr` CLI does (Flower 1.41 offers no other client).

Submitting and following a run go through the CLI's own Control API client in-process, and
through the CLI only when that fails: a `flwr` process costs seconds of CPU on the cores the
nodes train on, and `flwr run` lists every file under the app folder (a .venv inside it too)
before it builds the FAB. Logs and stopping use the CLI.

The connection is TLS when $FEDCOMPARE_SUPERLINK_ROOT_CERTIFICATES names the SuperLink's CA
certificate (the ca.crt of `fedcompare certs create`), plain otherwise (the local stack).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from infra.checkpoints import checkout_source

APP_DIR = Path(__file__).resolve().parents[1]
CONNECTION = "fedcompare"
# the CA certificate (ca.crt of `fedcompare certs create`) of a SuperLink that serves TLS; unset: plain connection
ROOT_CERTIFICATES_ENV = "FEDCOMPARE_SUPERLINK_ROOT_CERTIFICATES"
_CLI_TIMEOUT_S = 120.0


class FlowerError(RuntimeError):
    """A Flower CLI call failed; the message is one line that says what to do."""


@dataclass(frozen=True)
class RunStatus:
    """The state of a Flower run as `flwr ls` reports it."""

    run_id: int
    status: str
    elapsed_seconds: float
    bytes_in: int
    bytes_out: int
    clientapp_seconds: float

    @property
    def finished(self) -> bool:
        """Return whether the run has ended, well or not."""
        return self.status.startswith("finished")

    @property
    def completed(self) -> bool:
        """Return whether the run ended successfully."""
        return self.status == "finished:completed"


def _flwr_binary() -> str:
    """Return the `flwr` executable of this environment."""
    candidate = Path(sys.executable).parent / "flwr"
    return str(candidate) if candidate.exists() else "flwr"


def connection(superlink: str) -> dict[str, Any]:
    """Return the `flwr` connection to `superlink`: TLS trusting $FEDCOMPARE_SUPERLINK_ROOT_CERTIFICATES, else plain.

    Raises: FlowerError if the variable names no readable PEM file.
    """
    value = os.environ.get(ROOT_CERTIFICATES_ENV, "").strip()
    if not value:
        return {"address": superlink, "insecure": True}
    path = Path(value).expanduser().resolve()
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise FlowerError(f"{ROOT_CERTIFICATES_ENV}={value}: expected the SuperLink's CA certificate file, got "
                          f"{exc.strerror.lower()}: copy ca.crt from `fedcompare certs create` there, or unset "
                          "the variable for a SuperLink without TLS") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise FlowerError(f"{ROOT_CERTIFICATES_ENV}={value}: expected a PEM certificate (-----BEGIN CERTIFICATE-----), "
                          "got another file: point it at the ca.crt that `fedcompare certs create` wrote")
    return {"address": superlink, "root-certificates": str(path)}


def _flwr(args: list[str], superlink: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run `flwr <args>` with a throw-away Flower home whose one connection is `superlink`."""
    target = connection(superlink)
    with tempfile.TemporaryDirectory(prefix="fedcompare-flwr-") as home:
        config = {"superlink": {"default": CONNECTION, CONNECTION: target}}
        Path(home, "config.toml").write_text(tomli_w.dumps(config))
        env = {**os.environ, "FLWR_HOME": home, "COLUMNS": "200", "NO_COLOR": "1"}
        try:
            return subprocess.run(
                [_flwr_binary(), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=APP_DIR
            )
        except subprocess.TimeoutExpired as exc:
            raise FlowerError(
                f"`flwr {args[0]}` got no answer from the SuperLink at {superlink} within {timeout:.0f} s: "
                "check that it runs (`fedcompare status`)"
            ) from exc


def _call(args: list[str], superlink: str, *, timeout: float = _CLI_TIMEOUT_S) -> dict[str, Any]:
    """Run `flwr <args> fedcompare --format json` against `superlink` and return its JSON."""
    done = _flwr([*args, CONNECTION, "--format", "json"], superlink, timeout)
    try:
        answer = json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        answer = {"success": False, "error-message": (done.stderr or done.stdout).strip()[-500:]}
    if not answer.get("success", False):
        message = str(answer.get("error-message", "")).strip().splitlines()
        reason = message[-1] if message else f"exit code {done.returncode}"
        if "connect" in reason.lower() or "unavailable" in reason.lower():
            raise FlowerError(_tls_problem(superlink) or (
                f"cannot reach the Flower SuperLink at {superlink} ({reason}): "
                "start the local stack with `fedcompare up` or set `superlink` to a running SuperLink"
            ))
        raise FlowerError(f"`flwr {args[0]}` against {superlink} failed: {reason}")
    return answer


def _tls_problem(superlink: str) -> str:
    """Return why TLS keeps `flwr` from `superlink` (one line with the fix), or '' if TLS is not the problem."""
    host, _, port = superlink.rpartition(":")
    host = host.strip("[]")
    ca = connection(superlink).get("root-certificates")
    context = ssl.create_default_context(cafile=ca)
    if ca is None:  # a plain connection: only ask whether the server speaks TLS
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                pass
    except ssl.SSLCertVerificationError as exc:
        return (f"TLS to the SuperLink at {superlink} failed ({exc.verify_message}): "
                f"{ROOT_CERTIFICATES_ENV}={ca} must be the ca.crt that signed its certificate, and that "
                f"certificate must name {host} (`fedcompare certs create --server-ip/--server-name {host}`)")
    except ssl.SSLError as exc:
        if ca is None:
            return ""
        return (f"TLS to the SuperLink at {superlink} failed ({exc.reason or exc}): it may run without TLS "
                f"(--insecure); start it with `fedcompare superlink start --tls-dir`, or unset {ROOT_CERTIFICATES_ENV}")
    except (OSError, ValueError):
        return ""  # unreachable: the caller's message says so
    if ca is None:
        return (f"the SuperLink at {superlink} serves TLS but no CA is set: set {ROOT_CERTIFICATES_ENV} to "
                "its ca.crt (from `fedcompare certs create`)")
    return ""


def source_run_config(app: Path = APP_DIR) -> dict[str, str]:
    """Return the run-config keys git-commit and git-dirty: the commit ``app`` is checked out at, for its checkpoints.

    The ServerApp runs from the FAB the SuperLink unpacked, which has no .git; only the
    submitter, which builds the FAB from ``app``, can read the commit.
    """
    source = checkout_source(app)
    dirty = {True: "yes", False: "no", None: "unknown"}[source.git_dirty]
    return {"git-commit": source.git_commit or "", "git-dirty": dirty}


def submit_run(run_config: dict[str, Any], superlink: str, *, app: Path = APP_DIR,
               simulation: dict[str, int | float] | None = None) -> int:
    """Submit a Flower app (this repository's by default) with `run_config` overrides and return the run id.

    ``simulation``: the federation config of a run on a simulation SuperLink (fields of Flower's
    ``SimulationConfig``: num_supernodes, client_resources_num_cpus, ...), as `flwr run
    --federation-config` sends it. Submitted in-process (``_submit_in_process``); if that fails
    for any reason, `flwr run` submits it, whose failures are explained in one line. (A request
    that reached the SuperLink but whose answer was lost would then start a second run; the
    in-process client fails before sending when the SuperLink is unreachable.)
    """
    try:
        return _submit_in_process(run_config, superlink, app=app, simulation=simulation)
    except Exception:  # noqa: BLE001 - the CLI below submits it or gives the one-line explanation
        pass
    with tempfile.NamedTemporaryFile("w", suffix=".toml", prefix="fedcompare-run-", delete=False) as file:
        file.write(tomli_w.dumps(run_config))
    federation = [] if not simulation else [
        "--federation-config", " ".join(f"{k.replace('_', '-')}={v!r}" for k, v in simulation.items())]
    try:
        answer = _call(["run", str(app), "--run-config", file.name, *federation], superlink)
    finally:
        os.unlink(file.name)
    return int(answer["run-id"])


def build_fab(app: Path = APP_DIR) -> bytes:
    """Return the FAB (Flower app bundle) that `flwr run app` builds, reading only the folders fab-include names.

    `flwr run` hands every file under the app folder to the FAB builder, which then keeps
    the ones ``[tool.flwr.app] fab-include`` and .gitignore allow; with the project's
    .venv inside that walk took 9.8 s of CPU per submitted run. This gives Flower's builder
    only pyproject.toml, .gitignore and the top-level folders the patterns start with, so
    its filters see every file they would keep (patterns that start with a wildcard: the
    whole folder, as `flwr run`).
    """
    from flwr.cli.build import build_fab_from_disk, build_fab_from_files
    from flwr.cli.utils import collect_files

    with open(app / "pyproject.toml", "rb") as file:
        config = tomllib.load(file)
    patterns = config.get("tool", {}).get("flwr", {}).get("app", {}).get("fab-include") or []
    tops = sorted({pattern.split("/", 1)[0] for pattern in patterns})
    if not tops or any(set("*?[!") & set(top) for top in tops):
        return build_fab_from_disk(app)
    files: dict[str, Path] = {name: app / name for name in ("pyproject.toml", ".gitignore") if (app / name).is_file()}
    for top in tops:
        if (app / top).is_dir():
            files.update({f"{top}/{relative}": path for relative, path in collect_files(app / top).items()})
        elif (app / top).is_file():
            files[top] = app / top
    return build_fab_from_files(files)[0]


def _control_client(superlink: str):
    """Return the Control API client `flwr` builds for `superlink` (TLS per ``connection``); close it after use.

    The CLI's own client and interceptors, less the account-login interceptor that
    open-source Flower does not use.
    """
    from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    target = connection(superlink)
    certificates = target.get("root-certificates")
    return ControlHttpClient.from_server_address(
        server_address=superlink, insecure=bool(target.get("insecure")),
        root_certificates=Path(certificates).read_bytes() if certificates else None,
        interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
    )


def _submit_in_process(run_config: dict[str, Any], superlink: str, *, app: Path = APP_DIR,
                       simulation: dict[str, int | float] | None = None) -> int:
    """Start a run of ``app`` as `flwr run APP --run-config <run_config as TOML>` does; return its id."""
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest  # pylint: disable=no-name-in-module
    from flwr.proto.federation_config_pb2 import SimulationConfig  # pylint: disable=no-name-in-module
    from flwr.supercore.fab import Fab

    fab = build_fab(app)
    request = StartRunRequest(
        fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})),
        override_config=user_config_to_proto(tomllib.loads(tomli_w.dumps(run_config))),  # the CLI's TOML round trip
        federation="", app_spec="",
        **({"override_federation_config": SimulationConfig(**simulation)} if simulation else {}),
    )
    client = _control_client(superlink)
    try:
        answer = client.StartRun(request)
    finally:
        client.close()
    if not answer.HasField("run_id"):
        raise FlowerError(f"the SuperLink at {superlink} started no run")
    return int(answer.run_id)


def _ls_in_process(run_id: int, superlink: str) -> dict[str, Any]:
    """Return what `flwr ls --run-id <run_id> --format json` prints, asked through Flower's Control API client.

    The `flwr` CLI costs a Python process start (1.3 s of CPU, on the cores the nodes train
    on) for a request that takes milliseconds; followers ask every few seconds. This is the
    CLI's own request (``ListRuns``) and formatting (``format_runs``, ``_to_json``), made with
    the client it builds (``_control_client``).
    """
    from flwr.cli.ls import _to_json
    from flwr.cli.run_utils import format_runs
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=no-name-in-module

    client = _control_client(superlink)
    try:
        answer = client.ListRuns(ListRunsRequest(run_id=run_id))
    finally:
        client.close()
    runs = format_runs([run_from_proto(run) for run in answer.run_dict.values()], answer.now)
    if not runs:
        raise LookupError(f"the SuperLink does not know run {run_id}")
    return json.loads(_to_json(runs))


def run_status(run_id: int, superlink: str) -> RunStatus:
    """Return the current status of Flower run `run_id`.

    Asked in-process (``_ls_in_process``); if that fails for any reason, `flwr ls` is asked,
    whose failures are explained in one line (unreachable SuperLink, TLS, unknown run).
    """
    try:
        answer = _ls_in_process(run_id, superlink)
    except Exception:  # noqa: BLE001 - the CLI below gives the same answer or the one-line explanation
        answer = _call(["ls", "--run-id", str(run_id)], superlink)
    run = answer["runs"][0]
    traffic = run.get("network-traffic", {})
    compute = run.get("compute-time", {})
    return RunStatus(
        run_id=run_id,
        status=run["status"],
        elapsed_seconds=float(run.get("elapsed", 0.0)),
        bytes_in=int(traffic.get("inbound-bytes", 0)),
        bytes_out=int(traffic.get("outbound-bytes", 0)),
        clientapp_seconds=float(compute.get("clientapp-seconds", 0.0)),
    )


def run_log(run_id: int, superlink: str, *, tail: int = 40) -> str:
    """Return the last `tail` lines of a Flower run's log (empty if unavailable)."""
    try:
        done = _flwr(["log", str(run_id), CONNECTION, "--show"], superlink, timeout=60)
    except FlowerError:
        return ""
    return "\n".join(done.stdout.splitlines()[-tail:])


def stop_run(run_id: int, superlink: str) -> None:
    """Ask the SuperLink to stop Flower run `run_id`; ignore runs that already ended."""
    try:
        _call(["stop", str(run_id)], superlink, timeout=30)
    except FlowerError:
        pass
