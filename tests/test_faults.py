"""Fault tests: real processes die, nodes misbehave, checkpoints rot and the S3 store goes away.

One local stack (`fedcompare up` on free ports, three nodes) whose checkpoint store is a real
S3-compatible server (moto_server) reached through a TCP proxy on 127.0.0.1 — the proxy is
the fault injector that takes the store away and brings it back. Every run trains the
digits data (tabular: the large arm is the MLP) for a few rounds so that the whole module
stays within a few minutes; three nodes instead of the default four save a quarter of the
ClientApp processes (seconds of CPU each) and still leave two healthy nodes beside a faulty one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli.federation import _start_warm_worker
from infra.checkpoints import load_round, read_manifest, report_key
from infra.stack import flower_path, warm_worker_socket
from infra.store import open_store
from tests.s3server import free_port, running_s3_server
from tests.tcpproxy import TcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.faults]
REPO = Path(__file__).resolve().parents[1]  # holds tests/faults_mod.py, the faulty nodes' client mod
FEDCOMPARE = str(Path(sys.executable).parent / "fedcompare")
FLOWER_SUPERNODE = str(Path(sys.executable).parent / "flower-supernode")
BUCKET = "fedcompare-faults"
RETRY_S = 30  # how long the stack's S3 clients keep retrying an unreachable store (the default)
# small, fast runs: digits (64 features) on the MLP and logistic regression
BASE = {"data": {"dataset": "digits"}, "target_accuracy": 0.5}
NODES = 3  # the stack's: one gpu-tier and two cpu-tier SuperNodes, partitions 0-2
VICTIM = NODES - 1  # the partition of the node the killed-node test kills


@pytest.fixture(scope="module")
def s3():
    """A moto_server behind a stoppable TCP proxy; yields the proxy."""
    with running_s3_server() as endpoint:
        port = int(endpoint.rsplit(":", 1)[1])
        with TcpProxy("127.0.0.1", port) as proxy:
            yield proxy


def _env(proxy: TcpProxy) -> dict[str, str]:
    """Return the environment of the stack and the CLI: the S3 store behind the proxy."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FEDCOMPARE_", "AWS_"))}
    return {**env, "COLUMNS": "200", "FEDCOMPARE_STORE": f"s3://{BUCKET}", "FEDCOMPARE_S3_ENDPOINT": proxy.endpoint,
            "FEDCOMPARE_S3_ACCESS_KEY": "testing", "FEDCOMPARE_S3_SECRET_KEY": "testing",
            "FEDCOMPARE_S3_RETRY_SECONDS": str(RETRY_S)}


def _cli(state: Path, proxy: TcpProxy, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run `fedcompare --state-dir state args…` against the S3 store and return what it printed."""
    return subprocess.run([FEDCOMPARE, "--state-dir", str(state), *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(proxy))


def _start_demo(state: Path, proxy: TcpProxy, config: dict) -> tuple[subprocess.Popen, str]:
    """Start `fedcompare demo --config …` in the background; return it and its flow-run id."""
    demo = subprocess.Popen([FEDCOMPARE, "--state-dir", str(state), "demo", "--config", json.dumps(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(proxy))
    for line in demo.stdout:
        if match := re.search(r"/runs/flow-run/([0-9a-f-]{36})", line):
            return demo, match.group(1)
    demo.wait(timeout=30)
    raise AssertionError(f"fedcompare demo printed no flow-run address (exit {demo.returncode})")


def _finish(demo: subprocess.Popen, timeout: float = 900) -> str:
    """Wait for a background demo and return the rest of its output."""
    try:
        output, _ = demo.communicate(timeout=timeout)
    finally:
        demo.kill()
    return output


def _store(proxy: TcpProxy):
    """Open the stack's S3 store from the test process."""
    saved = dict(os.environ)
    try:
        os.environ.update({k: v for k, v in _env(proxy).items() if k.startswith("FEDCOMPARE_")})
        return open_store(f"s3://{BUCKET}")
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _wait_for_round(store, run_key: str, arm: str, round: int, timeout: float = 300) -> None:
    """Wait until ``arm`` of ``run_key`` has stored ``round``."""
    deadline = time.monotonic() + timeout
    while (read_manifest(store, run_key, arm) or {}).get("latest_complete_round", 0) < round:
        assert time.monotonic() < deadline, f"the {arm} arm stored no round {round} within {timeout:.0f} s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, s3):
    """A running local stack on free ports whose store is the S3 server; always stopped afterwards."""
    state = tmp_path_factory.mktemp("fault-stack")
    ports = ["--prefect-port", str(free_port()), "--superlink-port", str(free_port()),
             "--node-base-port", str(free_port()), "--gpu-nodes", "1", "--cpu-nodes", "2"]
    try:
        started = _cli(state, s3, "up", *ports)
        assert started.returncode == 0, started.stdout + started.stderr
        yield state
    finally:
        s3.start()
        stopped = _cli(state, s3, "down", timeout=120)
        assert stopped.returncode == 0, stopped.stderr


def _settings(state: Path) -> dict:
    """Return the stack's stack.json."""
    return json.loads((state / "stack.json").read_text())


def _extra_node(state: Path, name: str, partition: int, fault: str) -> list[subprocess.Popen]:
    """Start one more SuperNode, with a deliberate ``fault``, and its warm worker, each in its own process group.

    The node is what `fedcompare node start` runs (a SuperNode on fedcompare's PATH, a warm worker
    beside it) plus the test-only client mod `tests/faults_mod.py`, installed through node config
    ``client-mods`` with this repository on the SuperNode's PYTHONPATH (Flower passes the SuperNode's
    environment on to each ClientApp process). The mod applies the fault to the worker's honest reply.
    """
    settings = _settings(state)
    home = state / "flwr" / name
    home.mkdir(parents=True, exist_ok=True)
    socket = warm_worker_socket(home)
    node_config = (f'partition-id={partition} num-partitions={NODES} tier="cpu" fault="{fault}" '
                   f'worker-socket="{socket}" client-mods="tests.faults_mod:fault_mod"')
    env = {**os.environ, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1", "PATH": flower_path()}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))  # the ClientApp imports tests.faults_mod
    worker = _start_warm_worker(socket, env)  # logs to worker.log beside its socket
    log_path = state / "logs" / f"{name}.log"
    start = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as log:  # the child keeps its own descriptor
        node = subprocess.Popen(
            [FLOWER_SUPERNODE, "--insecure", "--superlink", f"127.0.0.1:{settings['superlink_port']}",
             "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", node_config],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
    try:
        _wait_for_registration(log_path, start, node)
    except BaseException:
        for process in (node, worker):
            _kill_group(process)
        raise
    return [node, worker]


def _wait_for_registration(log_path: Path, start: int, node: subprocess.Popen, timeout: float = 90) -> None:
    """Wait until the SuperNode logging to ``log_path`` (from byte ``start``) has its node id from the SuperLink."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path, "rb") as log:
            log.seek(start)
            if b"SuperNode ID:" in log.read():
                return
        assert node.poll() is None, f"the extra SuperNode exited with {node.returncode}; see {log_path}"
        time.sleep(0.2)
    raise AssertionError(f"the extra SuperNode did not register within {timeout:.0f} s; see {log_path}")


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL a process group started with start_new_session (a SuperNode and its superexec child)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def _partition_of(report: dict) -> dict[int, int]:
    """Return node id -> partition id of the nodes that answered the run's query."""
    return {n["node_id"]: n["partition-id"] for n in report["federation"]["nodes"]}


def test_bad_updates_are_rejected_and_the_run_completes(stack, s3):
    extras: dict[str, list[subprocess.Popen]] = {}
    try:
        for i, fault in enumerate(("nan", "shape", "huge")):
            extras[fault] = _extra_node(stack, f"faulty-{fault}", i, fault)  # returns once the node has registered
        config = {**BASE, "rounds": 1,
                  "large": {"model": "auto", "learning_rate": 1e-3, "max_update_norm": 1000.0},
                  "small": {"model": "logreg", "learning_rate": 0.01, "max_update_norm": 1000.0}}
        demo, run_id = _start_demo(stack, s3, config)
        output = _finish(demo)
    finally:
        for processes in extras.values():
            for process in processes:
                _kill_group(process)

    assert demo.returncode == 0, output[-3000:]
    report = _store(s3).get_json(report_key(run_id))
    faulty = {n["node_id"]: n["fault"] for n in report["federation"]["nodes"] if n.get("fault")}
    assert sorted(faulty.values()) == ["huge", "nan", "shape"], report["federation"]["nodes"]
    for arm in ("large", "small"):
        rejected = {(d["round"], d["node_id"]): d["reason"] for d in report["arms"][arm]["dropped"]
                    if d["reason"].startswith("rejected:")}
        assert set(rejected) == {(1, node) for node in faulty}, report["arms"][arm]["dropped"]
        for (_, node), reason in rejected.items():
            expected = {"nan": "NaN", "shape": "shape", "huge": "norm"}[faulty[node]]
            assert expected in reason, reason
        assert report["arms"][arm]["final_accuracy"] > 0.5, "the healthy nodes still trained a useful model"


def test_a_killed_node_is_left_out_and_rejoins_after_a_restart(stack, s3):
    # long enough for healthy nodes on a loaded 2-core host (each serves both arms in turn); the killed
    # node is dropped when the SuperLink marks it unavailable (two missed 30 s heartbeats) or at the timeout
    timeout = {"round_timeout_s": 90.0}
    config = {**BASE, "rounds": 3, "large": {"model": "auto", "learning_rate": 1e-3, **timeout},
              "small": {"model": "logreg", "learning_rate": 0.01, **timeout}}
    store = _store(s3)
    demo, run_id = _start_demo(stack, s3, config)
    try:
        _wait_for_round(store, run_id, "large", 1)
        os.killpg(int((stack / "pids" / f"supernode-{VICTIM}.pid").read_text()), signal.SIGKILL)  # mid-round 2
        restarted = _cli(stack, s3, "up")  # starts the dead node again; it joins under a new node id
        assert restarted.returncode == 0, restarted.stderr
        output = _finish(demo)
    finally:
        demo.kill()

    assert demo.returncode == 0, output[-3000:]
    report = store.get_json(report_key(run_id))
    first = _partition_of(report)
    victim = next(node for node, partition in first.items() if partition == VICTIM)
    large = report["arms"]["large"]
    assert large["rounds"] == 3 and report["arms"]["small"]["rounds"] == 3, "both arms completed"
    round_2 = {n["node_id"] for n in load_round(store, run_id, "large", 2)[1]["nodes"] if n["train"]}
    assert round_2 == set(first) - {victim}, "round 2 went on with the other nodes"
    assert any(d["round"] == 2 and d["node_id"] == victim and d["phase"] == "train" for d in large["dropped"]), \
        large["dropped"]
    round_3 = {n["node_id"] for n in load_round(store, run_id, "large", 3)[1]["nodes"] if n["train"]}
    rejoined = round_3 - set(first)
    assert len(round_3) == NODES and len(rejoined) == 1, "the restarted node trained round 3 under its new id"
    assert not any(d["round"] == 3 for d in large["dropped"]), large["dropped"]


@pytest.fixture(scope="module")
def outage_run(stack, s3) -> tuple[str, dict, str, str]:
    """Run 2 rounds while the store goes away for a while mid-run; return run key, config, output, final sha256.

    An outage the clients ride out changes no byte of training, so this run's final large
    model is also the uninterrupted reference of the SuperLink test.
    """
    config = {**BASE, "rounds": 2}
    store = _store(s3)
    demo, run_id = _start_demo(stack, s3, config)
    try:
        _wait_for_round(store, run_id, "large", 1)
        s3.stop()  # long enough for round 2's writes to meet the outage, shorter than the clients' retries
        time.sleep(RETRY_S - 8)
        s3.start()
        output = _finish(demo)
    finally:
        s3.start()
        demo.kill()
    assert demo.returncode == 0, output[-3000:]
    manifest = read_manifest(store, run_id, "large")
    final = manifest["rounds"][str(manifest["latest_complete_round"])]["objects"]
    return run_id, config, output, final[f"runs/{run_id}/large/round-0002/model.npz"]["sha256"]


def test_s3_outage_of_a_few_seconds_is_ridden_out_and_a_corrupt_round_is_retrained(stack, s3, outage_run):
    run_id, config, _, original = outage_run
    store = _store(s3)
    manifest = read_manifest(store, run_id, "large")
    assert manifest["latest_complete_round"] == 2
    model_key = f"runs/{run_id}/large/round-0002/model.npz"

    # flip one byte of the final model: the resumed run must detect it and retrain round 2
    data = bytearray(store.get_bytes(model_key))
    data[len(data) // 2] ^= 0xFF
    store.put_bytes(model_key, bytes(data))
    resumed = _cli(stack, s3, "demo", "--config", json.dumps({**config, "resume_from": run_id}))

    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:]
    manifest = read_manifest(store, run_id, "large")
    assert manifest["latest_complete_round"] == 2
    assert manifest["rounds"]["2"]["objects"][model_key]["sha256"] == original, "retraining gave the same model"
    assert any(d["round"] == 2 and "corrupt" in d["reason"] for d in manifest["discarded"]), manifest["discarded"]


def test_a_killed_superlink_comes_back_and_the_retry_resumes_to_the_same_model(stack, s3, outage_run):
    _, config, _, uninterrupted = outage_run
    store = _store(s3)
    demo, run_id = _start_demo(stack, s3, config)
    try:
        _wait_for_round(store, run_id, "large", 1)
        # kill -9 the SuperLink's whole process group: the SuperLink, its SuperExec and the arms' ServerApps
        os.killpg(int((stack / "pids" / "superlink.pid").read_text()), signal.SIGKILL)
        time.sleep(2)
        restarted = _cli(stack, s3, "up")  # what a supervisor does; the SuperLink's database keeps its nodes
        assert restarted.returncode == 0, restarted.stderr
        output = _finish(demo)
    finally:
        demo.kill()

    assert demo.returncode == 0, output[-3000:]
    report = store.get_json(report_key(run_id))
    assert report["arms"]["small"]["rounds"] == 2 and report["arms"]["large"]["rounds"] == 2, "both arms completed"
    resumed = [r["round"] for r in report["arms"]["large"]["per_round"] if r["resumed_after_round"]]
    assert resumed and resumed[0] >= 2, "the report marks the rounds run after the resume"
    manifest = read_manifest(store, run_id, "large")
    final = manifest["rounds"]["2"]["objects"][f"runs/{run_id}/large/round-0002/model.npz"]["sha256"]
    assert final == uninterrupted, "the resumed final model differs from the uninterrupted one"


def test_a_store_that_stays_away_fails_the_arm_naming_the_endpoint(stack, s3):
    config = {**BASE, "rounds": 2, "arm_retries": 0}
    store = _store(s3)
    demo, run_id = _start_demo(stack, s3, config)
    try:
        _wait_for_round(store, run_id, "large", 1)
        s3.stop()
        output = _finish(demo, timeout=600)
    finally:
        s3.start()
        demo.kill()

    assert demo.returncode == 1
    assert "flow run ended FAILED" in output, output[-3000:]
    assert s3.endpoint in output, output[-3000:]
    manifest = read_manifest(store, run_id, "large")
    assert manifest["latest_complete_round"] < 2, "nothing is recorded as complete that was not written"
