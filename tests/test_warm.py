"""The node's warm worker (clients/_warm.py): a real supervisor process, its channel, restarts and the ledger."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest

from clients import _warm
from clients.data import load_dataset
from clients.models import build_model
from clients.node_tasks import Task, handle
from privacy.ledger import PrivacyLedger

ROOT = Path(__file__).resolve().parents[1]


def _run_config(**overrides: object) -> dict:
    """Return pyproject's run config with ``overrides`` (dashed keys)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return {**config, **overrides}


@pytest.fixture(scope="module")
def supervisor(tmp_path_factory: pytest.TempPathFactory):
    """Start a real warm-worker supervisor on a Unix socket; yield the socket path; always stop it."""
    socket = tmp_path_factory.mktemp("warm") / "worker.sock"
    log = open(socket.with_name("supervisor.log"), "wb")
    process = subprocess.Popen([sys.executable, "-m", "clients._warm", "--socket", str(socket)], cwd=ROOT,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 180
        while not socket.exists():
            assert process.poll() is None, socket.with_name("supervisor.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the warm worker did not listen within 180 s"
            time.sleep(0.2)
        yield socket
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        log.close()


def _train_request(run_config: dict, node_config: dict, *, message_id: str, epochs: int = 1,
                   batch_size: int = 16) -> dict:
    """Return a train task for the global model that ``run_config`` names, built here from its seed."""
    dataset = load_dataset(run_config["dataset"])
    model = build_model(run_config["model"], input_shape=dataset.input_shape, num_classes=dataset.num_classes,
                        seed=run_config["seed"], device="cpu")
    run_config = {**run_config, "local-epochs": epochs, "batch-size": batch_size, "learning-rate": 0.05}
    return {"kind": "train", "run_config": run_config, "node_config": node_config, "message_id": message_id,
            "arrays": model.get_arrays(), "config": {"server-round": 1}}


NODE = {"partition-id": 1, "num-partitions": 4, "tier": "cpu", "device": "cpu"}


def test_channel_files_are_private_and_a_wrong_key_is_refused(supervisor: Path, tmp_path: Path) -> None:
    assert stat.S_IMODE(_warm.key_path(supervisor).stat().st_mode) == 0o600
    assert stat.S_IMODE(supervisor.stat().st_mode) == 0o600
    wrong = tmp_path / "worker.sock"
    wrong.symlink_to(supervisor)
    _warm.key_path(wrong).write_bytes(b"x" * 32)

    with pytest.raises(_warm.WorkerUnavailable, match="no warm worker answers"):
        _warm.ask(wrong, {"kind": "query", "run_config": _run_config(), "node_config": NODE}, app_dir=ROOT,
                  timeout=30)
    with pytest.raises(_warm.WorkerUnavailable):
        _warm.ask(tmp_path / "nothing.sock", {}, app_dir=ROOT, timeout=30)


def test_the_worker_answers_like_the_client_process_and_keeps_warm(supervisor: Path) -> None:
    run_config = _run_config(dataset="digits", model="torch-logreg")
    request = _train_request(run_config, NODE, message_id="same-answer")

    query, _ = _warm.ask(supervisor, {"kind": "query", "run_config": run_config, "node_config": NODE},
                         app_dir=ROOT, timeout=60)
    warm, restarts = _warm.ask(supervisor, request, app_dir=ROOT, timeout=60)
    again_started = time.perf_counter()
    _warm.ask(supervisor, {**request, "message_id": "again"}, app_dir=ROOT, timeout=60)
    again_s = time.perf_counter() - again_started
    local = handle(Task(**request))
    local_query = handle(Task(kind="query", run_config=run_config, node_config=NODE))

    assert query["values"]["pid"] == int(_warm.pid_path(supervisor).read_text())  # the worker, not this process
    assert query["values"]["num-train"] == local_query.values["num-train"] > 0
    assert restarts == 0
    assert warm["arrays"].keys() == local.arrays.keys()
    for name, array in local.arrays.items():
        np.testing.assert_allclose(warm["arrays"][name], array, rtol=1e-5, atol=1e-6)
    assert warm["values"]["num-examples"] == local.values["num-examples"]
    assert again_s < 5.0, f"a warm torch-logreg message on digits took {again_s:.1f} s"  # a cold process: ~5-8 s


def test_a_failing_task_comes_back_named_and_the_worker_goes_on(supervisor: Path) -> None:
    bad = _run_config(dataset="digits", model="no-such-model")
    good = _run_config(dataset="digits", model="torch-logreg")

    with pytest.raises(_warm.WorkerFailed, match="no-such-model"):
        _warm.ask(supervisor, _train_request(good, NODE, message_id="bad") | {"run_config": bad}, app_dir=ROOT,
                  timeout=60)
    answer, restarts = _warm.ask(supervisor, {"kind": "query", "run_config": good, "node_config": NODE},
                                 app_dir=ROOT, timeout=60)

    assert restarts == 0 and answer["values"]["num-train"] > 0


def test_a_worker_killed_mid_round_is_restarted_and_the_dp_round_is_charged_once(
    supervisor: Path, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.json"
    run_config = _run_config(dataset="digits", model="torch-logreg", **{"privacy-mode": "sample-level",
                                                                       "run-key": "kill-test", "arm": "small"})
    node = {**NODE, "privacy-ledger": str(ledger)}
    request = _train_request(run_config, node, message_id="killed-once", epochs=30)
    answers: list = []
    asking = threading.Thread(target=lambda: answers.append(_warm.ask(supervisor, request, app_dir=ROOT,
                                                                      timeout=300)))

    asking.start()
    deadline = time.monotonic() + 120
    while not ledger.exists():  # charged: the worker is training now
        assert time.monotonic() < deadline, "the worker never charged the ledger"
        time.sleep(0.05)
    killed = int(_warm.pid_path(supervisor).read_text())
    os.kill(killed, signal.SIGKILL)
    asking.join(timeout=300)

    result, restarts = answers[0]
    entries = PrivacyLedger(ledger).entries()
    assert restarts == 1 and int(_warm.pid_path(supervisor).read_text()) != killed
    assert [e["message_id"] for e in entries] == ["killed-once"]  # one charge for the message, not one per try
    assert result["values"]["dp-epsilon"] > 0 and set(result["arrays"]) == set(request["arrays"])


def test_a_clientapp_that_goes_away_mid_message_frees_the_worker_at_once(supervisor: Path) -> None:
    import multiprocessing.connection

    run_config = _run_config(dataset="digits", model="torch-logreg")
    slow = _train_request(run_config, NODE, message_id="orphan", epochs=100, batch_size=1)  # ~30,000 steps
    before = int(_warm.pid_path(supervisor).read_text())
    conn = multiprocessing.connection.Client(str(supervisor), family="AF_UNIX",
                                             authkey=_warm.key_path(supervisor).read_bytes())
    conn.send({"app_dir": str(ROOT), "code_key": _warm.code_key(ROOT), "timeout": 600, "task": slow})

    time.sleep(1.0)  # the worker is training now
    conn.close()  # the ClientApp's SuperNode was killed
    started = time.perf_counter()
    answer, _ = _warm.ask(supervisor, {"kind": "query", "run_config": run_config, "node_config": NODE},
                          app_dir=ROOT, timeout=60)
    waited = time.perf_counter() - started

    assert int(_warm.pid_path(supervisor).read_text()) != before, "the busy worker was replaced"
    assert answer["values"]["num-train"] > 0 and waited < 30, f"the next message waited {waited:.1f} s"
