"""Flower ServerApp of fedcompare: one arm of a comparison, or a query of the federation."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from clients.spec import RunSpec
from infra._flower_pulls import shorten_pull_backoff
from infra.store import open_store
from server.arm import query_federation, run_arm

shorten_pull_backoff()  # the nodes' replies are pulled again after 50 ms, not Flower's 1 s
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Read the run config once, then query the nodes or train the arm."""
    run = RunSpec.from_run_config(context.run_config)
    store = open_store(run.store_uri)
    if run.mode == "query":
        query_federation(grid, run, store)
    else:
        run_arm(grid, run, store)
