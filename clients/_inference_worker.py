"""One serving process for ``clients.inference``: load an ONNX file, time it, print one JSON line.

Run as ``python -m clients._inference_worker FOLDER THREADS QUERIES WARMUP BATCH BATCHES``;
FOLDER holds ``model.onnx`` and ``inputs.npy`` (raw inputs, cycled). Imports numpy and
onnxruntime only, so its peak RSS is what serving the model costs, not what training did.
"""

from __future__ import annotations

import json
import resource
import sys
import time

_WINDOWS = 3  # the throughput run is timed in this many windows of BATCHES / 3 batches


def _peak_rss_mb() -> float:
    """Return this process's peak resident memory in MB.

    Linux's ``VmHWM`` is the high-water mark of this program's own memory; ``ru_maxrss``
    would also count the parent it was forked from, which survives ``exec`` there.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # not Linux: an upper bound


def main(argv: list[str]) -> int:
    """Measure load time, batch-1 latency, batch throughput and peak RSS of one model; print them as JSON."""
    folder, threads, queries, warmup, batch, batches = argv[0], *(int(a) for a in argv[1:6])
    started = time.perf_counter()
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(f"{folder}/model.onnx", options, providers=["CPUExecutionProvider"])
    inputs = np.load(f"{folder}/inputs.npy")
    name = session.get_inputs()[0].name
    session.run(None, {name: inputs[:1]})
    load_seconds = time.perf_counter() - started  # import, read, build the session, first answer

    latencies = []
    for i in range(warmup + queries):  # MLPerf single-stream: one query at a time, timed one by one
        one = inputs[i % len(inputs)][None]
        start = time.perf_counter()
        session.run(None, {name: one})
        if i >= warmup:
            latencies.append(time.perf_counter() - start)
    rows = np.resize(inputs, (batch, *inputs.shape[1:]))  # repeats the examples when there are fewer than batch
    for _ in range(max(1, batches // 10)):
        session.run(None, {name: rows})
    throughput = 0.0
    window = max(1, batches // _WINDOWS)
    for _ in range(_WINDOWS):  # the fastest window: other programs on the machine only ever slow one down
        start = time.perf_counter()
        for _ in range(window):
            session.run(None, {name: rows})
        throughput = max(throughput, window * batch / (time.perf_counter() - start))
    ms = np.asarray(latencies) * 1000.0
    print(json.dumps({
        "load_seconds": load_seconds,
        "latency_ms_p50": float(np.percentile(ms, 50)),
        "latency_ms_p90": float(np.percentile(ms, 90)),
        "latency_ms_p99": float(np.percentile(ms, 99)),
        "throughput_per_s": throughput,
        "peak_rss_mb": _peak_rss_mb(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
