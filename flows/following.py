"""Following a Flower run from the flow: submit a run spec, wait for the run to end, explain a bad end."""

from __future__ import annotations

import time
from typing import Any

from clients.spec import RunSpec
from flows.flower import run_log, run_status, source_run_config, stop_run, submit_run
from infra.store import StoreError

_POLL_S = 1.0  # store reads while following a run
_STATUS_POLL_S = 5.0  # run status reads (Flower's Control API) while following a run


def run_config(spec: RunSpec) -> dict[str, Any]:
    """Return the Flower run config of ``spec``, with the git commit of the checkout the app is submitted from."""
    return {**spec.to_run_config(), **source_run_config()}

def wait_for(run_id: int, superlink: str, timeout_s: float, *, on_poll=None, looks_done=None):
    """Wait until Flower run ``run_id`` ends and return its final status.

    The status is read every ``_STATUS_POLL_S`` (a few milliseconds in-process; a `flwr ls`
    process, 1.3 s of CPU, only when that fails); ``on_poll()`` (cheap store reads) runs
    every ``_POLL_S``, and once ``looks_done()`` says the store holds everything the run
    writes, the status is read every poll.
    """
    deadline = time.monotonic() + timeout_s
    next_status = 0.0
    while True:
        if on_poll:
            on_poll()
        now = time.monotonic()
        if now >= next_status or (looks_done and looks_done()):
            status = run_status(run_id, superlink)
            if status.finished:
                return status
            next_status = now + _STATUS_POLL_S
        if now > deadline:
            stop_run(run_id, superlink)
            raise TimeoutError(f"Flower run {run_id} did not finish within {timeout_s:.0f} s; it was stopped")
        time.sleep(_POLL_S)


def exists(store, key: str) -> bool:
    """Return whether ``key`` is in the store; an unreachable store counts as not yet (the run's status decides)."""
    try:
        return store.exists(key)
    except StoreError:
        return False


def run_failed(what: str, run_id: int, status: str, superlink: str) -> RuntimeError:
    """Build the error for a Flower run that ended badly, with the end of its log."""
    tail = run_log(run_id, superlink, tail=25)
    return RuntimeError(f"{what} (Flower run {run_id}) ended {status}. Last lines of its log:\n{tail}")


def submit(spec: RunSpec, superlink: str, *, simulation: dict[str, int | float] | None = None) -> int:
    """Submit this repository's Flower app with ``spec`` as its run config; return the run id.

    ``simulation``: the federation config of a simulated run (`flows.flower.submit_run`).
    """
    return submit_run(run_config(spec), superlink, simulation=simulation)
