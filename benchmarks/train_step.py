"""Training throughput per device: fedcompare's fit next to a plain PyTorch (AMP) loop on the same model and batch.

For every device asked for (``--devices``; default the CPU and each CUDA GPU torch
sees) it trains the default large model of ``CompareConfig`` (the MNIST CNN, batches of
32) on synthetic data of the dataset's input shape twice, each in its own process:

* ``fedcompare``: ``TorchModel.fit`` — what a node runs, with its DataLoader, host to
  device copies, per-step loss read-back and precision policy (bf16/fp16 autocast on
  CUDA, float32 on the CPU) — once on ``--warmup`` batches, then timed on ``--steps``;
* ``plain``: a hand-written loop on one batch already on the device — ``torch.autocast``
  (bfloat16 where the GPU has it, else float16 with a GradScaler) on CUDA, float32 on
  the CPU — the same Adam and learning rate, ``--warmup`` then ``--steps`` steps.

It prints one JSON line; per device: samples/s of both, ``ratio`` (fedcompare / plain;
1.0 = no overhead; the fastest of ``--repeats`` alternating runs each), peak memory
of both and ``estimated_memory_mb``
(``clients.models.estimate_training_memory_bytes``). Peak memory is
``torch.cuda.max_memory_allocated`` during the timed steps on CUDA; on the CPU the
peak resident memory (VmHWM, reset after the warm-up through /proc/self/clear_refs) of
the variant's process during the timed steps, the torch runtime and its code pages
included — the first CPU step pages in some 100 MB of kernels, which a growth over the
RSS before it would count as training memory. The estimate counts tensors only. Example::

    python benchmarks/train_step.py --steps 50 --warmup 5 --devices cpu,cuda:0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


CPU_PEAK = "peak RSS (VmHWM) of the variant's process during the timed steps"
CPU_PEAK_FALLBACK = "peak RSS (ru_maxrss) of the variant's process, warm-up included"


def _reset_peak(device: str) -> str:
    """Reset the peak-memory counter of ``device`` before the timed steps; return what the peak will mean."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return "torch.cuda.max_memory_allocated during the timed steps"
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # Linux: reset the peak RSS to the current RSS
        return CPU_PEAK
    except OSError:
        return CPU_PEAK_FALLBACK


def _peak_memory_mb(device: str) -> float:
    """Return the peak memory since ``_reset_peak`` in MiB."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; follows the reset


def _measure(variant: str, device: str, args: argparse.Namespace) -> dict:
    """Train ``variant`` ("fedcompare" or "plain") on ``device``; return samples/s, precision and peak memory."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from clients.data import Dataset
    from clients.models import build_model

    shape, classes = tuple(args.input_shape), args.num_classes
    model = build_model(args.model, input_shape=shape, num_classes=classes, seed=0, device=device)
    rng = np.random.default_rng(0)

    def synthetic(batches: int) -> Dataset:
        """Return ``batches`` batches of random inputs and labels."""
        n = batches * args.batch_size
        return Dataset(x=rng.standard_normal((n, *shape), dtype=np.float32),
                       y=rng.integers(0, classes, n).astype(np.int64), num_classes=classes, name="synthetic")

    warm, timed = synthetic(args.warmup), synthetic(args.steps)
    on_cuda = device.startswith("cuda")
    if variant == "fedcompare":
        fit = dict(epochs=1, batch_size=args.batch_size, learning_rate=args.learning_rate, seed=0,
                   optimizer=args.optimizer)
        if args.warmup:
            model.fit(warm, **fit)
        peak_kind = _reset_peak(device)
        seconds = model.fit(timed, **fit)["train_seconds"]
        precision = model.precision
    else:
        network = model.network
        optimizer = (torch.optim.Adam(network.parameters(), lr=args.learning_rate) if args.optimizer == "adam"
                     else torch.optim.SGD(network.parameters(), lr=args.learning_rate, momentum=0.9))
        x = torch.from_numpy(timed.x[: args.batch_size]).to(device)
        y = torch.from_numpy(timed.y[: args.batch_size]).to(device)
        dtype = None
        if on_cuda:
            with torch.cuda.device(device):
                dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        network.train()

        def step() -> None:
            """Take one optimizer step on the fixed batch."""
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(network(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        for _ in range(args.warmup):
            step()
        peak_kind = _reset_peak(device)
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        if on_cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
    return {"samples_per_s": args.steps * args.batch_size / seconds, "precision": precision,
            "peak_memory_mb": _peak_memory_mb(device), "peak_memory_kind": peak_kind,
            "torch_threads": torch.get_num_threads()}


def _device_name(device: str) -> str:
    """Return the GPU's name, or the CPU's model name from /proc/cpuinfo."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def main() -> None:
    """Parse the flags, measure both variants per device in their own processes, print one JSON line."""
    from flows.config import CompareConfig

    large = CompareConfig().large
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant and device (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--batch-size", type=int, default=large.batch_size,
                        help=f"examples per step (default {large.batch_size}, the large arm's)")
    parser.add_argument("--devices", default="all",
                        help="comma-separated cpu, cuda, cuda:N, or all = cpu and every CUDA GPU (default all)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="measurements per variant, alternating, the fastest kept (default 3; the CPU is shared)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: measure one variant, print its JSON
    parser.add_argument("--device", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.repeats < 1:
        parser.error(f"need --steps >= 1, --warmup >= 0, --batch-size >= 1 and --repeats >= 1, got {args.steps}, "
                     f"{args.warmup}, {args.batch_size}, {args.repeats}")
    from clients.data import load_dataset
    from clients.models import estimate_training_memory_bytes, resolve_large_model

    dataset = load_dataset(CompareConfig().data.dataset)
    args.model = resolve_large_model(large.model, "image" if len(dataset.input_shape) == 3 else "tabular")
    args.input_shape, args.num_classes = dataset.input_shape, dataset.num_classes
    args.learning_rate, args.optimizer = large.learning_rate, large.optimizer
    if args.variant:
        print(json.dumps(_measure(args.variant, args.device, args)))
        return

    import torch

    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    devices = ["cpu", *gpus] if args.devices == "all" else [d for d in args.devices.split(",") if d]
    if not gpus and any(d.startswith("cuda") for d in devices):
        parser.error(f"--devices {args.devices} asks for CUDA but torch {torch.__version__} sees no GPU")
    estimate = estimate_training_memory_bytes(args.model, input_shape=args.input_shape, num_classes=args.num_classes,
                                              batch_size=args.batch_size, private=False, optimizer=args.optimizer)
    rows = []
    for device in devices:
        runs: dict[str, list[dict]] = {"fedcompare": [], "plain": []}
        for _ in range(args.repeats):  # alternate, so that a busy spell of the machine hits both variants
            for variant, measured in runs.items():
                done = subprocess.run(
                    [sys.executable, __file__, "--variant", variant, "--device", device, "--steps", str(args.steps),
                     "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)],
                    capture_output=True, text=True, cwd=ROOT,
                )
                if done.returncode:
                    sys.exit(f"{variant} on {device} failed:\n{done.stderr.strip()}")
                measured.append(json.loads(done.stdout.strip().splitlines()[-1]))
        ours, plain = (max(measured, key=lambda r: r["samples_per_s"]) for measured in runs.values())
        rows.append({
            "device": device, "name": _device_name(device), "precision": ours["precision"],
            "plain_precision": plain["precision"], "torch_threads": ours["torch_threads"],
            "fedcompare_samples_per_s": ours["samples_per_s"], "plain_samples_per_s": plain["samples_per_s"],
            "ratio": ours["samples_per_s"] / plain["samples_per_s"],
            "fedcompare_peak_memory_mb": ours["peak_memory_mb"], "plain_peak_memory_mb": plain["peak_memory_mb"],
            "peak_memory_kind": ours["peak_memory_kind"],
            "estimated_memory_mb": estimate / 2**20,
        })
    print(json.dumps({
        "benchmark": "train_step", "model": args.model, "batch_size": args.batch_size, "steps": args.steps,
        "warmup": args.warmup, "repeats": args.repeats, "optimizer": args.optimizer, "devices": rows,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }))


if __name__ == "__main__":
    main()
