"""DP-SGD overhead: step time and peak memory of the default large model with and without Opacus.

Trains the default large model (the MNIST CNN) on the same data for the same number of
steps (``--steps``, after ``--warmup`` steps) without DP and with DP-SGD in each
per-sample gradient mode asked for (``--modes``; fedcompare trains with the first,
``ghost`` = Opacus's fast gradient clipping), and prints one JSON line::

    {"ratio": <DP / non-DP step time of fedcompare's mode>, "mode": ..., "modes": {mode: {...}}, ...}

Batches are fixed-size (the same tensors for every variant) so that the ratio compares
the work per step, not Poisson batch sizes. Peak memory is the peak RSS
of the process that trains the variant on CPU (``torch.cuda.max_memory_allocated`` on
CUDA); each variant runs in its own subprocess so peaks do not mix. The variants run
``--repeats`` times, alternating; the fastest step time of each is kept (on a shared
machine one slow spell otherwise decides the ratio: single runs gave 1.58 to 2.31), with
every measurement in ``step_seconds_all``. Example::

    python benchmarks/dp_overhead.py --steps 60 --modes ghost,hooks
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


def _measure(variant: str, steps: int, warmup: int, batch_size: int, device: str) -> dict:
    """Train ``variant`` ("plain" or a grad-sample mode) and return its step time and peak memory."""
    import torch
    import torch.nn.functional as F

    from clients.data import load_dataset
    from clients.models import build_model
    from privacy.accounting import Plan
    from privacy.sample_level import dp_sgd

    dataset = load_dataset("mnist")
    model = build_model("cnn", input_shape=dataset.input_shape, num_classes=dataset.num_classes, seed=0,
                        device=device, private=variant != "plain")
    network = model.network
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    x = torch.from_numpy(dataset.x[:batch_size]).to(model.device)
    y = torch.from_numpy(dataset.y[:batch_size]).to(model.device)
    criterion = F.cross_entropy
    if variant != "plain":
        n = len(dataset.y)
        plan = Plan("sample-level", "rdp", 8.0, 1e-5, 1.0, 1.0 / -(-n // batch_size), 1, 1, 1.0, False)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(dataset.x),
                                                                            torch.from_numpy(dataset.y)),
                                             batch_size=batch_size)
        network, optimizer, _, criterion = dp_sgd(plan, grad_sample_mode=variant)(network, optimizer, loader)
    network.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(network(x), y)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    if model.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if model.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if model.device.startswith("cuda")
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"step_seconds": seconds, "peak_mb": peak_mb, "device": model.device,
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    """Parse the flags, run every variant in its own process, print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant (default 60)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per step (default 32, the demo's)")
    parser.add_argument("--modes", default="ghost,hooks",
                        help="Opacus grad_sample modes to time, fedcompare's first (default ghost,hooks)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="measurements per variant, alternating, the fastest kept (default 3; the CPU is shared)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: measure one variant, print its JSON
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(_measure(args.variant, args.steps, args.warmup, args.batch_size, args.device)))
        return
    if args.repeats < 1:
        parser.error(f"need --repeats >= 1, got {args.repeats}")
    modes = [m for m in args.modes.split(",") if m]
    runs: dict[str, list[dict]] = {variant: [] for variant in ["plain", *modes]}
    for _ in range(args.repeats):  # alternate, so that a busy spell of the machine hits every variant
        for variant, measured in runs.items():
            done = subprocess.run(
                [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps), "--warmup",
                 str(args.warmup), "--batch-size", str(args.batch_size), "--device", args.device],
                capture_output=True, text=True, check=True, cwd=ROOT,
            )
            measured.append(json.loads(done.stdout.strip().splitlines()[-1]))
    results = {variant: {**min(measured, key=lambda r: r["step_seconds"]),
                         "step_seconds_all": [r["step_seconds"] for r in measured],
                         "peak_mb": max(r["peak_mb"] for r in measured)}
               for variant, measured in runs.items()}
    plain = results.pop("plain")
    for result in results.values():
        result["ratio"] = result["step_seconds"] / plain["step_seconds"]
    print(json.dumps({
        "benchmark": "dp_overhead", "model": "cnn", "batch_size": args.batch_size, "steps": args.steps,
        "repeats": args.repeats,
        "mode": modes[0], "ratio": results[modes[0]]["ratio"], "plain": plain, "modes": results,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }))


if __name__ == "__main__":
    main()
