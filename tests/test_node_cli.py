"""The `fedcompare node`, `superlink` and `certs` commands (cli/federation.py): checks, one-line refusals, process groups.

Unit tests; they start no Flower process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli import federation as cli_federation
from cli import main as cli_main
from infra.federation import (
    explain_refusal,
)
from infra.stack import StackError


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
