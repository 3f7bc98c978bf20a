"""The local stack and the comparisons that tests/test_integration.py checks: one stack per module, its runs.

`stack` starts a real local stack on free ports (`fedcompare up`) and stops it after the
module; each `*_run` fixture runs one comparison through `fedcompare demo` and returns
(state dir, flow run id, output). Imported by the integration module, whose scope they take.
"""

from __future__ import annotations


import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clients.data import load_dataset


FEDCOMPARE = str(Path(sys.executable).parent / "fedcompare")


ROUNDS = 1  # the default configuration's multi-round path runs in the digits runs below and in `make demo`


def _free_port() -> int:
    """Return a TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _free_block(size: int) -> int:
    """Return the first port of `size` consecutive free ports."""
    for _ in range(50):
        base = _free_port()
        if base + size < 65535 and all(_bindable(base + i) for i in range(size)):
            return base
    raise RuntimeError("found no block of free ports")


def _bindable(port: int) -> bool:
    """Return whether `port` can be bound on 127.0.0.1."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _cli(state: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `fedcompare --state-dir state args…` and return what it printed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FEDCOMPARE_"))}
    return subprocess.run([FEDCOMPARE, "--state-dir", str(state), *args], capture_output=True, text=True,
                          timeout=timeout, env={**env, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A running local stack on free ports; always stopped afterwards."""
    state = tmp_path_factory.mktemp("stack")
    ports = ["--prefect-port", str(_free_port()), "--superlink-port", str(_free_port()),
             "--node-base-port", str(_free_block(4)), "--node-privacy-budget", str(NODE_BUDGET)]
    try:
        started = _cli(state, "up", *ports)
        assert started.returncode == 0, started.stdout + started.stderr
        yield state
    finally:
        stopped = _cli(state, "down", timeout=120)
        assert stopped.returncode == 0, stopped.stderr


def _demo(state: Path, *args: str) -> tuple[Path, str, str]:
    """Run `fedcompare demo args…`; return (state dir, flow run id, output)."""
    done = _cli(state, "demo", *args, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_id = re.search(r"/runs/flow-run/([0-9a-f-]{36})", done.stdout).group(1)
    return state, run_id, done.stdout


@pytest.fixture(scope="module")
def demo_run(stack):
    """The default configuration for ROUNDS rounds."""
    return _demo(stack, "--rounds", str(ROUNDS))


# node-0 (tier gpu) has already spent far more than its lifetime budget on an earlier run
NODE_BUDGET = 50.0


SPENT_EARLIER = {"run_key": "earlier", "arm": "large", "round": 1, "accountant": "rdp", "delta": 1e-5,
                 "noise_multiplier": 0.5, "sample_rate": 1.0, "steps": 200, "charged_at": "2026-01-01T00:00:00+00:00"}


PRIVATE_BY_TIER = {
    "assignment": "by-tier", "rounds": 2, "data": {"dataset": "digits"},
    "small": {"model": "torch-logreg", "learning_rate": 0.05, "local_epochs": 2},
    "privacy": {"mode": "sample-level", "target_epsilon": 8.0},
    "deployment": {"enabled": False},  # the default run covers deployment; this one covers privacy
}


@pytest.fixture(scope="module")
def private_by_tier_run(stack):
    """Sample-level DP with the by-tier assignment for 2 rounds; node-0's privacy budget is already spent."""
    ledger = stack / "nodes" / "node-0" / "privacy-ledger.json"
    ledger.parent.mkdir(parents=True, exist_ok=True)
    ledger.write_text(json.dumps({"version": 1, "entries": [SPENT_EARLIER]}))
    return _demo(stack, "--config", json.dumps(PRIVATE_BY_TIER))


@pytest.fixture(scope="module")
def client_level_run(stack):
    """Client-level DP for the scikit-learn small model, 2 rounds on all nodes."""
    config = {"rounds": 2, "data": {"dataset": "digits"}, "privacy": {"mode": "client-level", "arms": "small"},
              "deployment": {"enabled": False}}
    return _demo(stack, "--config", json.dumps(config))


def _prefect(state: Path, coroutine_fn):
    """Run `coroutine_fn(client)` against the stack's Prefect server."""
    from prefect.client.orchestration import PrefectClient

    settings = json.loads((state / "stack.json").read_text())

    async def call():
        async with PrefectClient(api=f"http://127.0.0.1:{settings['prefect_port']}/api") as client:
            return await coroutine_fn(client)

    return asyncio.run(call())


def _node_id(report: dict, partition: int) -> int:
    """Return the Flower node id of the stack's node holding ``partition``."""
    return next(n["node_id"] for n in report["federation"]["nodes"] if n["partition-id"] == partition)


@pytest.fixture(scope="module")
def table_run(stack, tmp_path_factory):
    """A user's own table: the unscaled wine CSV (0.13 to 1,680) with a categorical column and empty cells;
    an extra small arm (Gaussian naive Bayes) beside the large and small ones."""
    from tests.test_preprocess import write_wine

    table = write_wine(tmp_path_factory.mktemp("table") / "wine.csv", categorical=True, missing=0.05)
    config = {"rounds": 3, "data": {"dataset": str(table)}, "deployment": {"enabled": False},
              "extra_arms": {"nb": {"kind": "small", "model": "gnb"}}}  # a third arm: naive Bayes beside logreg
    return _demo(stack, "--config", json.dumps(config))


@pytest.fixture(scope="module")
def colour_run(stack, tmp_path_factory):
    """An RGB image folder of mixed sizes: MNIST digits 0-2 drawn in random colours, 20 to 32 pixels a side;
    with the small model distilled from the large one."""
    from PIL import Image

    mnist = load_dataset("mnist")
    folder = tmp_path_factory.mktemp("colour") / "digits"
    rng = np.random.default_rng(0)
    for digit in range(3):
        (folder / str(digit)).mkdir(parents=True)
        for i, pixels in enumerate(mnist.x[mnist.y == digit][:40, 0]):
            colour = rng.uniform(0.3, 1.0, size=3)
            rgb = (pixels[..., None] * colour * 255).astype(np.uint8)
            side = int(rng.integers(20, 33))
            Image.fromarray(rgb, mode="RGB").resize((side, side)).save(folder / str(digit) / f"{i}.png")
    config = {"rounds": 1, "data": {"dataset": str(folder), "image_size": [24, 24]},
              "deployment": {"enabled": False}, "distill": {"enabled": True}}  # and the small model distilled
    return _demo(stack, "--config", json.dumps(config))


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium with the flags this closed network needs."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1200,2600", "--virtual-time-budget=20000"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=180)


def _descendants(root: int) -> list[tuple[int, str]]:
    """Return (pid, command line) of every live process below ``root``."""
    children: dict[int, list[int]] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append((child, commands.get(child, "")))
            todo.append(child)
    return found
