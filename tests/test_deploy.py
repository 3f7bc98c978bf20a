"""Export, compression, measurement, storage and pricing of an arm's model, on tiny models trained here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from clients.data import central_test, load_dataset
from clients.export import to_raw
from clients.models import build_model
from flows.config import CompareConfig, DeploymentConfig
from flows.decision import CostModel
from flows.deployment import calibration_source, deploy_arm, deployment_data, price_deployment, serving_sentences
from infra.checkpoints import write_round
from infra.deployments import DeploymentError, load_variant, read_deployment, variant_key
from infra.store import open_store

REPO = Path(__file__).resolve().parents[1]
FAST = DeploymentConfig(latency_queries=20, warmup_queries=2, throughput_batches=3, calibration_examples=128)
DATA = {"scheme": "dirichlet", "seed": 0, "alpha": 0.5, "classes_per_node": 2, "central_test_fraction": 0.2,
        "local_test_fraction": 0.15}


def stored_arm(store, run_key: str, arm: str, model_name: str, dataset_name: str, *, train_examples: int = 600,
               epochs: int = 3, learning_rate: float = 0.01):
    """Train a zoo model briefly, store it as the arm's round 1 with its checkpoint.json; return (model, dataset)."""
    dataset = load_dataset(dataset_name)
    model = build_model(model_name, input_shape=dataset.input_shape, num_classes=dataset.num_classes, seed=0,
                        device="cpu")
    model.fit(dataset.subset(np.arange(train_examples)), epochs=epochs, batch_size=32, learning_rate=learning_rate,
              seed=0)
    meta = {"model": {"name": model_name, "args": {"input_shape": list(dataset.input_shape),
                                                   "num_classes": dataset.num_classes, "seed": 0, "private": False}},
            "privacy": None}
    write_round(store, run_key, arm, 1, model.get_arrays(), {"round": 1}, {"arm": arm}, meta=meta)
    return model, dataset


def deploy_stored(store, run_key: str, arm: str, dataset, *, private: bool = False) -> dict:
    """Run the flow's deploy step for a stored arm with fast measurement settings."""
    test, calibration = deployment_data(dataset, partition_ids=[0, 1, 2, 3], num_partitions=4, private=private,
                                        examples=FAST.calibration_examples, data_kwargs=DATA)
    return deploy_arm(store, run_key, arm, dataset=dataset, test=test, calibration_x=calibration,
                      calibration=calibration_source(private=private, pooled=True), settings=FAST)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A store with two deployed arms: the scikit-learn logreg on digits and the torch mlp on digits."""
    store = open_store(f"file://{tmp_path_factory.mktemp('store')}")
    models = {}
    for arm, name, rate in (("small", "logreg", 0.01), ("large", "mlp", 0.003)):
        model, dataset = stored_arm(store, "run-a", arm, name, "digits", learning_rate=rate)
        models[arm] = (model, dataset, deploy_stored(store, "run-a", arm, dataset))
    return store, models


@pytest.mark.parametrize("arm", ["small", "large"])
def test_every_variant_loads_in_a_plain_onnxruntime_session_and_gives_the_reported_accuracy(deployed, arm):
    store, models = deployed
    _, dataset, document = models[arm]
    test = central_test(dataset, central_test_fraction=0.2, seed=0)

    assert set(document["variants"]) == {"fp32", "int8", "fp16"}, document["skipped"]
    for name, entry in document["variants"].items():
        data, _ = load_variant(store, "run-a", arm, name)
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        probabilities = session.run(None, {"input": to_raw(test.x, dataset.name)})[0]

        assert probabilities.shape == (len(test), 10)
        assert float(np.mean(probabilities.argmax(1) == test.y)) == pytest.approx(entry["accuracy"])
        assert entry["bytes"] == len(data) and entry["latency_ms_p50"] > 0 and entry["throughput_per_s"] > 0
    assert document["variants"]["fp32"]["max_abs_diff"] < 1e-4  # the export computes what the framework does
    assert document["variants"]["fp32"]["accuracy"] == pytest.approx(document["framework_accuracy"])
    assert document["variants"]["fp32"]["accuracy"] > 0.8
    assert abs(document["variants"]["int8"]["accuracy"] - document["variants"]["fp32"]["accuracy"]) < 0.03


def test_deploy_json_describes_the_artifact_and_where_it_came_from(deployed):
    store, _ = deployed

    document = read_deployment(store, "run-a", "large")

    assert (document["model"], document["training_round"], document["opset"]) == ("mlp", 1, 17)
    assert document["input"] == {"name": "input", "shape": ["batch", 64], "example_shape": [64], "dtype": "float32",
                                 "raw_input_max": 16.0, "units": "raw values 0..16 (the graph divides by 16)"}
    assert "pooled training data" in document["calibration"]
    entry = document["variants"]["int8"]
    assert entry["key"] == variant_key("run-a", "large", "int8")
    assert len(entry["sha256"]) == 64 and entry["variant"] == "int8"


def test_a_corrupt_variant_is_refused_before_it_is_loaded(tmp_path):
    store = open_store(f"file://{tmp_path}")
    _, dataset = stored_arm(store, "run-b", "small", "logreg", "digits", epochs=1)
    deploy_stored(store, "run-b", "small", dataset)
    key = variant_key("run-b", "small", "fp32")
    data = bytearray(store.get_bytes(key))
    data[len(data) // 2] ^= 0xFF
    store.put_bytes(key, bytes(data))

    with pytest.raises(DeploymentError, match="corrupt: expected sha256"):
        load_variant(store, "run-b", "small", "fp32")
    with pytest.raises(DeploymentError, match="no deployment of arm 'large'"):
        load_variant(store, "run-b", "large", "fp32")


def test_an_image_model_takes_raw_pixels_and_a_private_arm_calibrates_on_the_central_test_set(tmp_path):
    store = open_store(f"file://{tmp_path}")
    model, dataset = stored_arm(store, "run-c", "large", "cnn-dp", "mnist", train_examples=400, epochs=2,
                                learning_rate=1e-3)

    document = deploy_stored(store, "run-c", "large", dataset, private=True)

    assert document["input"]["example_shape"] == [1, 28, 28] and document["input"]["raw_input_max"] == 255.0
    assert "central test set" in document["calibration"]
    assert document["variants"]["fp32"]["max_abs_diff"] < 1e-4
    assert {"fp32", "int8"} <= set(document["variants"])


def _document(throughput: dict[str, float], accuracy: dict[str, float]) -> dict:
    return {"variants": {v: {"bytes": 1000, "accuracy": accuracy[v], "max_abs_diff": 0.0, "latency_ms_p50": 1.0,
                             "latency_ms_p90": 1.0, "latency_ms_p99": 2.0, "throughput_per_s": throughput[v],
                             "load_seconds": 0.5, "peak_rss_mb": 1024.0} for v in throughput},
            "skipped": {}, "calibration": "x", "training_round": 5, "opset": 17}


def test_serving_is_priced_per_replica_hour_at_the_measured_throughput():
    cost = CostModel(serving_vcpu_hour_usd=0.04, serving_gb_hour_usd=0.01)
    settings = DeploymentConfig(predictions_per_month=1e6, months=10, threads=2, max_accuracy_drop=0.005)
    # a replica: 2 vCPUs at $0.04 plus 1 GB at $0.01 = $0.09 an hour; 1,000/s = 3.6M predictions an hour
    document = _document({"fp32": 1000.0, "int8": 2000.0, "fp16": 4000.0}, {"fp32": 0.95, "int8": 0.948, "fp16": 0.90})

    priced = price_deployment(document, training_usd=1.0, settings=settings, cost=cost)

    assert priced["variants"]["fp32"]["usd_per_million_predictions"] == pytest.approx(0.09 / 3.6)
    assert priced["variants"]["fp32"]["serving_usd"] == pytest.approx(10 * 0.09 / 3.6)
    assert priced["serving_variant"] == "int8"  # fp16 is cheaper but loses more than 0.005 accuracy
    assert priced["total_cost_usd"] == pytest.approx(1.0 + 10 * 0.09 / 7.2)
    always_on = price_deployment(document, training_usd=1.0, cost=cost,
                                 settings=settings.model_copy(update={"min_replicas": 1}))
    assert always_on["serving_usd"] == pytest.approx(0.09 * 730 * 10)


def _priced_arms(arms: dict[str, tuple[float, float]]) -> dict:
    """Return arms that reached the target for a training cost, served at a throughput (1M a month, 12 months)."""
    settings = DeploymentConfig(predictions_per_month=1e6, months=12)
    return {name: {"deployment": price_deployment(_document({"fp32": throughput}, {"fp32": 0.95}), training_usd=usd,
                                                  settings=settings, cost=CostModel()),
                   "time_to_target": {"reached": True, "usd": usd}}
            for name, (usd, throughput) in arms.items()}


def test_the_recommendation_names_the_serving_cost_and_the_volume_that_would_change_it():
    # the large model reached the target for less, but serves 50 times slower
    arms = _priced_arms({"large": (0.01, 1000.0), "small": (0.05, 50000.0)})
    large, small = (arms[n]["deployment"]["variants"]["fp32"]["usd_per_million_predictions"] for n in ("large", "small"))
    crossing = (0.05 - 0.01) / ((large - small) / 1e6 * 12)

    sentence, changes = serving_sentences(arms, {"choice": "large"})

    assert sentence.startswith("Serving it as fp32 (0.950 accuracy at 1.00 ms p50) costs $")
    assert "1M a month over 12 months" in sentence
    assert any(c.startswith("the small model (fp32,") and f"above {crossing / 1e3:.3g}k predictions a month" in c
               for c in changes), changes


def test_no_volume_changes_the_choice_when_it_is_cheaper_to_train_and_to_serve():
    arms = _priced_arms({"large": (0.10, 1000.0), "small": (0.02, 50000.0)})

    _, changes = serving_sentences(arms, {"choice": "small"})

    assert not any("predictions a month" in c for c in changes)


def test_the_report_shows_a_deployment_section_a_latency_plot_and_total_cost_in_markdown_and_html():
    from flows.export import to_html
    from flows.plots import report_plots
    from flows.report import build_report, render_markdown, summarize_arm
    from tests.test_report import _round

    arms = {}
    for arm, accuracy, throughput in (("large", 0.95, 1000.0), ("small", 0.92, 50000.0)):
        summary = summarize_arm(arm, [_round(1, accuracy)], nodes=[1], parameters=5, model_bytes=20, wall_seconds=1.0,
                                reference=None, target_accuracy=0.9)
        priced = price_deployment(_document({"fp32": throughput, "int8": 2 * throughput}, {"fp32": 0.95, "int8": 0.95}),
                                  training_usd=summary["total_usd"], settings=DeploymentConfig(), cost=CostModel())
        arms[arm] = {**summary, "deployment": priced, "serving_usd": priced["serving_usd"],
                     "total_cost_usd": priced["total_cost_usd"]}
    report = build_report(run_key="r", config=CompareConfig().model_dump(mode="json"), federation={"nodes": []},
                          arms=arms, target_accuracy=0.9, versions={})

    markdown, page = render_markdown(report), to_html(report)

    assert report["recommendation"]["choice"] == "small"  # same training cost, 50 times cheaper to serve
    assert "Serving it as int8" in report["recommendation"]["text"]
    assert "## Deployment" in markdown and "int8 (priced)" in markdown and "$ / M predictions" in markdown
    assert "<h2>Deployment</h2>" in page and "int8 (priced)" in page
    assert "deployment" in [name for name, _, png in report_plots(report) if png.startswith(b"\x89PNG")]


def test_compare_config_carries_the_deployment_settings_and_rejects_unknown_keys():
    config = CompareConfig.model_validate({"deployment": {"predictions_per_month": 5e6, "months": 6}})

    assert (config.deployment.predictions_per_month, config.deployment.months) == (5e6, 6)
    with pytest.raises(ValueError, match="predictions_a_month"):
        CompareConfig.model_validate({"deployment": {"predictions_a_month": 1}})


def test_export_and_measurement_import_no_flower_prefect_or_minio():
    code = ("import sys, clients.export, clients.inference, flows.deployment, infra.deployments\n"
            "print(sorted({n.split('.')[0] for n in sys.modules} & {'flwr', 'prefect', 'minio'}))\n")

    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "[]"
