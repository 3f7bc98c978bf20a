"""Serve one stored ONNX variant of an arm over HTTP (FastAPI + uvicorn, onnxruntime on the CPU).

``POST /predict`` takes ``{"inputs": [...]}``: a list of examples, each a flat row of
numbers (tabular data, or an image flattened) or an image as nested lists
((C, H, W), or (H, W) for one channel), in the raw units deploy.json's input schema
names (MNIST pixels 0–255: the scaling is inside the graph). It answers
``{"classes": [...], "probabilities": [[...], ...]}``. A model trained on a table with a
preprocessing spec also takes ``{"rows": [{"column": value, ...}, ...]}``: raw rows by
column name (text categories, empty cells as null), which the ``encode_rows`` the caller
gives (the CLI: ``clients.preprocess.encode_rows`` with deploy.json's spec) turns into the
model's features. A body that is not JSON, not that
shape, not numbers, not finite, or too large gets 422 with a one-line ``detail``; the
server keeps serving. ``GET /health`` and ``GET /metadata`` (model, variant, run key,
accuracy, input schema) answer always. The variant's bytes are checked against the sha256
in deploy.json before onnxruntime sees them (``infra.deployments.load_variant``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request  # module level: FastAPI reads the endpoints' annotations from here
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from infra.deployments import load_variant

MAX_ROWS = 1024  # examples per request
MAX_BODY_BYTES = 32 * 1024 * 1024  # a request body larger than this is refused before parsing


class PayloadError(ValueError):
    """A request body the model cannot take; the message is the one-line reason a client gets."""


@dataclass
class LoadedModel:
    """A verified variant in an onnxruntime session, and what it takes."""

    session: Any
    document: dict[str, Any]  # deploy.json
    variant: str
    input_shape: tuple[int, ...]  # one example's shape
    encode_rows: Callable[[list[Any]], np.ndarray] | None = None  # raw rows -> features (a table's spec); raises ValueError

    def metadata(self) -> dict[str, Any]:
        """Return what GET /metadata answers."""
        entry = self.document["variants"][self.variant]
        return {
            "model": self.document["model"], "variant": self.variant, "run_key": self.document["run_key"],
            "arm": self.document["arm"], "training_round": self.document["training_round"],
            "accuracy": entry.get("accuracy"), "sha256": entry["sha256"], "bytes": entry["bytes"],
            "opset": self.document["opset"], "input": self.document["input"], "output": self.document["output"],
            "max_rows": MAX_ROWS,
        }


def load(store, run_key: str, arm: str, variant: str, *, threads: int = 0) -> LoadedModel:
    """Verify and load ``variant`` of ``arm`` in run ``run_key`` into an onnxruntime CPU session.

    Raises:
        DeploymentError: no such deployment or variant, or its bytes fail their sha256.
    """
    import onnxruntime as ort

    data, document = load_variant(store, run_key, arm, variant)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return LoadedModel(session, document, variant, tuple(document["input"]["example_shape"]))


def parse_inputs(body: bytes, input_shape: tuple[int, ...],
                 encode_rows: Callable[[list[Any]], np.ndarray] | None = None) -> np.ndarray:
    """Return the request's examples as a float32 batch of ``input_shape``; raise PayloadError saying what is wrong.

    ``encode_rows``: turns the raw rows of a ``{"rows": [...]}`` body into features (None: only "inputs").
    """
    if len(body) > MAX_BODY_BYTES:
        raise PayloadError(f"request body is {len(body)} bytes, at most {MAX_BODY_BYTES} are accepted: "
                           f"send at most {MAX_ROWS} examples per request")
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"body is not JSON ({exc.__class__.__name__}): send {{\"inputs\": [example, ...]}}") \
            from None
    keys = ("inputs", "rows") if encode_rows else ("inputs",)
    if not isinstance(payload, dict) or len(payload) != 1 or next(iter(payload)) not in keys:
        wanted = 'one key "inputs" (a list of examples)' + (' or "rows" (raw rows by column name)' if encode_rows else "")
        raise PayloadError(f"expected a JSON object with {wanted}, got "
                           f"{type(payload).__name__}{' with keys ' + ', '.join(map(str, payload)) if isinstance(payload, dict) else ''}")
    if "rows" in payload:
        return _encoded(payload["rows"], encode_rows)
    rows = payload["inputs"]
    if not isinstance(rows, list) or not rows:
        raise PayloadError('"inputs" must be a non-empty list of examples')
    if len(rows) > MAX_ROWS:
        raise PayloadError(f'"inputs" holds {len(rows)} examples, at most {MAX_ROWS} are accepted per request')
    try:
        batch = np.asarray(rows, dtype=np.float64)
    except (ValueError, TypeError):
        raise PayloadError(f"every example must be numbers of shape {list(input_shape)} (or a flat row of "
                           f"{math.prod(input_shape)}); got ragged lists or non-numbers") from None
    if batch.dtype == object or not np.all(np.isfinite(batch)):
        raise PayloadError("examples must hold finite numbers only (no NaN, Infinity, strings or null)")
    example = batch.shape[1:]
    flat = math.prod(input_shape)
    if example == input_shape:
        pass
    elif example == (flat,) or (len(input_shape) == 3 and input_shape[0] == 1 and example == input_shape[1:]):
        batch = batch.reshape((len(batch), *input_shape))
    else:
        raise PayloadError(f"each example must have shape {list(input_shape)} (or a flat row of {flat}), "
                           f"got {list(example)}")
    return np.ascontiguousarray(batch, dtype=np.float32)


def _encoded(rows: Any, encode_rows: Callable[[list[Any]], np.ndarray]) -> np.ndarray:
    """Return raw rows as the model's features; raise PayloadError with the encoder's one-line reason."""
    if not isinstance(rows, list) or not rows:
        raise PayloadError('"rows" must be a non-empty list of objects, one per example')
    if len(rows) > MAX_ROWS:
        raise PayloadError(f'"rows" holds {len(rows)} examples, at most {MAX_ROWS} are accepted per request')
    try:
        return np.ascontiguousarray(encode_rows(rows), dtype=np.float32)
    except ValueError as exc:
        raise PayloadError(str(exc)) from None


def predict(loaded: LoadedModel, batch: np.ndarray) -> dict[str, Any]:
    """Return the classes and probabilities of a checked batch."""
    probabilities = loaded.session.run(["probabilities"], {"input": batch})[0]
    return {"classes": probabilities.argmax(axis=1).astype(int).tolist(),
            "probabilities": np.round(probabilities.astype(np.float64), 6).tolist()}


def build_app(loaded: LoadedModel):
    """Return the FastAPI app serving ``loaded``."""
    app = FastAPI(title=f"fedcompare {loaded.document['arm']} ({loaded.document['model']}, {loaded.variant})",
                  version=str(loaded.document.get("format_version")))

    @app.get("/health")
    def health() -> dict[str, str]:
        """Say that the server is up and its model loaded."""
        return {"status": "ok"}

    @app.get("/metadata")
    def metadata() -> dict[str, Any]:
        """Describe the served model: name, variant, run key, accuracy, input schema."""
        return loaded.metadata()

    @app.post("/predict")
    async def predict_endpoint(request: Request):
        """Return the class and probabilities of every example in the body."""
        body = await request.body()
        try:
            batch = parse_inputs(body, loaded.input_shape, loaded.encode_rows)
        except PayloadError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=422)
        return await run_in_threadpool(predict, loaded, batch)

    return app


def serve(loaded: LoadedModel, *, host: str, port: int) -> None:
    """Serve ``loaded`` on host:port until interrupted."""
    import uvicorn

    uvicorn.run(build_app(loaded), host=host, port=port, log_level="warning", access_log=False)
