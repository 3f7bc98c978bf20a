"""A real SuperLink with TLS and node authentication, real SuperNodes, and the flow's TLS connection (flows/flower.py).

The `integration` test starts a real SuperLink and three real SuperNodes: one registered
(joins), one not registered and one trusting another CA (both refused).
"""

from __future__ import annotations

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

from infra.certs import create_certificates
from tests.test_node_cli import _write_csv


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
