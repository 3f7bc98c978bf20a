"""Checkpoint I/O: save/load throughput of write_round/load_model against raw put/get of the same store.

For every size (``--sizes`` in MB, 1 MB = 10**6 bytes) and backend (``--backends``), saves a
model of that many bytes (float32 arrays in a few layers) with ``write_round`` and loads it
with ``load_model`` (the manifest read while the model downloads, the model verified
against it), and measures in the same run the raw throughput of the same target for the
same number of bytes. ``load_round_MBps`` is ``load_round`` (the model plus its verified
metrics.json: one more request, which costs moto_server about 3 ms):

- ``local``: a LocalStore in a temp dir; raw = plain file write + fsync, and read, in that dir.
- ``s3``: an S3Store against a moto_server the script starts on a free 127.0.0.1 port (and
  always stops), or against the running server ``--s3-endpoint`` names (MinIO, or any
  S3-compatible server; keys from FEDCOMPARE_S3_ACCESS_KEY/SECRET_KEY, bucket ``--s3-bucket``,
  created if missing); raw = minio ``put_object``/``get_object`` with the client's defaults.
  moto_server, a Python server, spends about 3 ms of CPU on every request however small, on
  the cores the client uses: a load's manifest read costs it as much as a 3 MB transfer.

The five measurements interleave (save, raw put, then load, load_round and raw get in an
order that rotates from run to run, since the first read after writing pays more; the raw
payload is as large as the saved model.npz). ``--warmup`` untimed runs come first (fresh memory and files
are slow to touch the first time on some VMs); then each throughput is the best of
``--repeat`` runs, the run least disturbed by other processes (ratios of the medians are
printed too). ``client_cpu_ms`` is this process's CPU time per operation (median; the
server's is not counted): on a busy machine it shows what each path costs better than wall
time. Peak memory is sampled from /proc during the warm-up runs only (a sampler thread
slows what it watches): the extra resident memory over the process's before each call;
load's includes the arrays it returns. Where the kernel's transparent-hugepage defrag is
``madvise`` (``thp_defrag`` in the output), numpy's large allocations may stall in memory
compaction while raw bytes do not; ``NUMPY_MADVISE_HUGEPAGE=0`` takes that out of the
comparison. Prints ONE JSON line::

    {"results": {"s3": {"100": {"save_MBps": ..., "raw_put_MBps": ..., "save_ratio": ...,
     "load_MBps": ..., "raw_get_MBps": ..., "load_ratio": ..., ...}}}, "goal": {...}, ...}

Example::

    python benchmarks/checkpoint_io.py --sizes 10,100,500
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import numpy as np  # noqa: E402

from infra.checkpoints import load_model, load_round, write_round  # noqa: E402
from infra.store import LocalStore, S3Store, Store  # noqa: E402

MB = 10**6
GOAL = 0.8  # checkpoint save/load through S3 should reach this share of raw put/get
_ACCESS, _SECRET = "bench-access", "bench-secret"
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    """Return this process's resident memory in bytes."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * _PAGE


@contextmanager
def _peak_extra_rss(out: list[int], sampling: bool = True) -> Iterator[None]:
    """Sample resident memory every 5 ms while the block runs; append its peak over the start to ``out``."""
    if not sampling:
        yield
        return
    start, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        """Track the highest resident memory until the block ends."""
        while not done.wait(0.005):
            peak[0] = max(peak[0], _rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        out.append(max(peak[0], _rss()) - start)


def _model(nbytes: int) -> dict[str, np.ndarray]:
    """Return float32 arrays of about ``nbytes`` bytes in four layers, like a model's state dict."""
    rng = np.random.default_rng(0)
    n = nbytes // 4
    sizes = [n // 2, n // 4, n // 4 - 1000, 1000]
    return {f"layer{i}.weight": rng.standard_normal(size, dtype=np.float32) for i, size in enumerate(sizes)}


class _LocalRaw:
    """Raw file I/O in the store's own directory: write + fsync, and read."""

    def __init__(self, root: Path) -> None:
        self.path = root / "raw.bin"

    def put(self, data: bytes) -> None:
        """Write ``data`` and fsync it."""
        with open(self.path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def get(self) -> bytes:
        """Read the file back."""
        return self.path.read_bytes()

    def clear(self) -> None:
        """Remove the file."""
        self.path.unlink(missing_ok=True)


class _S3Raw:
    """Raw minio put_object/get_object against the same server and bucket, with the client's defaults."""

    def __init__(self, endpoint: str, bucket: str, access: str = _ACCESS, secret: str = _SECRET) -> None:
        from minio import Minio

        self.client = Minio(endpoint.split("://")[-1], access_key=access, secret_key=secret,
                            secure=endpoint.startswith("https://"))
        self.bucket = bucket
        self.name = f"raw-{uuid.uuid4().hex[:8]}.bin"

    def put(self, data: bytes) -> None:
        """Upload ``data`` as one object."""
        self.client.put_object(self.bucket, self.name, io.BytesIO(data), len(data))

    def get(self) -> bytes:
        """Download the object."""
        response = self.client.get_object(self.bucket, self.name)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def clear(self) -> None:
        """Remove the object."""
        self.client.remove_object(self.bucket, self.name)


def _cpu_s() -> float:
    """Return this process's CPU time (user + system) in seconds; moto_server's is not counted."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Clock:
    """Wall and CPU seconds of each operation, per operation name."""

    def __init__(self) -> None:
        self.wall: dict[str, list[float]] = {k: [] for k in ("save", "raw_put", "load", "load_round", "raw_get")}
        self.cpu: dict[str, list[float]] = {k: [] for k in self.wall}

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        """Record the block's wall and CPU seconds under ``name``."""
        wall, cpu = time.perf_counter(), _cpu_s()
        yield
        self.wall[name].append(time.perf_counter() - wall)
        self.cpu[name].append(_cpu_s() - cpu)


def _measure(store: Store, raw, size_mb: int, repeat: int, warmup: int) -> dict:
    """Return best-of-N throughputs and ratios of checkpoint vs raw I/O for one size on one backend."""
    arrays = _model(size_mb * MB)
    nbytes = sum(a.nbytes for a in arrays.values())
    clock, save_rss, load_rss = _Clock(), [], []
    object_size = 0
    for attempt in range(warmup + repeat):
        if attempt == warmup:  # the warm-up runs touch fresh memory and files; forget their times
            clock = _Clock()
        sampling = attempt < warmup  # memory is sampled only then: the sampler thread slows what it watches
        run_key = f"bench-{uuid.uuid4().hex[:8]}"
        with _peak_extra_rss(save_rss, sampling), clock.time("save"):
            manifest = write_round(store, run_key, "large", 1, arrays, {"accuracy": 0.0}, {"bench": size_mb})
        object_size = manifest["rounds"]["1"]["objects"][f"runs/{run_key}/large/round-0001/model.npz"]["size"]
        payload = np.random.default_rng(1).bytes(object_size)  # raw I/O moves as many bytes as the checkpoint
        with clock.time("raw_put"):
            raw.put(payload)
        payload = b""
        reads = ["load", "load_round", "raw_get"]
        for name in reads[attempt % 3:] + reads[:attempt % 3]:  # rotate: the first read after writing pays more
            if name == "load":
                with _peak_extra_rss(load_rss, sampling), clock.time("load"):
                    loaded = load_model(store, run_key, "large", 1)
                assert all(np.array_equal(loaded[k], arrays[k]) for k in arrays), "the loaded model differs"
            elif name == "load_round":
                with clock.time("load_round"):
                    loaded, _ = load_round(store, run_key, "large", 1)
            else:
                with clock.time("raw_get"):
                    got = raw.get()
                assert len(got) == object_size
            loaded, got = {}, b""
        for key in store.list_keys(f"runs/{run_key}/"):
            store.delete(key)
        raw.clear()
    best = {k: object_size / MB / min(v) for k, v in clock.wall.items()}
    median = {k: object_size / MB / statistics.median(v) for k, v in clock.wall.items()}
    return {
        "model_MB": round(nbytes / MB, 1), "object_MB": round(object_size / MB, 1),
        "save_MBps": round(best["save"], 1), "raw_put_MBps": round(best["raw_put"], 1),
        "save_ratio": round(best["save"] / best["raw_put"], 3),
        "load_MBps": round(best["load"], 1), "raw_get_MBps": round(best["raw_get"], 1),
        "load_ratio": round(best["load"] / best["raw_get"], 3),
        "load_round_MBps": round(best["load_round"], 1),
        "median_save_ratio": round(median["save"] / median["raw_put"], 3),
        "median_load_ratio": round(median["load"] / median["raw_get"], 3),
        "client_cpu_ms": {k: round(1000 * statistics.median(v)) for k, v in clock.cpu.items()},
        "save_peak_extra_rss_MB": round(max(save_rss) / MB, 1) if save_rss else None,
        "load_peak_extra_rss_MB": round(max(load_rss) / MB, 1) if load_rss else None,
        "repeats": repeat, "warmups": warmup,
    }


def _thp_defrag() -> str | None:
    """Return the kernel's transparent-hugepage defrag mode, e.g. 'madvise', or None where unknown."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/defrag").read_text(encoding="ascii")
    except OSError:
        return None
    return next((word.strip("[]") for word in text.split() if word.startswith("[")), None)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the measurements, print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,500", help="model sizes in MB, comma-separated")
    parser.add_argument("--backends", default="local,s3", help="backends to measure: local, s3 or both")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement (sizes >= 500 MB: at most 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first, per size and backend")
    parser.add_argument("--s3-endpoint", default="", help="measure this running S3 server (http://host:port) "
                        "instead of starting a moto_server; keys from FEDCOMPARE_S3_ACCESS_KEY/SECRET_KEY")
    parser.add_argument("--s3-bucket", default="fedcompare-bench", help="bucket on --s3-endpoint (created if missing)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - {"local", "s3"})
    if unknown or not sizes or min(sizes) < 1 or args.repeat < 1 or args.warmup < 0:
        parser.error(f"expected --backends from local,s3 (got unknown {unknown}), sizes >= 1 MB, --repeat >= 1 "
                     "and --warmup >= 0")
    results: dict[str, dict[str, dict]] = {}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedcompare-bench-")))
        for backend in backends:
            if backend == "local":
                store, raw = LocalStore(tmp / "store"), _LocalRaw(tmp)
            elif args.s3_endpoint:
                access = os.environ.get("FEDCOMPARE_S3_ACCESS_KEY", _ACCESS)
                secret = os.environ.get("FEDCOMPARE_S3_SECRET_KEY", _SECRET)
                host, secure = args.s3_endpoint.split("://")[-1], args.s3_endpoint.startswith("https://")
                store = S3Store(host, args.s3_bucket, f"bench-{uuid.uuid4().hex[:8]}", access_key=access,
                                secret_key=secret, secure=secure)
                raw = _S3Raw(args.s3_endpoint, args.s3_bucket, access, secret)
            else:
                from tests.s3server import running_s3_server

                endpoint = stack.enter_context(running_s3_server())
                store = S3Store(endpoint.removeprefix("http://"), "bench", access_key=_ACCESS,
                                secret_key=_SECRET, secure=False)
                raw = _S3Raw(endpoint, "bench")
            results[backend] = {
                str(size): _measure(store, raw, size, min(args.repeat, 3) if size >= 500 else args.repeat,
                                    args.warmup)
                for size in sizes
            }
    s3 = results.get("s3", {})
    ratios = [min(r["save_ratio"], r["load_ratio"]) for r in s3.values()]
    print(json.dumps({
        "benchmark": "checkpoint_io",
        "results": results,
        "goal": {"s3_min_ratio": GOAL, "s3_worst_ratio": min(ratios) if ratios else None,
                 "met": bool(ratios) and min(ratios) >= GOAL},
        "peak_rss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB, 1),
        "python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "numpy_madvise_hugepage": os.environ.get("NUMPY_MADVISE_HUGEPAGE"), "thp_defrag": _thp_defrag(),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
