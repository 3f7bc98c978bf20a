"""End to end: `fedcompare up` a real local stack on free ports, run the deployment, check everything.

Starts a real Prefect server, work pool, worker and deployment, a Flower SuperLink and
four SuperNodes, and runs `federated-compare/local` through the CLI a user would use
(`fedcompare demo`): the default configuration (both arms on all four nodes) for 1 round,
and the `by-tier` assignment (large on the gpu-tier nodes, small on the cpu-tier ones) for 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from clients.data import central_test, load_dataset
from clients.models import build_model
from flows.following import wait_for as _wait_for
from flows.config import CompareConfig
from flows.flower import APP_DIR, build_fab, run_log, source_run_config, submit_run
from infra.checkpoints import load_latest, load_round, read_checkpoint, read_manifest, report_key, round_metrics
from infra.stack import StackSettings
from infra.store import open_store
from tests.accounting import independent_epsilon
from tests.integration_stack import (  # noqa: F401 (fixtures are used by name)
    CHROMIUM, FEDCOMPARE, ROUNDS, SPENT_EARLIER, _chromium, _cli, _descendants, _node_id, _prefect, client_level_run, colour_run, demo_run, private_by_tier_run, stack, table_run,
)

pytestmark = pytest.mark.integration


def test_status_shows_every_part_running(stack):
    shown = _cli(stack, "status")

    assert shown.returncode == 0, shown.stdout
    for part in ("prefect-server", "prefect-worker", "superlink", "supernode-0", "supernode-3", "clientapp-fork-0",
                 "clientapp-fork-3"):
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
    assert "## Deployment" in by_key["federated-compare-report"].data
    assert float(by_key["progress-large"].data) == 100.0
    assert float(by_key["progress-small"].data) == 100.0


def test_run_status_asked_in_process_is_what_flwr_ls_says(demo_run):
    from flows.flower import _call, _ls_in_process, build_fab, run_status

    state, run_id, _ = demo_run
    superlink = f"127.0.0.1:{json.loads((state / 'stack.json').read_text())['superlink_port']}"
    report = open_store(f"file://{state}/store").get_json(report_key(run_id))

    for arm in ("large", "small"):
        flower_run = int(report["arms"][arm]["flower_run_id"])
        fast, cli = _ls_in_process(flower_run, superlink), _call(["ls", "--run-id", str(flower_run)], superlink)
        assert fast["runs"][0]["status"] == cli["runs"][0]["status"] == "finished:completed"
        assert {k: v for k, v in fast["runs"][0].items() if k != "elapsed"} == \
            {k: v for k, v in cli["runs"][0].items() if k != "elapsed"}, "the same fields and values as the CLI's"
        assert run_status(flower_run, superlink).completed
        # the arms were submitted in-process, with the FAB `flwr run` builds (tests/test_federation.py)
        assert cli["runs"][0]["fab-hash"] == hashlib.sha256(build_fab()).hexdigest()


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
        # the flow ran from this checkout: its commit, not null (the ServerApp itself runs from the FAB)
        assert manifest["versions"]["git_commit"] == source_run_config()["git-commit"] != ""
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


def test_report_json_prices_and_measures_every_arm_and_the_stored_onnx_gives_its_accuracy(demo_run):
    import onnxruntime as ort

    from clients.export import to_raw
    from infra.deployments import load_variant

    state, run_id, _ = demo_run
    store = open_store(f"file://{state}/store")
    report = store.get_json(report_key(run_id))
    dataset = load_dataset("mnist")
    test = central_test(dataset, central_test_fraction=0.2, seed=0)
    figures = {"bytes", "accuracy", "latency_ms_p50", "latency_ms_p99", "throughput_per_s", "peak_rss_mb",
               "usd_per_million_predictions"}

    for arm in ("large", "small"):
        deployment = report["arms"][arm]["deployment"]
        assert {"fp32", "int8", "fp16"} == set(deployment["variants"]), deployment["skipped"]
        for name, variant in deployment["variants"].items():
            assert figures <= set(variant) and all(variant[k] > 0 for k in figures), (arm, name, variant)
        assert deployment["variants"]["fp32"]["max_abs_diff"] < 1e-4
        assert deployment["total_cost_usd"] == pytest.approx(report["arms"][arm]["total_usd"] + deployment["serving_usd"])
        assert report["arms"][arm]["total_cost_usd"] == deployment["total_cost_usd"]
        data, _ = load_variant(store, run_id, arm, "int8")  # verifies its sha256 against deploy.json
        probabilities = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(
            None, {"input": to_raw(test.x, "mnist")})[0]
        assert float((probabilities.argmax(1) == test.y).mean()) == pytest.approx(deployment["variants"]["int8"]["accuracy"])
    assert "per million predictions" in report["recommendation"]["text"]
    assert store.exists(f"runs/{run_id}/plots/deployment.png")


def test_by_tier_trains_large_on_gpu_nodes_and_small_on_cpu_nodes(private_by_tier_run):
    state, run_id, _ = private_by_tier_run
    store = open_store(f"file://{state}/store")
    report = store.get_json(report_key(run_id))
    tiers = {node["node_id"]: node["tier"] for node in report["federation"]["nodes"]}
    spent = _node_id(report, 0)

    assert report["config"]["assignment"] == "by-tier"
    for arm, tier in (("large-eps8", "gpu"), ("small-eps8", "cpu")):
        nodes = report["arms"][arm]["nodes"]
        assert len(nodes) == 2 and {tiers[n] for n in nodes} == {tier}
        for server_round in (1, 2):
            _, metrics = load_round(store, run_id, arm, server_round)
            trained = sorted(n["node_id"] for n in metrics["nodes"] if n["train"])
            assert trained == sorted(set(nodes) - {spent})


def test_private_arms_stay_within_the_target_and_epsilon_recomputes_from_the_report(private_by_tier_run):
    state, run_id, _ = private_by_tier_run
    report = open_store(f"file://{state}/store").get_json(report_key(run_id))

    for arm in ("large-eps8", "small-eps8"):
        privacy = report["arms"][arm]["privacy"]
        assert privacy["mode"] == "sample-level" and privacy["within_target"]
        assert len(privacy["nodes"]) == (1 if arm.startswith("large") else 2)
        for node in privacy["nodes"].values():
            assert len(node["history"]) == 2, "one accountant entry per trained round"
            assert 0 < node["epsilon"] <= 8.0
            recomputed = independent_epsilon(node["history"], privacy["delta"], privacy["accountant"])
            assert recomputed == pytest.approx(node["epsilon"], rel=0.01)
        reference = report["arms"][arm]["reference"]
        assert reference["privacy"]["mode"] == "sample-level" and reference["privacy"]["epsilon"] <= 8.0
        assert privacy["epsilon"] == max(n["epsilon"] for n in privacy["nodes"].values())


def test_a_node_whose_budget_is_spent_sits_out_and_the_report_says_so(private_by_tier_run):
    state, run_id, _ = private_by_tier_run
    report = open_store(f"file://{state}/store").get_json(report_key(run_id))
    spent = _node_id(report, 0)

    refused = report["arms"]["large-eps8"]["privacy"]["refused"]
    assert [(r["round"], r["node_id"]) for r in refused] == [(1, spent), (2, spent)]
    assert all("above its budget 50.0" in r["reason"] for r in refused)
    assert report["arms"]["large-eps8"]["rounds"] == 2, "the rounds went on with the other node"
    ledger = json.loads((state / "nodes" / "node-0" / "privacy-ledger.json").read_text())
    assert ledger["entries"] == [SPENT_EARLIER], "a refused round charges nothing"
    trained = json.loads((state / "nodes" / "node-1" / "privacy-ledger.json").read_text())["entries"]
    assert [(e["run_key"], e["arm"], e["round"]) for e in trained] == [(run_id, "large-eps8", 1),
                                                                         (run_id, "large-eps8", 2)]


def test_an_unreachable_privacy_target_fails_before_anything_trains(stack):
    config = {"rounds": 2, "data": {"dataset": "digits"}, "small": {"model": "torch-logreg", "learning_rate": 0.05},
              "privacy": {"mode": "sample-level", "delta": 0.05}}
    done = _cli(stack, "demo", "--config", json.dumps(config), timeout=300)

    assert done.returncode == 1
    assert re.search(r"privacy \(large-eps8 arm, ε=8\): privacy.delta=0.05 is above 1/\d+ \(the training examples "
                     r"of node \d+\); set privacy.delta to at most", done.stdout), done.stdout[-2000:]
    run_id = re.search(r"/runs/flow-run/([0-9a-f-]{36})", done.stdout).group(1)
    assert sorted(p.name for p in (stack / "store" / "runs" / run_id).iterdir()) == ["federation.json"]


def test_client_level_dp_of_the_scikit_learn_model_completes_and_reports_epsilon(client_level_run):
    state, run_id, output = client_level_run
    report = open_store(f"file://{state}/store").get_json(report_key(run_id))

    assert set(report["arms"]) == {"large", "small-eps8"} and report["arms"]["large"]["privacy"] is None
    small = report["arms"]["small-eps8"]
    privacy = small["privacy"]
    assert small["model"] == "logreg" and privacy["mode"] == "client-level"
    assert [h[1:] for h in privacy["history"]] == [[1.0, 1], [1.0, 1]], "all 4 nodes, one release per round"
    assert 0 < privacy["epsilon"] <= 8.0 and privacy["within_target"]
    assert independent_epsilon(privacy["history"], privacy["delta"], "rdp") == pytest.approx(privacy["epsilon"],
                                                                                            rel=0.01)
    assert report["recommendation"]["choice"] in (None, "small-eps8"), "only a private arm may be recommended"
    assert "DP ε spent" in output


def test_an_unscaled_table_with_categories_and_empty_cells_trains_like_its_central_reference(table_run):
    from clients.preprocess import spec_digest

    state, run_id, _ = table_run
    store = open_store(f"file://{state}/store")
    report = store.get_json(report_key(run_id))
    spec = report["federation"]["preprocessing"]

    # one spec from the 4 nodes' statistics: standardized numbers, one-hot categories, filled cells
    assert spec["source"] == "federated" and spec["nodes"] == 4
    kinds = {c["name"]: c["kind"] for c in spec["columns"]}
    assert kinds["cellar"] == "categorical" and kinds["proline"] == "numeric" and len(kinds) == 14
    assert sum(c["missing"] for c in spec["columns"]) > 0
    assert not any("preprocessing-stats" in n for n in report["federation"]["nodes"]), "only the sums are kept"
    for arm in ("large", "small", "nb"):
        s = report["arms"][arm]
        # the same model trained centrally on the standardized pooled data is the yardstick
        assert s["final_accuracy"] >= s["reference"]["accuracy"] - 0.02, (arm, s["final_accuracy"], s["reference"])
        # every node applied the same spec in every round, and the checkpoint holds it
        digests = {n["train"]["preprocessing-digest"] for m in round_metrics(store, run_id, arm) for n in m["nodes"]}
        assert digests == {float(spec_digest(spec))}, arm
        checkpoint = store.get_json(f"runs/{run_id}/{arm}/round-0003/checkpoint.json")
        assert json.loads(checkpoint["config"]["preprocessing"]) == spec
    # the extra arm ran like the others, and naive Bayes federated through its statistics is the central one exactly
    nb = report["arms"]["nb"]
    assert (nb["kind"], nb["base"], nb["model"]) == ("small", "nb", "gnb")
    assert nb["final_accuracy"] == pytest.approx(nb["reference"]["accuracy"], abs=1e-9), nb
    assert {"large", "small", "nb"} <= set(report["arms"]) and report["recommendation"]["text"]


def test_an_rgb_image_folder_of_mixed_sizes_trains_with_its_three_channels_and_distils_the_small_arm(colour_run):
    state, run_id, _ = colour_run
    store = open_store(f"file://{state}/store")
    report = store.get_json(report_key(run_id))

    for arm, model in (("large", "cnn"), ("small", "logreg")):
        checkpoint = store.get_json(f"runs/{run_id}/{arm}/round-0001/checkpoint.json")
        assert checkpoint["model"]["name"] == model
        assert checkpoint["model"]["args"]["input_shape"] == [3, 24, 24], "three channels, resized to image_size"
        assert 0.0 <= report["arms"][arm]["final_accuracy"] <= 1.0
    assert report["federation"]["preprocessing"] is None, "images need no statistics"
    # the distilled arm: the small model, taught by the large arm's final model, sent with its training messages
    distilled = report["arms"]["small-distilled"]
    assert (distilled["kind"], distilled["model"], distilled["distilled_from"]) == ("small", "logreg", "large")
    config = store.get_json(f"runs/{run_id}/small-distilled/round-0001/checkpoint.json")["config"]
    assert (config["teacher-arm"], config["teacher-model"]) == ("large", "cnn")
    (small_round,), (distilled_round,) = round_metrics(store, run_id, "small"), round_metrics(store, run_id,
                                                                                               "small-distilled")
    assert distilled_round["bytes_down"] > small_round["bytes_down"] + 4 * 1_000_000, "the teacher's 1.3M weights"
    assert 0.0 <= distilled["final_accuracy"] <= 1.0 and distilled["reference"]["accuracy"] > 0
    assert sum(n["num-train"] + n["num-test"] for n in report["federation"]["nodes"]) == 96  # 120 less the 20%


def test_checkpoints_name_the_submitting_checkouts_commit_or_say_why_there_is_none(stack, tmp_path):
    # Arrange: the same app twice, from this git checkout and from a copy that is not one
    superlink = StackSettings.load(stack).superlink
    store = open_store(f"file://{stack}/store")
    copy = tmp_path / "app"
    for top in ("server", "clients", "privacy", "infra"):
        shutil.copytree(APP_DIR / top, copy / top, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", ".gitignore"):
        shutil.copy2(APP_DIR / name, copy / name)
    config = CompareConfig(rounds=1, data={"dataset": "digits"}, deployment={"enabled": False})
    # Act: one round of the small arm from each, submitted as the flow submits an arm
    for run_key, app in (("provenance-checkout", APP_DIR), ("provenance-copy", copy)):
        run_config = {**config.run_spec("small", arm="small", model="logreg", run_key=run_key, store_uri=store.uri,
                                        nodes=[]).to_run_config(), **source_run_config(app)}
        run_id = submit_run(run_config, superlink, app=app)
        assert _wait_for(run_id, superlink, 600).completed, run_log(run_id, superlink)
    # Assert
    checkout = read_checkpoint(store, "provenance-checkout", "small", 1)["code"]
    copied = read_checkpoint(store, "provenance-copy", "small", 1)["code"]
    if shutil.which("git"):
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=APP_DIR).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               cwd=APP_DIR).stdout.strip() != ""
        assert (checkout["git_commit"], checkout["git_dirty"]) == (head, dirty)
    assert checkout["fab_hash"] == hashlib.sha256(build_fab(APP_DIR)).hexdigest()
    assert "git_commit_reason" not in checkout
    assert (copied["git_commit"], copied["git_dirty"]) == (None, None)
    assert copied["fab_hash"] == hashlib.sha256(build_fab(copy)).hexdigest()
    assert copied["git_commit_reason"].startswith("not a git checkout: "), copied
    assert copied["git_commit_reason"].endswith("and the run's submitter named no commit (the code runs from the "
                                                "unpacked FAB recorded as fab_hash)"), copied


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
    assert len(images) == 3, "the accuracy, cost and deployment plots are rendered as images in the artifact page"
    summary = dom.stdout.split("Summary", 1)[-1].split("<h2", 1)[0]
    shown = re.sub(r"<[^>]+>", " ", summary)  # what a reader sees: tag attributes hold ids and hashes such as 3e-2
    assert not re.search(r"\d\.?\d*e[-+]\d", shown), "no exponent notation in the summary"
    widest = max(len(re.findall(r"<th\b", table)) for table in re.findall(r"<table.*?</table>", dom.stdout, re.S))
    assert widest <= 11, f"a table of {widest} columns does not fit 1,200 px"
    assert not re.search(r"<th[^>]*>\s*\d{15,}\s*</th>", dom.stdout), "tables are headed by node names, not ids"
    assert shot.returncode == 0 and screenshot.stat().st_size > 20_000, shot.stderr[-2000:]
    print(f"screenshot of the report in the Prefect UI: {screenshot}")


def test_killed_serverapp_is_retried_and_resumes_to_the_same_model(stack, client_level_run):
    # The uninterrupted reference is the client-level run: its large arm trains without DP on the
    # same data, seed and rounds (its small arm's noise is fresh on every run, so it is not compared).
    _, reference_id, _ = client_level_run
    config = '{"rounds": 2, "data": {"dataset": "digits"}, "target_accuracy": 0.5}'
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
    final = {run: read_manifest(store, run, "large") for run in (reference_id, run_id)}
    sha = {run: m["rounds"]["2"]["objects"][f"runs/{run}/large/round-0002/model.npz"]["sha256"]
           for run, m in final.items()}
    assert sha[run_id] == sha[reference_id], "the resumed final model differs from the uninterrupted one"
    assert read_manifest(store, run_id, "small")["latest_complete_round"] == 2, "the small arm resumed and finished"
