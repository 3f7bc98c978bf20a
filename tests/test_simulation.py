"""The engine "simulation": the flow and the apps over 100 virtual nodes of Flower's Simulation Engine on Ray.

The flow runs under Prefect's test harness in a fresh process (it starts its own simulation
SuperLink, which starts Ray); the privacy runs are submitted straight to a simulation SuperLink,
as the flow submits an arm. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from clients.data import central_test, load_dataset
from clients.models import build_model
from flows.config import CompareConfig
from flows.flower import run_status
from flows.following import submit
from flows.simulation import federation_config
from infra.checkpoints import load_latest, load_round, read_manifest, report_key, round_metrics
from infra.simulation import simulation_superlink
from infra.store import open_store
from tests.accounting import independent_epsilon

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
NODES, ROUNDS = 100, 2
CONFIG = {"engine": "simulation", "rounds": ROUNDS, "data": {"dataset": "mnist"},
          "simulation": {"num_nodes": NODES}, "deployment": {"enabled": False}}

_FLOW = textwrap.dedent("""
    import asyncio, json, sys
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.testing.utilities import prefect_test_harness
    from flows.compare import federated_compare
    from flows.config import CompareConfig

    async def read(flow_run_id):
        async with get_client() as client:
            run = await client.read_flow_run(flow_run_id)
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
            return run.state.type.value, {a.key: a.data for a in found if a.key}

    with prefect_test_harness(server_startup_timeout=120):
        state = federated_compare(CompareConfig.model_validate_json(sys.argv[1]), return_state=True)
        result = state.result()
        flow_state, artifacts = asyncio.run(read(state.state_details.flow_run_id))
    print("RESULT " + json.dumps({"run_key": result["run_key"], "state": flow_state, "artifacts": artifacts}))
""")


def _env(state: Path) -> dict[str, str]:
    """Return this process's environment without stack settings, with ``state`` as fedcompare's state dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FEDCOMPARE_"))}
    return {**env, "FEDCOMPARE_STATE_DIR": str(state), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


@pytest.fixture(scope="module")
def simulated_flow(tmp_path_factory):
    """The federated-compare flow with engine "simulation": 100 virtual nodes, 2 rounds, MNIST, both arms."""
    state, store = tmp_path_factory.mktemp("sim-state"), tmp_path_factory.mktemp("sim-store")
    config = {**CONFIG, "store_uri": str(store)}
    done = subprocess.run([sys.executable, "-c", _FLOW, json.dumps(config)], capture_output=True, text=True,
                          env=_env(state), cwd=ROOT, timeout=900)
    print(done.stderr[-6000:])  # the flow's log: shown by pytest -s and on failure
    found = re.search(r"^RESULT (.+)$", done.stdout, re.M)
    assert done.returncode == 0 and found, (done.stdout + done.stderr)[-6000:]
    return state, open_store(f"file://{store}"), json.loads(found.group(1))


def test_the_simulated_flow_completes_with_report_and_progress_artifacts(simulated_flow):
    state, _, result = simulated_flow
    artifacts = result["artifacts"]

    assert result["state"] == "COMPLETED"
    assert {"federated-compare-report", "federated-compare-summary", "progress-large", "progress-small",
            "federation-nodes"} <= set(artifacts)
    assert float(artifacts["progress-large"]) == float(artifacts["progress-small"]) == 100.0
    report = artifacts["federated-compare-report"]
    assert "## Virtual nodes (Flower's Simulation Engine)" in report and f"on {NODES} virtual nodes" in report
    assert "## Nodes" not in report, "no table with a row per virtual node"
    tiers = json.loads(artifacts["federation-nodes"])
    assert sum(row["virtual nodes"] for row in tiers) == NODES and len(tiers) == 2  # gpu share 0.5: both tiers
    # the simulation SuperLink the flow started is gone with every process under it
    log = next((state / "simulation").glob("superlink-*.log"))
    port = int(log.stem.split("-")[1])
    assert subprocess.run(["ss", "-ltn", f"sport = :{port}"], capture_output=True, text=True).stdout.count(
        "LISTEN") == 0


def test_every_round_is_checkpointed_with_its_seeded_sample_and_the_report_matches_the_checkpoint(simulated_flow):
    _, store, result = simulated_flow
    run_key = result["run_key"]
    report = store.get_json(report_key(run_key))
    dataset = load_dataset("mnist")
    test = central_test(dataset, central_test_fraction=0.2, seed=0)
    samples = {}

    for arm in ("large", "small"):
        assert read_manifest(store, run_key, arm)["latest_complete_round"] == ROUNDS
        for number in range(1, ROUNDS + 1):
            _, metrics = load_round(store, run_key, arm, number)  # verifies every sha256
            trained = metrics["virtual_nodes"]["train"]
            # 10% of 100 virtual nodes, each a distinct partition, each reply from the node holding it
            assert len(trained) == len(set(trained)) == 10 and all(0 <= p < NODES for p in trained)
            assert metrics["virtual_nodes"]["available"] == NODES
            assert sorted(int(n["train"]["partition-id"]) for n in metrics["nodes"] if n["train"]) == trained
            samples[arm, number] = trained
        _, final, _ = load_latest(store, run_key, arm)
        summary = report["arms"][arm]
        model = build_model(summary["model"], input_shape=dataset.input_shape, num_classes=dataset.num_classes,
                            seed=0, device="cpu")
        model.set_arrays(final)
        assert model.evaluate(test, batch_size=256)["accuracy"] == pytest.approx(summary["final_accuracy"], abs=1e-9)
        assert summary["reference"]["accuracy"] > 0.5
        assert len(summary["nodes"]) == NODES
        # the final round's node evaluation: 10% of the virtual nodes, from their local test splits
        assert len(round_metrics(store, run_key, arm)[-1]["virtual_nodes"]["evaluate"]) == 10

    # seeded by partition: both arms train the same virtual nodes in a round, another sample the next round
    assert samples["large", 1] == samples["small", 1] and samples["large", 2] == samples["small", 2]
    assert samples["large", 1] != samples["large", 2]
    virtual = report["federation"]["virtual"]
    assert virtual["nodes"] == NODES and virtual["gpu_nodes"] == 50 and "nodes" not in report["federation"]
    assert virtual["train_examples"][0] >= 1


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    """A simulation SuperLink for the runs the tests below submit as the flow submits an arm."""
    with simulation_superlink(tmp_path_factory.mktemp("sim-superlink")) as address:
        yield address


def _run_arm(superlink: str, store_uri: str, config: dict, arm: str, model: str) -> str:
    """Submit arm ``arm`` of ``config`` (engine simulation) as the flow does, wait for it; return its run key."""
    compare = CompareConfig.model_validate({**CONFIG, **config})
    run_key = f"sim-{uuid.uuid4().hex[:8]}"
    spec = compare.run_spec(arm.split("-")[0], arm=arm, model=model, run_key=run_key, store_uri=store_uri, nodes=[],
                            epsilon=compare.privacy.target_epsilon)
    run_id = submit(spec, superlink, simulation=federation_config(compare))
    deadline = time.monotonic() + 600
    listening: set[str] = set()
    while not (status := run_status(run_id, superlink)).finished and time.monotonic() < deadline:
        listening |= _listening_under(superlink)
        time.sleep(1)
    assert status.completed, status
    # the SuperLink, its flwr-simulation and Ray's GCS, raylet and workers: loopback only
    assert listening and all(host in ("127.0.0.1", "::ffff:127.0.0.1") for host in listening), listening
    return run_key


def _listening_under(superlink: str) -> set[str]:
    """Return the addresses that the SuperLink at ``superlink`` and every process under it listen on."""
    import psutil

    port = int(superlink.rsplit(":", 1)[1])
    owner = next(c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
                 and c.status == psutil.CONN_LISTEN)
    root = psutil.Process(owner)
    hosts = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            hosts |= {c.laddr.ip for c in proc.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            pass
    return hosts


def test_sample_level_dp_charges_each_virtual_node_for_the_rounds_it_was_sampled_in_its_store_ledger(
        superlink, tmp_path):
    store = open_store(f"file://{tmp_path}")
    config = {"rounds": 3, "data": {"dataset": "digits"}, "small": {"model": "torch-logreg", "local_epochs": 1},
              "privacy": {"mode": "sample-level", "target_epsilon": 8.0, "arms": "small"},
              "simulation": {"num_nodes": 20, "fraction_train": 0.25}}
    run_key = _run_arm(superlink, store.uri, config, "small-eps8", "torch-logreg")

    rounds = round_metrics(store, run_key, "small-eps8")
    sampled: dict[int, int] = {}
    for metrics in rounds:
        assert len(metrics["virtual_nodes"]["train"]) == 5  # a quarter of 20
        for partition in metrics["virtual_nodes"]["train"]:
            sampled[partition] = sampled.get(partition, 0) + 1
        for node in metrics["privacy"]["nodes"].values():
            recomputed = independent_epsilon([[node["noise_multiplier"], node["sample_rate"], node["steps"]]] *
                                             sampled_before(rounds, metrics, node), 1e-5, "rdp")
            assert recomputed == pytest.approx(node["epsilon"], rel=0.01)
    ledgers = {int(key.rsplit("partition-", 1)[1].removesuffix(".json")): store.get_json(key)
               for key in store.list_keys("privacy-ledgers/")}
    # one ledger per virtual node that trained, one entry per round it was sampled in; none for the others
    assert {p: len(ledger["entries"]) for p, ledger in ledgers.items()} == sampled
    assert all(entry["run_key"] == run_key for ledger in ledgers.values() for entry in ledger["entries"])
    assert len(sampled) < 20, "some virtual nodes were never sampled in 3 rounds of 5 of 20"


def sampled_before(rounds: list[dict], metrics: dict, node: dict) -> int:
    """Return how many rounds up to ``metrics``'s the virtual node of privacy entry ``node`` trained in."""
    partition = node["partition_id"]
    return sum(partition in r["virtual_nodes"]["train"] for r in rounds if r["round"] <= metrics["round"])


def test_client_level_dp_accounts_with_the_sampled_share_of_the_virtual_nodes(superlink, tmp_path):
    store = open_store(f"file://{tmp_path}")
    config = {"rounds": 2, "data": {"dataset": "digits"},
              "privacy": {"mode": "client-level", "target_epsilon": 8.0, "arms": "small"},
              "simulation": {"num_nodes": 40, "fraction_train": 0.25}}
    run_key = _run_arm(superlink, store.uri, config, "small-eps8", "logreg")

    last = round_metrics(store, run_key, "small-eps8")[-1]["privacy"]
    assert [h[1] for h in last["history"]] == [0.25, 0.25], "the accountant's q is the sampled share"
    assert last["num_nodes"] == 40
    assert independent_epsilon(last["history"], 1e-5, "rdp") == pytest.approx(last["epsilon"], rel=0.01)
    assert last["epsilon"] <= 8.0 + 0.01
    # with q = 0.25 the planned noise is lower than if every node trained every round
    from privacy.accounting import plan_client_level
    everyone = plan_client_level(num_nodes=40, sampled_nodes=40, rounds=2, clipping_norm=1.0, target_epsilon=8.0,
                                 delta=1e-5, accountant="rdp")
    assert last["noise_multiplier"] < everyone.noise_multiplier
    assert np.isfinite(last["epsilon"])
