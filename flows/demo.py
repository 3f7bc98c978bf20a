"""Run a `federated-compare` deployment (`local` by default), follow it, and print the report summary."""

from __future__ import annotations

import asyncio
import os
import time

from rich.console import Console
from rich.markup import escape

from flows.export import print_summary
from infra.checkpoints import CheckpointError, read_manifest, report_key
from infra.stack import DEPLOYMENT, StackSettings
from infra.store import StoreError, open_store

_FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


async def follow_flow_run(
    settings: StackSettings, parameters: dict, timeout_s: float, console: Console, deployment: str = DEPLOYMENT
) -> tuple[str, str, str]:
    """Create a flow run of ``deployment`` and wait for a final state; return (id, state, state message)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    flow_run = await run_deployment(deployment, parameters=parameters, timeout=0)
    console.print(f"flow run: {settings.prefect_ui}/runs/flow-run/{flow_run.id}", soft_wrap=True)
    # the progress line only glances at the store: an outage must not hold up noticing the run's end
    store = open_store(os.environ["FEDCOMPARE_STORE"], retry_seconds=0)
    run_key = parameters.get("config", {}).get("resume_from") or str(flow_run.id)  # where the store keeps it
    deadline = time.monotonic() + timeout_s
    state, message = "SCHEDULED", ""
    async with get_client() as client:
        with console.status("waiting for the flow run…") as spinner:
            while time.monotonic() < deadline:
                current = await client.read_flow_run(flow_run.id)
                state = current.state.type.value if current.state else "SCHEDULED"
                name = current.state.name if current.state else state
                message = (current.state.message or "") if current.state else ""
                spinner.update(f"flow run {current.name}: {name}{_rounds_done(store, run_key)}")
                if state in _FINAL:
                    break
                await asyncio.sleep(2)
    if state not in _FINAL:
        state = f"still {state} after the --timeout of {timeout_s:.0f} s"
    return str(flow_run.id), state, message


def _rounds_done(store, run_key: str) -> str:
    """Return " · large round 3 · small round 4" from the arms' manifests (empty before any round)."""
    parts = []
    for arm in ("large", "small"):
        try:
            manifest = read_manifest(store, run_key, arm)
        except (CheckpointError, StoreError):  # progress display only: the flow reports real errors
            manifest = None
        if manifest:
            parts.append(f"{arm} round {manifest['latest_complete_round']}")
    return "".join(f" · {part}" for part in parts)


def run_demo(settings: StackSettings, *, overrides: dict, timeout_s: float, deployment: str = DEPLOYMENT) -> int:
    """Run ``deployment`` on the local stack and print where to watch it and its summary.

    ``overrides`` is the whole CompareConfig to run (the deployment's own settings merged in).
    """
    console = Console()
    os.environ.update({k: v for k, v in settings.env().items() if k.startswith(("PREFECT_", "FEDCOMPARE_"))})
    parameters = {"config": overrides} if overrides else {}
    run_id, state, message = asyncio.run(follow_flow_run(settings, parameters, timeout_s, console, deployment))
    url = f"{settings.prefect_ui}/runs/flow-run/{run_id}"
    if state != "COMPLETED":
        console.print(f"[red]flow run ended {state}[/]{': ' + escape(message) if message else ''}", soft_wrap=True)
        console.print(f"see {url} and {settings.state_dir}/logs", soft_wrap=True)
        return 1
    store = open_store(os.environ["FEDCOMPARE_STORE"])
    run_key = overrides.get("resume_from") or run_id
    report = store.get_json(report_key(run_key))
    print_summary(report, console)
    console.print(f"flow run: {url}", soft_wrap=True)
    console.print(f"report:   {store.uri}/{report_key(run_key)}", soft_wrap=True)
    return 0
