"""The stack launcher's process handling, with real background processes."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time

import pytest

from infra._stack_processes import log_file, log_since_start, start
from infra.stack import FLWR_LAUNCHERS, Service, StackSettings, down, flower_path, running_pid
from tests.integration_stack import _cli


def test_readiness_reads_only_what_the_current_process_logged(tmp_path, monkeypatch):
    settings = StackSettings.create(tmp_path)
    service = Service("prefect-worker", [sys.executable, "-c",
                                         "import time; time.sleep(0.5); print('started!', flush=True); time.sleep(60)"],
                      address="-", port=None)
    monkeypatch.setattr("infra.stack.services", lambda _: [service])
    log = log_file(settings, service.name)
    log.parent.mkdir(parents=True)
    log.write_text("Worker 'old' started!\n" + "a flow run's output\n" * 1000)

    pid = start(settings, service)
    try:
        assert "started!" not in log_since_start(settings, service.name)
        deadline = time.monotonic() + 20
        while "started!" not in log_since_start(settings, service.name):
            assert time.monotonic() < deadline, "the new process's line never showed"
            time.sleep(0.1)
        assert start(settings, service) == pid, "a running service is not started twice"
    finally:
        assert down(settings) == ["prefect-worker"]
    assert running_pid(settings, service.name) is None


def test_concurrency_is_a_stack_setting_that_sets_the_workers_limit(tmp_path):
    from cli.main import _parser, _settings
    from infra.stack import services

    args = _parser().parse_args(["--state-dir", str(tmp_path), "up", "--concurrency", "2"])
    settings = _settings(args)
    settings.save()

    worker = next(s for s in services(settings) if s.name == "prefect-worker")
    assert worker.command[worker.command.index("--limit") + 1] == "2"
    assert StackSettings.load(tmp_path).concurrency == 2, "kept in stack.json"


def test_a_concurrency_below_one_is_refused_in_one_line(tmp_path, capsys):
    import pytest

    from cli.main import _parser

    with pytest.raises(SystemExit) as exited:
        _parser().parse_args(["up", "--concurrency", "0"])

    assert exited.value.code == 2
    assert "expected a whole number of at least 1, got '0'" in capsys.readouterr().err


def test_flowers_processes_find_the_light_clientapp_launcher_first_and_it_is_flowers_command():
    found = shutil.which("flwr-clientapp", path=flower_path())
    assert found == str(FLWR_LAUNCHERS / "flwr-clientapp")
    # Flower's own parser answers, and the SuperNode's command (FastAPI app, database migrations) is not imported
    probe = (f"import runpy, sys\nsys.argv = ['flwr-clientapp', '--help']\n"
             f"try:\n    runpy.run_path({str(found)!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('supernode-cli-imported' if 'flwr.supernode.cli.flower_supernode' in sys.modules else 'light')")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--runtime-api-address" in done.stdout and "--token" in done.stdout
    assert done.stdout.strip().endswith("light"), done.stdout[-300:]


@pytest.mark.integration
def test_up_on_a_port_in_use_fails_in_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        failed = _cli(tmp_path, "up", "--prefect-port", str(port))

    assert failed.returncode == 1
    assert failed.stderr.strip().count("\n") == 0, failed.stderr
    assert f"port {port}" in failed.stderr and "in use" in failed.stderr
    assert "Traceback" not in failed.stderr
