"""A real deployment's certificates, node keys and Flower command lines (infra/certs.py, infra/federation.py,
cli/federation.py), and the flow's TLS connection to the SuperLink (flows/flower.py).

Unit tests are fast and start no Flower process; the one `integration` test starts a real
SuperLink with TLS and node authentication and three real SuperNodes: one registered (joins),
one not registered and one trusting another CA (both refused).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

from cli import federation as cli_federation
from cli import main as cli_main
from infra.certs import check_auth_key, check_public_key, check_server_names, create_certificates
from infra.federation import (
    FederationError,
    explain_refusal,
    Gpu,
    node_config,
    resolve_hardware,
    superlink_command,
    supernode_command,
    tls_files,
)
from infra.stack import StackError


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Path:
    """A CA, a SuperLink certificate for coord.example/10.0.0.1 and keys for nodes site_a and site_b."""
    out = tmp_path_factory.mktemp("certs")
    create_certificates(out, server_names=["coord.example"], server_ips=["10.0.0.1"], nodes=["site_a", "site_b"])
    return out


def _handshake(certs: Path, server_hostname: str) -> None:
    """Complete a real TLS handshake against a server using certs/server.pem, trusting only certs/ca.crt."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    client_ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass
        threading.Thread(target=serve, daemon=True).start()
        with socket.create_connection(listener.getsockname(), timeout=5) as sock:
            with client_ctx.wrap_socket(sock, server_hostname=server_hostname):
                pass


def test_server_certificate_is_signed_by_the_ca_and_names_the_superlink(deployment):
    ca = x509.load_pem_x509_certificate((deployment / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((deployment / "server.pem").read_bytes())

    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"coord.example", "localhost"}
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"10.0.0.1", "127.0.0.1", "::1"}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for hostname in ("localhost", "127.0.0.1", "coord.example"):
        _handshake(deployment, hostname)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(deployment, "other.example")


def test_node_keys_load_with_flowers_own_loaders(deployment):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    key, pub = deployment / "nodes" / "site_a.key", deployment / "nodes" / "site_a.pub"

    registered = try_load_public_key(pub)  # what `flwr supernode register` sends
    private, public = _try_setup_client_authentication(
        argparse.Namespace(auth_supernode_private_key=str(key), auth_supernode_public_key=None))

    assert public_key_to_bytes(public) == registered  # the node signs as the key the SuperLink registered
    assert check_auth_key(key) == (key, "") and check_public_key(pub) == pub
    assert b"PRIVATE" not in pub.read_bytes()


def test_private_files_get_mode_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        written = create_certificates(tmp_path / "out", server_names=["coord.example"], nodes=["site_a"])
    finally:
        os.umask(old)

    modes = {file.path.name: file.path.stat().st_mode & 0o777 for file in written}
    assert modes == {"ca.crt": 0o644, "ca.key": 0o600, "server.pem": 0o644, "server.key": 0o600,
                     "site_a.key": 0o600, "site_a.pub": 0o644}
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o700
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".partial")]


def test_existing_files_are_kept_unless_force(tmp_path):
    create_certificates(tmp_path, server_names=["coord.example"], nodes=["site_a"])
    before = (tmp_path / "ca.key").read_bytes()

    with pytest.raises(FederationError, match=r"ca\.crt.*already exist.*--force"):
        create_certificates(tmp_path, server_names=["coord.example"])
    assert (tmp_path / "ca.key").read_bytes() == before
    create_certificates(tmp_path, nodes=["site_b"])  # node keys alone leave the CA alone
    assert (tmp_path / "ca.key").read_bytes() == before
    create_certificates(tmp_path, server_names=["coord.example"], force=True)
    assert (tmp_path / "ca.key").read_bytes() != before


@pytest.mark.parametrize("kwargs, message", [
    ({}, "nothing to create"),
    ({"server_ips": ["10.0.0.300"]}, "expected an IP address"),
    ({"server_names": ["bad name"]}, "expected a DNS name"),
    ({"nodes": ["site_a", "site_a"]}, "repeated"),
    ({"nodes": ["../escape"]}, "not a node name"),
])
def test_bad_certificate_requests_say_what_is_wrong(tmp_path, kwargs, message):
    with pytest.raises(FederationError, match=message):
        create_certificates(tmp_path, **kwargs)
    assert not list(tmp_path.iterdir())


def test_superlink_command_carries_tls_and_node_auth(deployment):
    tls = tls_files(deployment)

    secure = superlink_command(host="0.0.0.0", port=8000, tls=tls, insecure=False, node_auth=True)
    lab = superlink_command(host="127.0.0.1", port=8000, tls=None, insecure=True, node_auth=False)

    assert Path(secure[0]).name == "flower-superlink"
    assert secure[1:] == ["--host", "0.0.0.0", "--port", "8000", "--disable-runtime-dependency-installation",
                          "--ssl-ca-certfile", str(deployment / "ca.crt"),
                          "--ssl-certfile", str(deployment / "server.pem"),
                          "--ssl-keyfile", str(deployment / "server.key"), "--enable-supernode-auth"]
    assert "--insecure" in lab and not any(arg.startswith("--ssl") or "auth" in arg for arg in lab)


def test_superlink_start_keeps_its_state_in_a_database_file(deployment, tmp_path, monkeypatch):
    started = {}
    monkeypatch.setattr(cli_federation, "_listening", lambda address: False)
    monkeypatch.setattr(cli_federation, "_run_foreground",
                        lambda name, command, env, **kwargs: started.update(command=command) or 0)

    for extra, expected in (([], tmp_path / "state" / "flwr" / "superlink" / "state.db"),
                            (["--database", str(tmp_path / "link.db")], tmp_path / "link.db")):
        cli_main.main(["superlink", "start", "--tls-dir", str(deployment), "--port", "1",
                             "--state-dir", str(tmp_path / "state"), *extra])

        command = started["command"]
        assert command[command.index("--database") + 1] == str(expected)
        assert expected.parent.is_dir()


@pytest.mark.parametrize("tls, insecure, node_auth, message", [
    (False, False, False, "choose one of --tls-dir DIR .* or --insecure .*got neither"),
    (True, True, False, "got both"),
    (False, True, True, "node authentication needs TLS"),
])
def test_superlink_security_choices_are_checked(deployment, tls, insecure, node_auth, message):
    with pytest.raises(FederationError, match=message):
        superlink_command(host="127.0.0.1", port=8000, tls=tls_files(deployment) if tls else None,
                          insecure=insecure, node_auth=node_auth)


def test_missing_tls_file_is_named_with_the_fix(deployment, tmp_path):
    (tmp_path / "ca.crt").write_bytes((deployment / "ca.crt").read_bytes())
    (tmp_path / "server.pem").write_bytes((deployment / "server.pem").read_bytes())

    with pytest.raises(FederationError, match=r"expected server\.key in --tls-dir .*: run `fedcompare certs create`"):
        tls_files(tmp_path)


def test_server_certificate_must_name_the_superlinks_local_address(deployment):
    check_server_names(deployment / "server.pem", "127.0.0.1")
    check_server_names(deployment / "server.pem", "COORD.example")

    with pytest.raises(FederationError, match="does not name 10.9.9.9.*--server-ip 10.9.9.9"):
        check_server_names(deployment / "server.pem", "10.9.9.9")


def test_node_config_round_trips_through_flowers_parser(tmp_path):
    from flwr.common.config import parse_config_args

    data = tmp_path / "site a" / "data\\v1.csv"
    config = node_config(data_path=data, data_format="csv", tier="gpu", device="cuda", label_column="y",
                         privacy_ledger=tmp_path / "ledger.json", privacy_budget=8, client_mods="ops.log:mod,b:m")

    assert parse_config_args([config]) == {
        "data-path": str(data), "data-format": "csv", "tier": "gpu", "device": "cuda", "label-column": "y",
        "privacy-ledger": str(tmp_path / "ledger.json"), "privacy-budget": 8.0, "client-mods": "ops.log:mod,b:m",
    }
    with pytest.raises(FederationError, match="double quote"):
        node_config(data_path=tmp_path / 'a"b.csv', data_format="csv", tier="cpu", device="cpu")
    with pytest.raises(FederationError, match="expected tier in gpu|cpu"):
        node_config(data_path=data, data_format="csv", tier="auto", device="cpu")


def test_supernode_command_carries_tls_and_the_node_key(deployment):
    key = deployment / "nodes" / "site_a.key"

    secure = supernode_command(superlink="coord.example:8000", root_certificates=deployment / "ca.crt", auth_key=key,
                               insecure=False, host="127.0.0.1", port=9094, node_config='tier="cpu"')
    lab = supernode_command(superlink="10.0.0.1:8000", root_certificates=None, auth_key=None, insecure=True,
                            host="127.0.0.1", port=9095, node_config='tier="cpu"')

    assert secure[1:] == ["--superlink", "coord.example:8000", "--host", "127.0.0.1", "--port", "9094",
                          "--node-config", 'tier="cpu"', "--root-certificates", str(deployment / "ca.crt"),
                          "--auth-supernode-private-key", str(key)]
    assert lab[-1] == "--insecure"
    with pytest.raises(FederationError, match="--insecure turns TLS off"):
        supernode_command(superlink="h:1", root_certificates=None, auth_key=key, insecure=True, host="127.0.0.1",
                          port=9094, node_config="")
    with pytest.raises(FederationError, match="expected HOST:PORT"):
        supernode_command(superlink="https://h", root_certificates=None, auth_key=None, insecure=False,
                          host="127.0.0.1", port=9094, node_config="")


def test_auth_key_problems_are_named(deployment, tmp_path):
    loose = tmp_path / "loose.key"
    loose.write_bytes((deployment / "nodes" / "site_a.key").read_bytes())
    loose.chmod(0o644)

    assert "chmod 600" in check_auth_key(loose)[1]
    with pytest.raises(FederationError, match="does not exist"):
        check_auth_key(tmp_path / "missing.key")
    with pytest.raises(FederationError, match="not an unencrypted OpenSSH EC private key"):
        check_auth_key(deployment / "server.key")  # a PEM TLS key, not what Flower's SuperNode loads


@pytest.mark.parametrize("tier, device, gpu, expected", [
    ("auto", "auto", Gpu("H100", 79.1), ("gpu", "cuda")),
    ("auto", "auto", None, ("cpu", "cpu")),
    ("auto", "cpu", Gpu("H100", 79.1), ("cpu", "cpu")),
    ("cpu", "auto", Gpu("H100", 79.1), ("cpu", "cuda")),
    ("gpu", "auto", None, ("gpu", "cpu")),
])
def test_tier_and_device_follow_the_gpu(tier, device, gpu, expected):
    hardware = resolve_hardware(tier, device, gpu)

    assert (hardware.tier, hardware.device) == expected
    assert ("without a GPU" in hardware.warning) == (expected == ("gpu", "cpu"))


def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(FederationError, match="--device cuda, but torch sees no GPU"):
        resolve_hardware("auto", "cuda", None)


def test_registration_answers_become_node_ids_or_one_line_errors():
    from infra.federation import _node_id

    ok = subprocess.CompletedProcess([], 0, '{\n  "success": true,\n  "node-id": 5567060837790511204\n}\n', "")
    taken = subprocess.CompletedProcess([], 0, '{"success": false, "error-message": "Using SuperLink: x '
                                        '(127.0.0.1:18732)\\n\\n[code: 23] Public key already in use."}', "")
    bad = subprocess.CompletedProcess([], 0, '{"success": false, "error-message": "Using SuperLink: x '
                                      '(127.0.0.1:18732)\\n\\n[code: 22] The provided public key is not valid."}', "")

    assert _node_id(ok, "site_a", Path("a.pub")) == 5567060837790511204
    assert _node_id(taken, "site_a", Path("a.pub")) is None  # registered at an earlier start: kept in the database
    with pytest.raises(FederationError, match=r"registering node site_a's key a.pub failed: \[code: 22\] The prov"):
        _node_id(bad, "site_a", Path("a.pub"))


@pytest.mark.parametrize("flower_says, fix", [
    ("Failed to initialize the connection to the SuperLink.\n[code: 2004] Failed to activate SuperNode.",
     "public key is not registered"),
    ("[code: 2001] SuperNode authentication is enabled. All SuperNodes must be registered via the CLI.",
     "pass --auth-key"),
    ("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate",
     "--root-certificates did not sign"),
    ("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: IP address mismatch, certificate is not valid "
     "for '127.0.0.2'.", "does not name the --superlink host"),
    ("[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)", "does not speak TLS"),
])
def test_node_refusals_are_explained(flower_says, fix):
    assert fix in explain_refusal(flower_says)


def _write_csv(path: Path) -> Path:
    """Write a small CSV node dataset (labels 0..2) to `path`."""
    rows = [f"{i * 0.5},{i % 7},{i % 3}" for i in range(30)]
    path.write_text("secret_feature,other,label\n" + "\n".join(rows) + "\n")
    return path


def test_node_start_checks_the_data_and_prints_counts_only(deployment, tmp_path, monkeypatch, capsys):
    started = {}
    monkeypatch.setattr(cli_federation, "_run_foreground",
                        lambda name, command, env, **_: started.update(command=command, env=env) or 0)
    data = _write_csv(tmp_path / "site_a.csv")

    code = cli_main.main(["node", "start", "--superlink", "coord.example:8000", "--data", str(data),
                                "--device", "cpu", "--root-certificates", str(deployment / "ca.crt"),
                                "--auth-key", str(deployment / "nodes" / "site_a.key"),
                                "--state-dir", str(tmp_path / "state"), "--port", "1",
                                "--client-mods", "tests.test_client_mods:recording_mod"])

    out = capsys.readouterr().out
    socket = tmp_path / "state" / "node" / "worker.sock"
    assert code == 0
    assert out.splitlines() == [
        "node start: tier cpu, device cpu, 30 examples (csv, features (2,)), 3 classes {0: 10, 1: 10, 2: 10}, "
        "SuperLink coord.example:8000 (TLS, node key)",
        f"warm worker: {socket.resolve()} (log {socket.resolve().with_name('worker.log')})"]
    assert f'worker-socket="{socket.resolve()}"' in " ".join(started["command"])
    assert "0.5" not in out and "secret_feature" not in out
    config = started["command"][started["command"].index("--node-config") + 1]
    assert f'data-path="{data}"' in config and 'tier="cpu"' in config and 'label-column="label"' in config
    assert 'client-mods="tests.test_client_mods:recording_mod"' in config
    assert started["env"]["FLWR_HOME"] == str(tmp_path / "state" / "flwr" / "node")


def test_node_start_with_a_client_mod_that_does_not_import_prints_one_line_before_anything_starts(tmp_path, capsys):
    data = _write_csv(tmp_path / "site_a.csv")

    code = cli_main.main(["node", "start", "--superlink", "h:8000", "--data", str(data), "--device", "cpu",
                          "--insecure", "--state-dir", str(tmp_path / "state"), "--client-mods", "ops_missing:mod"])

    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("fedcompare: --client-mods entry 'ops_missing:mod': ModuleNotFoundError")
    assert not (tmp_path / "state").exists(), "nothing started"


def test_node_start_with_bad_data_prints_one_line(tmp_path, capsys):
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")

    code = cli_main.main(["node", "start", "--superlink", "h:8000", "--data", str(tmp_path / "bad.csv"),
                                "--device", "cpu", "--insecure"])

    err = capsys.readouterr().err
    assert code == 1 and err.startswith("fedcompare: ") and err.count("\n") == 1


def test_superlink_start_without_certificates_says_to_create_them(tmp_path, capsys):
    code = cli_main.main(["superlink", "start", "--tls-dir", str(tmp_path), "--port", "1"])

    assert code == 1
    assert capsys.readouterr().err == (f"fedcompare: expected ca.crt in --tls-dir {tmp_path}, found none: "
                                       "run `fedcompare certs create` (see `fedcompare certs create --help`)\n")


def test_node_register_and_unregister_talk_to_the_control_api_with_the_ca(deployment, monkeypatch, capsys):
    from infra import federation

    calls = []

    def fake_control(address, ca_cert, calls_, *, timeout):
        calls.append((address, ca_cert, calls_))
        ok = '{"success": true, "node-id": 42}' if "register" in next(iter(calls_.values())) else '{"success": true}'
        return {what: subprocess.CompletedProcess([], 0, ok, "") for what in calls_}

    monkeypatch.setattr(federation, "_flwr_control", fake_control)
    key, ca = deployment / "nodes" / "site_a.pub", str(deployment / "ca.crt")

    registered = cli_main.main(["node", "register", str(key), "--superlink", "coord.example:8000",
                                      "--root-certificates", ca])
    unregistered = cli_main.main(["node", "unregister", "42", "--superlink", "coord.example:8000",
                                        "--root-certificates", ca])

    assert registered == unregistered == 0
    assert capsys.readouterr().out.splitlines() == [
        "registered node site_a (Flower node id 42)",
        "unregistered Flower node 42: the SuperLink refuses its key from now on"]
    assert calls[0][:2] == ("coord.example:8000", deployment / "ca.crt")
    assert calls[0][2] == {"site_a": ["supernode", "register", str(key), "--name", "site_a"]}
    assert calls[1][2] == {"node": ["supernode", "unregister", "42"]}


def test_node_register_refuses_a_private_key_in_one_line(deployment, capsys):
    code = cli_main.main(["node", "register", str(deployment / "nodes" / "site_a.key"), "--superlink",
                                "coord.example:8000", "--root-certificates", str(deployment / "ca.crt")])

    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "is not an OpenSSH EC public key" in err


def test_certs_create_prints_paths_but_no_key_material(tmp_path, capsys):
    code = cli_main.main(["certs", "create", "--out", str(tmp_path / "c"), "--server-name", "coord.example",
                                "--server-ip", "10.0.0.1", "--nodes", "site_a,site_b"])

    out = capsys.readouterr().out
    assert code == 0 and len(out.splitlines()) == 8
    assert "BEGIN" not in out and "AAAA" not in out
    assert f"wrote {tmp_path / 'c' / 'nodes' / 'site_b.key'} (0600)" in out


def _alive(pid: int, grace: float = 5.0) -> bool:
    """Return whether process `pid` still exists (and is not a zombie) after up to `grace` seconds."""
    deadline = time.monotonic() + grace  # a SIGKILLed process takes a moment to die on a busy machine
    while True:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        except FileNotFoundError:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.05)


def test_foreground_process_group_stops_on_a_signal_and_refusals_fail(capsys):
    # a parent that starts a child (like flower-supernode and its flower-superexec) and waits
    script = ("import subprocess, sys, time; "
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              "print('SuperNode ID: 7 child', c.pid, flush=True); time.sleep(60)")
    seen = []

    def on_line(line: str) -> None:
        seen.append(line)
        if "SuperNode ID" in line:
            os.kill(os.getpid(), signal.SIGTERM)  # what a service manager sends; Ctrl-C sends SIGINT

    code = cli_federation._run_foreground("node", [sys.executable, "-c", script], dict(os.environ), on_line=on_line)

    assert code == 0 and capsys.readouterr().out.rstrip().endswith("node stopped")
    assert not _alive(int(seen[0].split()[-1])), "the child of the stopped process outlived it"
    refused = [sys.executable, "-c", "print('[code: 2004] Failed to activate SuperNode.'); raise SystemExit(1)"]
    with pytest.raises(StackError, match="public key is not registered"):
        cli_federation._run_foreground("node", refused, dict(os.environ), explain=explain_refusal)


# --- a real SuperLink and SuperNodes ----------------------------------------------------------------------------


def _free_port() -> int:
    """Return a TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Cli:
    """A `fedcompare` subcommand running in its own process group, its output collected."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "cli.main", *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.process.stdout.readline, "")),
                                       daemon=True)
        self.reader.start()

    def exit_code(self, timeout: float) -> int:
        """Wait for the process and its last output; return its exit code."""
        code = self.process.wait(timeout=timeout)
        self.reader.join(timeout=5)
        return code

    def wait_for(self, text: str, timeout: float) -> None:
        """Wait until the output holds `text`, failing with the output if it exits or times out first."""
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline and self.process.poll() is None, "".join(self.lines)[-3000:]
            time.sleep(0.2)

    def stop(self) -> int:
        """Send Ctrl-C's signal, wait, and kill the group if it lingers; return the exit code."""
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            return self.exit_code(timeout=30)
        finally:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.integration
def test_registered_node_joins_and_others_are_refused(tmp_path):
    certs, other = tmp_path / "certs", tmp_path / "other"
    create_certificates(certs, server_names=["coord.example"], nodes=["site_a"])
    create_certificates(other, server_names=["coord.example"], nodes=["outsider"])  # another CA, a key never registered
    data, link_port = _write_csv(tmp_path / "site.csv"), _free_port()
    running: list[_Cli] = []

    def node(name: str, ca: Path, key: Path) -> _Cli:
        running.append(_Cli("node", "start", "--superlink", f"127.0.0.1:{link_port}", "--data", str(data),
                            "--device", "cpu", "--root-certificates", str(ca), "--auth-key", str(key),
                            "--port", str(_free_port()), "--state-dir", str(tmp_path / name)))
        return running[-1]

    try:
        link = _Cli("superlink", "start", "--port", str(link_port), "--tls-dir", str(certs),
                    "--state-dir", str(tmp_path / "link"))
        running.append(link)
        link.wait_for("registered node site_a", timeout=45)
        link.wait_for("superlink ready", timeout=5)

        member = node("member", certs / "ca.crt", certs / "nodes" / "site_a.key")
        stranger = node("stranger", certs / "ca.crt", other / "nodes" / "outsider.key")
        fooled = node("fooled", other / "ca.crt", certs / "nodes" / "site_a.key")

        member.wait_for("node joined the SuperLink", timeout=40)
        assert stranger.exit_code(timeout=40) == 1
        refused = "fedcompare: the SuperLink refused this node: its public key is not registered"
        assert refused in "".join(stranger.lines)
        assert fooled.exit_code(timeout=40) == 1
        assert "fedcompare: TLS failed: --root-certificates did not sign" in "".join(fooled.lines)
        assert member.stop() == 0 and "node stopped" in member.lines[-1]
        assert link.stop() == 0 and "superlink stopped" in link.lines[-1]
    finally:
        for cli in running:
            if cli.process.poll() is None:
                cli.stop()


@pytest.fixture
def tls_server(deployment):
    """A TLS server on 127.0.0.1 presenting the deployment's server.pem; yields its HOST:PORT."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(deployment / "server.pem", deployment / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def test_the_flow_connects_over_tls_when_a_ca_is_set(deployment, tmp_path, monkeypatch):
    from flows.flower import FlowerError, connection

    monkeypatch.delenv("FEDCOMPARE_SUPERLINK_ROOT_CERTIFICATES", raising=False)
    assert connection("coord.example:8000") == {"address": "coord.example:8000", "insecure": True}
    monkeypatch.setenv("FEDCOMPARE_SUPERLINK_ROOT_CERTIFICATES", str(deployment / "ca.crt"))
    assert connection("coord.example:8000") == {"address": "coord.example:8000",
                                                "root-certificates": str(deployment / "ca.crt")}
    for path, problem in ((tmp_path / "missing.crt", "got no such file"),
                          (deployment / "nodes" / "site_a.pub", "expected a PEM certificate")):
        monkeypatch.setenv("FEDCOMPARE_SUPERLINK_ROOT_CERTIFICATES", str(path))
        with pytest.raises(FlowerError, match=problem):
            connection("coord.example:8000")


def test_the_flow_explains_tls_failures(deployment, tmp_path, tls_server, monkeypatch):
    from flows.flower import _tls_problem

    stranger = tmp_path / "stranger"
    create_certificates(stranger, server_names=["coord.example"])

    monkeypatch.delenv("FEDCOMPARE_SUPERLINK_ROOT_CERTIFICATES", raising=False)
    no_ca = _tls_problem(tls_server)
    monkeypatch.setenv("FEDCOMPARE_SUPERLINK_ROOT_CERTIFICATES", str(stranger / "ca.crt"))
    wrong_ca = _tls_problem(tls_server)
    monkeypatch.setenv("FEDCOMPARE_SUPERLINK_ROOT_CERTIFICATES", str(deployment / "ca.crt"))
    right_ca = _tls_problem(tls_server)

    assert no_ca.startswith(f"the SuperLink at {tls_server} serves TLS but no CA is set: "
                            "set FEDCOMPARE_SUPERLINK_ROOT_CERTIFICATES")
    assert wrong_ca.startswith(f"TLS to the SuperLink at {tls_server} failed (") and "must be the ca.crt" in wrong_ca
    assert right_ca == ""


def test_runs_are_submitted_with_the_fab_and_config_that_flwr_run_sends(tmp_path):
    import tomllib

    import tomli_w
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import parse_config_args

    from flows.config import CompareConfig
    from flows.flower import APP_DIR, build_fab

    assert build_fab() == build_fab_from_disk(APP_DIR), "the same bytes, so the same FAB hash"
    run_config = CompareConfig().run_spec("large", arm="large", model="cnn", run_key="k", store_uri="file:///s",
                                          nodes=[1, 2]).to_run_config()
    toml = tmp_path / "run.toml"  # what submit_run's CLI fallback hands to `flwr run --run-config`
    toml.write_text(tomli_w.dumps(run_config))
    assert tomllib.loads(tomli_w.dumps(run_config)) == parse_config_args([str(toml)]) == run_config
