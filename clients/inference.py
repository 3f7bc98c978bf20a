"""Measure exported ONNX variants the way a server would run them (no Flower, Prefect or minio).

``deploy_variants`` exports a trained zoo model, checks the ONNX graph against the
framework on the test set (the largest absolute difference of any probability), compresses
it (``clients.export``), and measures every variant with onnxruntime on the CPU:

- accuracy on the test set, again for each variant;
- latency at batch 1 (MLPerf single-stream style): ``warmup`` queries untimed, then
  ``queries`` timed one by one; p50, p90, p99 in milliseconds;
- throughput at batch ``batch`` (64): examples per second in the fastest of three windows of
  ``batches`` / 3 batches (a shared machine's other programs only ever slow a window down);
- load time of a fresh process (importing onnxruntime, reading the file, building the
  session, the first answer; the Python interpreter's own start is not counted) and the
  peak RSS of that process, which imports nothing but numpy and onnxruntime;
- bytes of the serialized graph.

Latency, throughput, load time and RSS come from one fresh process per variant
(``clients._inference_worker``), so one variant's memory or warm caches do not touch the next.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clients.data import Dataset
from clients.export import Exported, compress, export_fp32, framework_probabilities, onnx_probabilities, to_raw
from clients.models import Model

_WORKER_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class InferenceSettings:
    """How variants are measured."""

    threads: int = 2  # onnxruntime intra-op threads (the vCPUs a serving replica is priced for)
    queries: int = 300  # timed batch-1 queries
    warmup: int = 30  # untimed batch-1 queries before them
    batch: int = 64  # examples per batch of the throughput run
    batches: int = 30  # timed batches of the throughput run


def measure_speed(onnx_bytes: bytes, raw_x: np.ndarray, settings: InferenceSettings) -> dict[str, float]:
    """Return load_seconds, latency_ms_p50/p90/p99, throughput_per_s and peak_rss_mb of a fresh serving process.

    Raises:
        RuntimeError: the measuring process failed; the message carries its last line.
    """
    with tempfile.TemporaryDirectory(prefix="fedcompare-inference-") as folder:
        Path(folder, "model.onnx").write_bytes(onnx_bytes)
        np.save(Path(folder, "inputs.npy"), np.ascontiguousarray(raw_x[: max(settings.batch, 256)], dtype=np.float32))
        args = [str(v) for v in (settings.threads, settings.queries, settings.warmup, settings.batch, settings.batches)]
        done = subprocess.run([sys.executable, "-m", "clients._inference_worker", folder, *args],
                              capture_output=True, text=True, timeout=_WORKER_TIMEOUT_S,
                              cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"measuring an ONNX model failed (exit {done.returncode}): {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def deploy_variants(model: Model, *, dataset_name: str, test: Dataset, calibration_x: np.ndarray | None,
                    settings: InferenceSettings = InferenceSettings()) -> dict[str, Any]:
    """Export, check, compress and measure ``model``; return its variants' ONNX bytes and measurements.

    Args:
        model: a trained zoo model.
        dataset_name: the dataset it was trained on (decides the raw-input scaling inside the graph).
        test: the examples every variant's accuracy is measured on (as ``clients.data`` loads them).
        calibration_x: model inputs for static int8 calibration (as loaded); None: no int8 variant.
        settings: how to measure.
    Returns:
        {"variants": {variant: {"onnx": bytes, "input_shape", "raw_input_max", "bytes", "sha256",
        "accuracy", "max_abs_diff" (vs the framework's probabilities), and the measure_speed figures}},
        "skipped": {variant: reason}, "framework_accuracy"}.
    """
    fp32 = export_fp32(model, dataset_name=dataset_name)
    raw_test = to_raw(test.x, dataset_name)
    reference = framework_probabilities(model, test.x)
    calibration = None if calibration_x is None else to_raw(calibration_x, dataset_name)
    variants, skipped = compress(fp32, calibration)
    measured = {}
    for name, exported in variants.items():
        measured[name] = _measure(exported, raw_test, test.y, reference, settings)
    return {"variants": measured, "skipped": skipped,
            "framework_accuracy": float(np.mean(reference.argmax(axis=1) == test.y))}


def _measure(exported: Exported, raw_test: np.ndarray, labels: np.ndarray, reference: np.ndarray,
             settings: InferenceSettings) -> dict[str, Any]:
    """Return one variant's bytes, digest, accuracy, difference to the framework, and speed."""
    probabilities = onnx_probabilities(exported.onnx, raw_test, threads=settings.threads)
    return {
        "onnx": exported.onnx,
        "input_shape": list(exported.input_shape),
        "raw_input_max": exported.raw_input_max,
        "bytes": len(exported.onnx),
        "sha256": hashlib.sha256(exported.onnx).hexdigest(),
        "accuracy": float(np.mean(probabilities.argmax(axis=1) == labels)),
        "max_abs_diff": float(np.max(np.abs(probabilities - reference))),
        **measure_speed(exported.onnx, raw_test, settings),
    }
