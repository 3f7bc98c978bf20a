"""fedcompare's launchers of Flower's node-side commands, run as real processes: what they change and what they keep.

- `infra/flwr_bin/flwr-clientapp` through the node's clientapp forkserver (infra/_clientapp_fork.py),
  and in its own process when the forkserver is not there;
- `infra/flwr_bin/flower-supernode`'s idle wait;
- the shorter first retry of Flower's object pulls (infra/_flower_pulls.py).
"""

from __future__ import annotations

import json
import os
import runpy
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra._clientapp_fork import SOCKET_ENV
from infra._flower_pulls import shorten_pull_backoff
from infra.stack import FLWR_LAUNCHERS, SUPERNODE_POLL_ENV, StackSettings, services

CLIENTAPP = [sys.executable, str(FLWR_LAUNCHERS / "flwr-clientapp")]
CHECKOUT = Path(__file__).resolve().parents[1]
FALLBACK = "running Flower's module in this process"


@pytest.fixture
def forkserver(tmp_path):
    """A real clientapp forkserver on a socket in ``tmp_path``; stopped with SIGTERM afterwards."""
    socket_path = tmp_path / "node" / "clientapp.sock"
    process = subprocess.Popen([sys.executable, "-m", "infra._clientapp_fork", "--socket", str(socket_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not socket_path.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
        time.sleep(0.05)
    yield socket_path, process
    process.terminate()
    process.wait(timeout=10)


def _clientapp(*args: str, socket_path: Path | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != SOCKET_ENV}
    if socket_path is not None:
        env[SOCKET_ENV] = str(socket_path)
    return subprocess.run([*CLIENTAPP, *args], capture_output=True, text=True, env=env, timeout=60)


def test_a_forked_clientapp_answers_on_the_launchers_own_output_with_flowers_exit_code(forkserver):
    socket_path, _ = forkserver

    helped = _clientapp("--help", socket_path=socket_path)
    refused = _clientapp("--no-such-flag", socket_path=socket_path)

    assert helped.returncode == 0 and helped.stdout.startswith("usage: flwr-clientapp"), helped.stderr
    assert FALLBACK not in helped.stderr, "the forkserver ran it, not the launcher"
    assert refused.returncode == 2 and "--token" in refused.stderr and FALLBACK not in refused.stderr
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600


def test_without_its_forkserver_the_launcher_runs_flowers_module_itself_and_says_why(tmp_path, forkserver):
    missing = _clientapp("--help", socket_path=tmp_path / "nowhere.sock")
    unset = _clientapp("--help", socket_path=None)

    assert missing.returncode == 0 and missing.stdout.startswith("usage: flwr-clientapp")
    assert f"no clientapp forkserver at {tmp_path / 'nowhere.sock'}" in missing.stderr and FALLBACK in missing.stderr
    assert unset.returncode == 0 and unset.stdout.startswith("usage: flwr-clientapp") and unset.stderr == ""


def test_the_forkserver_removes_its_socket_when_stopped(forkserver):
    socket_path, process = forkserver

    process.terminate()
    process.wait(timeout=10)

    assert not socket_path.exists()
    assert FALLBACK in _clientapp("--help", socket_path=socket_path).stderr


def _path_after_release(pythonpath: str) -> list[str]:
    """Return sys.path in a fresh interpreter (cwd: the checkout, PYTHONPATH ``pythonpath``) after release_checkout()."""
    code = ("import json, sys; from infra._clientapp_fork import release_checkout; "
            "release_checkout(); print(json.dumps(sys.path)); "
            "print(json.dumps(sorted(n for n in sys.modules if n.split('.')[0] == 'infra')))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=CHECKOUT,
                          env=env)
    assert done.returncode == 0, done.stderr
    path, modules = (json.loads(line) for line in done.stdout.splitlines())
    assert modules == [], "the checkout's infra modules are forgotten"
    return path


def test_releasing_the_checkout_keeps_the_folders_the_clientapps_pythonpath_names():
    extra = str(CHECKOUT / "tests")

    plain = _path_after_release("")
    wanted = _path_after_release(os.pathsep.join([str(CHECKOUT), extra]))

    assert str(CHECKOUT) not in plain and "" not in plain
    assert wanted[:2] == [str(CHECKOUT), extra] and wanted.count(str(CHECKOUT)) == 1


def test_the_simulation_launcher_runs_flowers_command_with_the_one_pass_delivery():
    helped = subprocess.run([sys.executable, str(FLWR_LAUNCHERS / "flwr-simulation"), "--help"], capture_output=True,
                            text=True, timeout=120)
    code = ("from flwr.server.superlink.fleet.vce import vce_api; from infra._flower_simulation import "
            "deliver_in_one_pass as d; print(d(), d(), vce_api.add_messages_to_queue.fedcompare_one_pass)")
    patched = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=CHECKOUT)

    assert helped.returncode == 0 and "usage: flwr-simulation" in helped.stdout, helped.stderr
    assert "not the one fedcompare knows" not in helped.stderr, "Flower 1.41's engine is the one it patches"
    assert patched.stdout.split() == ["True", "True", "True"], patched.stderr


def test_the_supernode_launcher_shortens_only_flowers_idle_sleep(monkeypatch):
    import flwr.supernode.start_client_internal as loop

    launcher = runpy.run_path(str(FLWR_LAUNCHERS / "flower-supernode"), run_name="launcher")
    monkeypatch.setattr(loop, "time", time)  # restored after the test, whatever the launcher sets
    assert launcher["_set_idle_wait"](0.1), "Flower's loop no longer holds the one `time.sleep(3)` it patches"

    started = time.monotonic()
    loop.time.sleep(3)
    idle = time.monotonic() - started
    started = time.monotonic()
    loop.time.sleep(0.3)
    other = time.monotonic() - started

    assert idle < 1.0 and other >= 0.3, (idle, other)
    assert abs(loop.time.time() - time.time()) < 1, "the rest of `time` is the real module"


def test_a_bad_supernode_poll_is_one_line(tmp_path):
    shown = subprocess.run([sys.executable, str(FLWR_LAUNCHERS / "flower-supernode"), "--help"], capture_output=True,
                           text=True, env={**os.environ, SUPERNODE_POLL_ENV: "fast"}, timeout=60)

    assert shown.returncode == 1
    assert shown.stderr.strip() == (f"flower-supernode: {SUPERNODE_POLL_ENV}='fast': expected seconds in 0.05..60 "
                                    "(unset: Flower's 3)")


def test_flowers_object_pulls_retry_first_after_50_ms(monkeypatch):
    from flwr.supercore.inflatable import inflatable_utils

    for function in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        monkeypatch.setitem(function.__kwdefaults__, "initial_backoff", function.__kwdefaults__["initial_backoff"])
        assert function.__kwdefaults__["initial_backoff"] == 1, "Flower's own first retry is after 1 s"

    assert shorten_pull_backoff()

    assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == 0.05
    assert inflatable_utils.pull_and_inflate_object_from_tree.__kwdefaults__["initial_backoff"] == 0.05


def test_each_stack_node_gets_a_forkserver_and_the_launchers_with_warm_workers_only(tmp_path):
    warm = {s.name: s for s in services(StackSettings.create(tmp_path, gpu_nodes=1, cpu_nodes=1))}
    bare = {s.name: s for s in services(StackSettings.create(tmp_path, gpu_nodes=1, cpu_nodes=1, warm_workers=False))}

    for i in (0, 1):
        fork, node = warm[f"clientapp-fork-{i}"], warm[f"supernode-{i}"]
        assert fork.command[fork.command.index("--socket") + 1] == node.env[SOCKET_ENV] == fork.address
        assert fork.env["FLWR_HOME"] == node.env["FLWR_HOME"], "the forked ClientApps run in the node's environment"
        assert node.command[:2] == [sys.executable, str(FLWR_LAUNCHERS / "flower-supernode")]
        assert node.env[SUPERNODE_POLL_ENV] == "0.5"
        assert f"clientapp-fork-{i}" not in bare and SOCKET_ENV not in bare[f"supernode-{i}"].env
