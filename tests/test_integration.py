"""End to end: `fedcompare up` a real local stack on free ports, run the deployment, check everything.

Starts a real Prefect server, work pool, worker and deployment, a Flower SuperLink and
four SuperNodes, and runs `federated-compare/local` through the CLI a user would use
(`fedcompare demo`): the default configuration (both arms on all four nodes) for 2 rounds,
and the `by-tier` assignment (large on the gpu-tier nodes, small on the cpu-tier ones) for 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clients.data import central_test, load_dataset
from clients.models import build_model
from flows.config import CompareConfig
from infra.checkpoints import load_latest, load_round, read_manifest, report_key
from infra.store import open_store

pytestmark = pytest.mark.integration
FEDCOMPARE = str(Path(sys.executable).parent / "fedcompare")
ROUNDS = 2


def _free_port() -> int:
    """Return a TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _free_block(size: int) -> int:
    """Return the first port of `size` consecutive free ports."""
    for _ in range(50):
        base = _free_port()
        if base + size < 65535 and all(_bindable(base + i) for i in range(size)):
            return base
    raise RuntimeError("found no block of free ports")


def _bindable(port: int) -> bool:
    """Return whether `port` can be bound on 127.0.0.1."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _cli(state: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `fedcompare --state-dir state args…` and return what it printed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FEDCOMPARE_"))}
    return subprocess.run([FEDCOMPARE, "--state-dir", str(state), *args], capture_output=True, text=True,
                          timeout=timeout, env={**env, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A running local stack on free ports; always stopped afterwards."""
    state = tmp_path_factory.mktemp("stack")
    ports = ["--prefect-port", str(_free_port()), "--superlink-port", str(_free_port()),
             "--node-base-port", str(_free_block(4))]
    try:
        started = _cli(state, "up", *ports)
        assert started.returncode == 0, started.stdout + started.stderr
        yield state
    finally:
        stopped = _cli(state, "down", timeout=120)
        assert stopped.returncode == 0, stopped.stderr


def _demo(state: Path, *args: str) -> tuple[Path, str, str]:
    """Run `fedcompare demo args…`; return (state dir, flow run id, output)."""
    done = _cli(state, "demo", *args, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_id = re.search(r"/runs/flow-run/([0-9a-f-]{36})", done.stdout).group(1)
    return state, run_id, done.stdout


@pytest.fixture(scope="module")
def demo_run(stack):
    """The default configuration for 2 rounds."""
    return _demo(stack, "--rounds", str(ROUNDS))


@pytest.fixture(scope="module")
def by_tier_run(stack):
    """The by-tier assignment for 1 round."""
    return _demo(stack, "--rounds", "1", "--config", '{"assignment": "by-tier"}')


def _prefect(state: Path, coroutine_fn):
    """Run `coroutine_fn(client)` against the stack's Prefect server."""
    from prefect.client.orchestration import PrefectClient

    settings = json.loads((state / "stack.json").read_text())

    async def call():
        async with PrefectClient(api=f"http://127.0.0.1:{settings['prefect_port']}/api") as client:
            return await coroutine_fn(client)

    return asyncio.run(call())


def test_status_shows_every_part_running(stack):
    shown = _cli(stack, "status")

    assert shown.returncode == 0, shown.stdout
    for part in ("prefect-server", "prefect-worker", "superlink", "supernode-0", "supernode-3"):
        assert re.search(rf"{part}\s.*running", shown.stdout), shown.stdout


def test_up_twice_is_idempotent(stack):
    before = (stack / "pids" / "superlink.pid").read_text()

    again = _cli(stack, "up")

    assert again.returncode == 0, again.stderr
    assert (stack / "pids" / "superlink.pid").read_text() == before


def test_demo_prints_the_ui_address_and_the_summary(demo_run):
    _, run_id, output = demo_run

    assert f"/runs/flow-run/{run_id}" in output
    assert "final accuracy" in output and "large" in output and "small" in output


def test_flow_run_completed_with_report_and_progress_artifacts(demo_run):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    state, run_id, _ = demo_run

    async def read(client):
        flow_run = await client.read_flow_run(run_id)
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
        )
        return flow_run, artifacts

    flow_run, artifacts = _prefect(state, read)

    assert flow_run.state.type.value == "COMPLETED"
    by_key = {a.key: a for a in artifacts if a.key}
    assert {"federated-compare-report", "federated-compare-summary", "progress-large", "progress-small"} <= set(by_key)
    assert "## Summary" in by_key["federated-compare-report"].data
    assert float(by_key["progress-large"].data) == 100.0
    assert float(by_key["progress-small"].data) == 100.0


def test_store_holds_every_round_of_both_arms_and_the_report_matches_the_checkpoint(demo_run):
    state, run_id, _ = demo_run
    store = open_store(f"file://{state}/store")
    report = store.get_json(report_key(run_id))
    config = CompareConfig.model_validate(report["config"])
    dataset = load_dataset(config.data.dataset)
    test = central_test(dataset, central_test_fraction=config.data.central_test_fraction, seed=config.seed)

    for arm in ("large", "small"):
        manifest = read_manifest(store, run_id, arm)
        assert manifest["latest_complete_round"] == ROUNDS
        for number in range(1, ROUNDS + 1):
            arrays, metrics = load_round(store, run_id, arm, number)  # verifies every sha256
            assert metrics["round"] == number and len(metrics["nodes"]) == 4
            model_bytes = sum(a.nbytes for a in arrays.values())
            # every node got the global model and sent its update, serialized: at least the raw arrays
            assert all(n["bytes"]["down"] >= model_bytes and n["bytes"]["up"] >= model_bytes for n in metrics["nodes"])
            assert metrics["bytes_down"] == sum(n["bytes"]["down"] for n in metrics["nodes"])
        _, final, _ = load_latest(store, run_id, arm)
        summary = report["arms"][arm]
        model = build_model(summary["model"], input_shape=dataset.input_shape,
                            num_classes=dataset.num_classes, seed=0, device="cpu")
        model.set_arrays(final)

        accuracy = model.evaluate(test, batch_size=256)["accuracy"]

        assert accuracy == pytest.approx(summary["final_accuracy"], abs=1e-9)
        assert summary["reference"]["accuracy"] > 0.5
        assert summary["parameters"] == sum(a.size for a in final.values())
    assert report["arms"]["large"]["parameters"] >= 1_000_000
    assert report["arms"]["large"]["nodes"] == report["arms"]["small"]["nodes"]  # all-nodes


def test_by_tier_trains_large_on_gpu_nodes_and_small_on_cpu_nodes(by_tier_run):
    state, run_id, _ = by_tier_run
    store = open_store(f"file://{state}/store")
    report = store.get_json(report_key(run_id))
    tiers = {node["node_id"]: node["tier"] for node in report["federation"]["nodes"]}

    assert report["config"]["assignment"] == "by-tier"
    for arm, tier in (("large", "gpu"), ("small", "cpu")):
        nodes = report["arms"][arm]["nodes"]
        assert len(nodes) == 2 and {tiers[n] for n in nodes} == {tier}
        _, metrics = load_round(store, run_id, arm, 1)
        assert sorted(n["node_id"] for n in metrics["nodes"]) == sorted(nodes)


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


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium with the flags this closed network needs."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1400,2600", "--virtual-time-budget=20000"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium package (`apt-get install chromium`; .ci/run installs it)"
)
def test_prefect_ui_shows_the_report_and_its_plots_in_a_real_browser(demo_run, tmp_path):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    state, run_id, _ = demo_run
    port = json.loads((state / "stack.json").read_text())["prefect_port"]

    async def read(client):
        return await client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]), key=ArtifactFilterKey(any_=["federated-compare-report"])
        ))

    (artifact,) = _prefect(state, read)
    url = f"http://127.0.0.1:{port}/artifacts/artifact/{artifact.id}"
    shots = Path(os.environ.get("FEDCOMPARE_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / ".test-artifacts"))
    shots.mkdir(parents=True, exist_ok=True)
    screenshot = shots / "prefect-ui-report.png"
    screenshot.unlink(missing_ok=True)

    dom = _chromium("--dump-dom", url, profile=tmp_path / "dom")
    shot = _chromium(f"--screenshot={screenshot}", url, profile=tmp_path / "shot")

    report = open_store(f"file://{state}/store").get_json(report_key(run_id))
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "federated-compare report" in dom.stdout
    assert report["recommendation"]["text"].split(":")[0] in dom.stdout
    images = re.findall(r'<img[^>]+src="(data:image/png;base64,[^"]+)"', dom.stdout)
    assert len(images) == 2, "both plots are rendered as images in the artifact page"
    assert shot.returncode == 0 and screenshot.stat().st_size > 20_000, shot.stderr[-2000:]
    print(f"screenshot of the report in the Prefect UI: {screenshot}")


def _descendants(root: int) -> list[tuple[int, str]]:
    """Return (pid, command line) of every live process below ``root``."""
    children: dict[int, list[int]] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append((child, commands.get(child, "")))
            todo.append(child)
    return found


def test_killed_serverapp_is_retried_and_resumes_to_the_same_model(stack):
    config = '{"rounds": 2, "data": {"dataset": "digits"}, "target_accuracy": 0.5}'
    _, reference_id, _ = _demo(stack, "--config", config)
    store = open_store(f"file://{stack}/store")
    superlink = int((stack / "pids" / "superlink.pid").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FEDCOMPARE_"))}
    demo = subprocess.Popen([FEDCOMPARE, "--state-dir", str(stack), "demo", "--config", config],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        run_id = next(match.group(1) for line in demo.stdout
                      if (match := re.search(r"/runs/flow-run/([0-9a-f-]{36})", line)))
        deadline = time.monotonic() + 300
        while not (read_manifest(store, run_id, "large") or {}).get("latest_complete_round"):
            assert time.monotonic() < deadline, "the large arm stored no round within 300 s"
            time.sleep(0.5)
        killed = [pid for pid, command in _descendants(superlink) if "flwr-serverapp" in command]
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        output, _ = demo.communicate(timeout=900)
    finally:
        demo.kill()

    assert killed, "a ServerApp was running when the first round was stored"
    assert demo.returncode == 0, output[-3000:]
    report = store.get_json(report_key(run_id))
    resumed = [r["round"] for r in report["arms"]["large"]["per_round"] if r["resumed_after_round"]]
    assert resumed and resumed[0] >= 2, "the report marks the rounds run after the resume"
    for arm in ("large", "small"):
        final = {run: read_manifest(store, run, arm) for run in (reference_id, run_id)}
        sha = {run: m["rounds"]["2"]["objects"][f"runs/{run}/{arm}/round-0002/model.npz"]["sha256"]
               for run, m in final.items()}
        assert sha[run_id] == sha[reference_id], f"{arm}: the resumed final model differs from the uninterrupted one"
