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
