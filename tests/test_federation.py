"""A real deployment's certificates, node keys and Flower command lines (infra/certs.py, infra/federation.py).

Unit tests; they start no Flower process.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import subprocess
import threading
import sys
from pathlib import Path

import pytest
from cryptography import x509

from cli import federation as cli_federation
from cli import main as cli_main
from infra.certs import check_auth_key, check_public_key, check_server_names, create_certificates
from infra.federation import (
    FederationError, explain_refusal, Gpu, node_config, resolve_hardware, superlink_command, supernode_command, tls_files,
)
from infra.stack import FLWR_LAUNCHERS


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

    # Flower's command through fedcompare's launcher (its idle wait a setting), then Flower's own arguments
    assert secure[:2] == [sys.executable, str(FLWR_LAUNCHERS / "flower-supernode")]
    assert secure[2:] == ["--superlink", "coord.example:8000", "--host", "127.0.0.1", "--port", "9094",
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
