"""`fedcompare serve` as a real process on a free port, called with a real HTTP client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from clients.data import central_test
from infra.deployments import load_variant, variant_key
from infra.store import open_store
from tests.test_deploy import deploy_stored, stored_arm

FEDCOMPARE = str(Path(sys.executable).parent / "fedcompare")
RUN = "run-serve"


def _free_port() -> int:
    """Return a TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(store_uri: str, *args: str) -> subprocess.Popen:
    """Start `fedcompare serve` in its own process group."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDCOMPARE_")}
    return subprocess.Popen([FEDCOMPARE, "serve", *args, "--store", store_uri, "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The int8 variant of an image model (torch-logreg on MNIST) served on a free port; always stopped."""
    uri = f"file://{tmp_path_factory.mktemp('store')}"
    store = open_store(uri)
    _, dataset = stored_arm(store, RUN, "large", "torch-logreg", "mnist", train_examples=800, learning_rate=3e-3)
    deploy_stored(store, RUN, "large", dataset)
    port = _free_port()
    process = _serve(uri, "latest", "--arm", "large", "--variant", "int8", "--host", "127.0.0.1", "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"fedcompare serve exited {process.returncode}: {process.stdout.read()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("fedcompare serve did not answer /health within 90 s")
            time.sleep(0.3)
        yield {"url": url, "store": store, "uri": uri, "dataset": dataset}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _known_examples(served, count: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Return raw central-test images (pixels 0..255) and the classes the stored int8 graph gives them."""
    test = central_test(served["dataset"], central_test_fraction=0.2, seed=0)
    raw = np.rint(test.x[:count] * 255.0).astype(np.float32)
    data, _ = load_variant(served["store"], RUN, "large", "int8")
    expected = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"input": raw})[0].argmax(1)
    return raw, expected


def test_predict_answers_the_classes_of_known_images_in_every_layout(served):
    raw, expected = _known_examples(served)
    test = central_test(served["dataset"], central_test_fraction=0.2, seed=0)

    for layout in (raw, raw[:, 0], raw.reshape(len(raw), -1)):  # (1, 28, 28), (28, 28) and flat rows
        answer = httpx.post(f"{served['url']}/predict", json={"inputs": layout.astype(int).tolist()}, timeout=30)

        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["classes"] == expected.tolist()
        assert np.allclose(np.sum(body["probabilities"], axis=1), 1.0, atol=1e-4)
    assert np.mean(expected == test.y[: len(expected)]) >= 0.6  # and they are mostly right


@pytest.mark.parametrize("body, reason", [
    (b"not json", "not JSON"),
    (json.dumps({"rows": [[0] * 784]}).encode(), 'one key "inputs"'),
    (json.dumps({"inputs": []}).encode(), "non-empty list"),
    (json.dumps({"inputs": [[0] * 10]}).encode(), "each example must have shape [1, 28, 28]"),
    (json.dumps({"inputs": [[0] * 784, [0] * 783]}).encode(), "ragged"),
    (json.dumps({"inputs": [["a"] * 784]}).encode(), "non-numbers"),
    (b'{"inputs": [[NaN]]}', "finite numbers"),
    (json.dumps({"inputs": [[0] * 784] * 1025}).encode(), "at most 1024"),
])
def test_a_bad_payload_gets_422_with_a_one_line_reason_and_the_server_keeps_serving(served, body, reason):
    answer = httpx.post(f"{served['url']}/predict", content=body, headers={"content-type": "application/json"},
                        timeout=30)

    assert answer.status_code == 422
    detail = answer.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and reason in detail, detail
    assert httpx.get(f"{served['url']}/health", timeout=5).json() == {"status": "ok"}
    assert httpx.post(f"{served['url']}/predict", json={"inputs": [[0] * 784]}, timeout=30).status_code == 200


def test_metadata_describes_the_served_model(served):
    metadata = httpx.get(f"{served['url']}/metadata", timeout=5).json()

    assert (metadata["model"], metadata["variant"], metadata["run_key"], metadata["arm"]) == \
        ("torch-logreg", "int8", RUN, "large")
    assert metadata["input"]["example_shape"] == [1, 28, 28] and metadata["input"]["raw_input_max"] == 255.0
    assert 0.0 < metadata["accuracy"] <= 1.0 and metadata["training_round"] == 1


def test_serve_refuses_a_corrupt_artifact_in_one_line(served):
    key = variant_key(RUN, "large", "fp16")
    data = bytearray(served["store"].get_bytes(key))
    data[-10] ^= 0xFF
    served["store"].put_bytes(key, bytes(data))

    process = _serve(served["uri"], RUN, "--arm", "large", "--variant", "fp16", "--port", str(_free_port()))
    output, _ = process.communicate(timeout=60)

    assert process.returncode == 1
    assert output.strip().count("\n") == 0 and "corrupt: expected sha256" in output, output


def test_a_table_model_takes_raw_rows_by_column_name_encoded_as_in_training(tmp_path):
    from clients.data import load_dataset, pooled_train
    from clients.models import build_model
    from clients.preprocess import apply_spec, build_spec, local_stats, merge_stats
    from flows.deployment import calibration_source, deploy_arm, deployment_data
    from infra.checkpoints import write_round
    from tests.test_deploy import DATA, FAST
    from tests.test_preprocess import write_wine

    # Arrange: gnb on the unscaled wine table with a category and empty cells, deployed with its spec
    raw = load_dataset(str(write_wine(tmp_path / "wine.csv", categorical=True, missing=0.05)))
    spec = build_spec(merge_stats([local_stats(pooled_train(raw, num_partitions=4, **DATA))]))
    ready = apply_spec(spec, raw)
    model = build_model("gnb", input_shape=ready.input_shape, num_classes=ready.num_classes, seed=0)
    model.fit(ready, epochs=1, batch_size=32, learning_rate=0.01, seed=0)
    uri = f"file://{tmp_path / 'store'}"
    store = open_store(uri)
    meta = {"model": {"name": "gnb", "args": {"input_shape": list(ready.input_shape), "num_classes": 3}}, "privacy": None}
    write_round(store, "run-table", "small", 1, model.get_arrays(), {"round": 1}, {"arm": "small"}, meta=meta)
    test, calibration = deployment_data(ready, partition_ids=[0, 1, 2, 3], num_partitions=4, private=False,
                                        examples=64, data_kwargs=DATA)
    deploy_arm(store, "run-table", "small", dataset=ready, test=test, calibration_x=calibration,
               calibration=calibration_source(private=False, pooled=True), settings=FAST, preprocessing=spec)
    rows = [{name: (None if cell == "" else cell if name == "cellar" else float(cell))
             for name, cell in zip(raw.columns, line)} for line in raw.cells[:12]]
    port = _free_port()
    process = _serve(uri, "run-table", "--arm", "small", "--variant", "fp32", "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "fedcompare serve did not answer /health within 90 s"
            time.sleep(0.3)
        # Act
        answer = httpx.post(f"{url}/predict", json={"rows": rows}, timeout=30)
        wrong = httpx.post(f"{url}/predict", json={"rows": [{**rows[0], "vintage": 1999}]}, timeout=30)
        again = httpx.post(f"{url}/predict", json={"rows": rows[:1]}, timeout=30)
        schema = httpx.get(f"{url}/metadata", timeout=10).json()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)

    # Assert: the served classes are the framework's on the same rows, encoded by the same spec
    assert answer.status_code == 200, answer.text
    assert answer.json()["classes"] == model.predict(ready.x[:12]).tolist()
    assert wrong.status_code == 422 and "column(s) vintage that the model does not take" in wrong.json()["detail"]
    assert again.status_code == 200, "a refused request leaves the server serving"
    assert schema["input"]["preprocessing"] == spec
