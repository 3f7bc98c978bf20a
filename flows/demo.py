"""Run a `federated-compare` deployment (`local` by default), follow it, and print the report summary."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import datetime, timezone

from rich.console import Console
from rich.markup import escape

from flows.config import CompareConfig, resolve_store_uri
from flows.export import print_summary
from infra.checkpoints import CheckpointError, read_manifest, report_key
from infra.stack import DEPLOYMENT, WORK_POOL, StackError, StackSettings
from infra.store import ObjectNotFound, Store, StoreError, open_store

_FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
_WAITING = {"SCHEDULED", "PENDING"}


async def follow_flow_run(
    settings: StackSettings, parameters: dict, timeout_s: float, console: Console, deployment: str = DEPLOYMENT,
    *, store: Store, arms: list[str],
) -> tuple[str, str, str]:
    """Create a flow run of ``deployment`` and wait for a final state; return (id, state, state message).

    On a terminal a status line shows the state and the arms' rounds; elsewhere (CI logs, a file)
    one line is printed per state change and per round an arm completes.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from prefect.exceptions import PrefectHTTPStatusError

    try:
        flow_run = await run_deployment(deployment, parameters=parameters, timeout=0)
    except PrefectHTTPStatusError as exc:  # the server checks the parameters against the flow's schema
        if exc.response.status_code not in (409, 422):
            raise
        detail = exc.response.json().get("detail", exc.response.text) if exc.response.content else str(exc)
        raise StackError(f"Prefect refused the run's parameters: {' '.join(str(detail).split())}; fix --config "
                         "(CompareConfig's fields) or redeploy with `fedcompare up` if the deployment is older than "
                         "this code") from None
    console.print(f"flow run: {settings.prefect_ui}/runs/flow-run/{flow_run.id}", soft_wrap=True)
    run_key = parameters.get("config", {}).get("resume_from") or str(flow_run.id)  # where the store keeps it
    deadline = time.monotonic() + timeout_s
    state, message, said_why = "SCHEDULED", "", False
    shown: dict[str, int] = {}
    last_name = ""
    async with get_client() as client:
        with console.status("waiting for the flow run…") as spinner:
            while time.monotonic() < deadline:
                current = await client.read_flow_run(flow_run.id)
                state = current.state.type.value if current.state else "SCHEDULED"
                name = current.state.name if current.state else state
                message = (current.state.message or "") if current.state else ""
                rounds = _rounds_done(store, run_key, arms)
                if not console.is_terminal:
                    if name != last_name:
                        console.print(f"flow run {current.name}: {name}", soft_wrap=True)
                    for arm, done in rounds.items():
                        for number in range(shown.get(arm, 0) + 1, done + 1):
                            console.print(f"{arm} arm: round {number} done", soft_wrap=True)
                        shown[arm] = max(done, shown.get(arm, 0))
                last_name = name
                spinner.update(f"flow run {current.name}: {name}"
                               + "".join(f" · {arm} round {done}" for arm, done in rounds.items()))
                if state in _FINAL:
                    break
                if state in _WAITING and not said_why:
                    said_why = await _say_why_it_waits(client, settings, current, console)
                await asyncio.sleep(2)
    if state not in _FINAL:
        state = f"still {state} after the --timeout of {timeout_s:.0f} s"
    return str(flow_run.id), state, message


async def _say_why_it_waits(client, settings: StackSettings, waiting, console: Console) -> bool:
    """If every slot of the stack's work pool is taken, say so here and in the waiting run's log; return whether."""
    from prefect.client.schemas.actions import LogCreate
    from prefect.client.schemas.filters import (
        FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, WorkPoolFilter, WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType

    busy = await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
            any_=[StateType.RUNNING, StateType.PENDING]))),
        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[WORK_POOL])),
    )
    busy = [run for run in busy if run.id != waiting.id]
    if len(busy) < settings.concurrency:
        return False
    why = (f"waiting for a free slot: the local stack runs at most {settings.concurrency} comparison(s) at once "
           f"(work pool {WORK_POOL}) and {', '.join(run.name for run in busy)} run(s) now; this run starts when "
           "one ends. To run more at once: `fedcompare down`, then `fedcompare up --concurrency N`")
    console.print(why, soft_wrap=True)
    await client.create_logs([LogCreate(name="fedcompare.demo", level=20, message=why,
                                        timestamp=datetime.now(timezone.utc), flow_run_id=waiting.id)])
    return True


def _rounds_done(store: Store, run_key: str, arms: list[str]) -> dict[str, int]:
    """Return the latest complete round of each arm that stored one, from the arms' manifests."""
    done = {}
    for arm in arms:
        try:
            manifest = read_manifest(store, run_key, arm)
        except (CheckpointError, StoreError):  # progress display only: the flow reports real errors
            manifest = None
        if manifest:
            done[arm] = manifest["latest_complete_round"]
    return done


def _open(uri: str, **kwargs) -> Store:
    """Open the run's store, turning a wrong URI or S3 setting into a one-line StackError."""
    try:
        return open_store(uri, **kwargs)
    except (ValueError, StoreError) as exc:
        raise StackError(f"cannot open the store {uri}: {exc}") from None


def run_demo(settings: StackSettings, *, overrides: dict, timeout_s: float, deployment: str = DEPLOYMENT) -> int:
    """Run ``deployment`` on the local stack and print where to watch it and its summary.

    ``overrides`` is the whole CompareConfig to run (the deployment's own settings merged in);
    the progress and the report are read from the store that config names (``store_uri``).
    """
    # first: Prefect reads its settings (the stack's API URL) when it is imported, and flows.preparation imports it
    os.environ.update({k: v for k, v in settings.env().items() if k.startswith(("PREFECT_", "FEDCOMPARE_"))})
    from flows.preparation import plan_variants

    console = Console()
    config = CompareConfig.model_validate(overrides)
    for note in config.unused_steps():
        console.print(f"note: {note}", soft_wrap=True)
    uri = resolve_store_uri(config)
    # the progress line only glances at the store: an outage must not hold up noticing the run's end
    glance = _open(uri, retry_seconds=0)
    arms = [variant.name for group in plan_variants(config) for variant in group]
    parameters = {"config": overrides} if overrides else {}
    run_id, state, message = asyncio.run(
        follow_flow_run(settings, parameters, timeout_s, console, deployment, store=glance, arms=arms))
    url = f"{settings.prefect_ui}/runs/flow-run/{run_id}"
    if state != "COMPLETED":
        console.print(f"[red]flow run ended {state}[/]{': ' + escape(message) if message else ''}", soft_wrap=True)
        console.print(f"see {url} and {settings.state_dir}/logs", soft_wrap=True)
        return 1
    store = _open(uri)
    run_key = overrides.get("resume_from") or run_id
    try:
        report = store.get_json(report_key(run_key))
    except (ObjectNotFound, StoreError) as exc:
        raise StackError(f"the flow run completed but its report cannot be read: {exc}") from None
    print_summary(report, console)
    console.print(f"flow run: {url}", soft_wrap=True)
    console.print(f"report:   {store.uri}/{report_key(run_key)}", soft_wrap=True)
    return 0
