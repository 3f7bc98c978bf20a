"""The `fedcompare` command: start, inspect and stop the local stack, and run the demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cli.federation import register as register_federation
from cli.serve import register as register_serve
from infra.stack import DEPLOYMENT, StackError, StackSettings, down, status, up
from infra.state import STATE_DIR_ENV, state_dir


def _settings(args: argparse.Namespace) -> StackSettings:
    """Return the settings of the stack in the state dir, or fresh ones from the flags."""
    state = state_dir(args.state_dir)
    existing = StackSettings.load(state)
    wanted = {
        key: value
        for key in ("prefect_port", "superlink_port", "node_base_port", "gpu_nodes", "cpu_nodes",
                    "node_privacy_budget", "concurrency", "warm_workers", "superexec_poll_s", "reply_poll_s",
                    "supernode_poll_s")
        if (value := getattr(args, key, None)) is not None
    }
    if existing and not wanted:
        return existing
    if existing and any(getattr(existing, k) != v for k, v in wanted.items()) and _any_running(existing):
        raise StackError(
            f"a stack with other settings runs in {state}: stop it with `fedcompare down` first"
        )
    return StackSettings.create(state, **wanted)


def _any_running(settings: StackSettings) -> bool:
    """Return whether any part of the stack runs."""
    return any(pid for _, _, pid in status(settings))


def _positive_int(text: str) -> int:
    """Parse a whole number of at least 1 for argparse."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _cmd_up(args: argparse.Namespace) -> int:
    """Start the local stack."""
    settings = _settings(args)
    up(settings)
    print(f"state and logs   {settings.state_dir}")
    print(f"run the comparison: fedcompare demo   (or: prefect deployment run {DEPLOYMENT})")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    """Stop the local stack."""
    settings = StackSettings.load(state_dir(args.state_dir))
    if settings is None:
        print(f"nothing to stop: no stack was started in {state_dir(args.state_dir)}")
        return 0
    stopped = down(settings)
    print("stopped " + (", ".join(stopped) if stopped else "nothing (no part was running)"))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    """Show each part of the local stack, its address and whether it runs."""
    from rich.console import Console
    from rich.table import Table

    settings = StackSettings.load(state_dir(args.state_dir))
    if settings is None:
        print(f"no stack was started in {state_dir(args.state_dir)}: run `fedcompare up`")
        return 1
    table = Table(title=f"fedcompare stack in {settings.state_dir}")
    for column in ("part", "address", "state", "pid"):
        table.add_column(column)
    rows = status(settings)
    for name, address, pid in rows:
        table.add_row(name, address, "[green]running[/]" if pid else "[red]stopped[/]", str(pid or "-"))
    Console().print(table)
    return 0 if all(pid for _, _, pid in rows) else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    """Start the stack if needed, run the deployment, and print the report summary."""
    from flows.config import deployment_config, parse_overrides
    from flows.demo import run_demo

    try:
        overrides = parse_overrides(args.config, base=deployment_config(args.deployment))
        if args.rounds is not None:
            overrides = parse_overrides(json.dumps({**overrides, "rounds": args.rounds}))
    except ValueError as exc:
        raise StackError(str(exc)) from None
    settings = _settings(args)
    up(settings)
    return run_demo(settings, overrides=overrides, timeout_s=args.timeout,
                    deployment=f"{DEPLOYMENT.split('/')[0]}/{args.deployment}")


def _cmd_report(args: argparse.Namespace) -> int:
    """Print a stored report's summary and write the exports asked for."""
    from rich.console import Console

    from flows.config import CompareConfig, resolve_store_uri
    from flows.export import find_report, print_deployment, print_summary, to_csv, to_html, to_json
    from infra.store import StoreError, open_store

    if args.store:
        uri = args.store
    else:
        os.environ.setdefault(STATE_DIR_ENV, str(state_dir(args.state_dir)))
        uri = resolve_store_uri(CompareConfig())
    try:
        report = find_report(open_store(uri), args.run)
    except (LookupError, StoreError, ValueError) as exc:  # ValueError: a URI of another scheme
        raise StackError(str(exc)) from None
    console = Console()
    print_summary(report, console)
    print_deployment(report, console)
    for path, render in ((args.json, to_json), (args.csv, to_csv), (args.html, to_html)):
        if path:
            target = Path(path)
            partial = target.with_name(target.name + ".partial")
            try:
                partial.write_text(render(report), encoding="utf-8")
                partial.replace(target)  # never leave a half-written export behind
            except OSError as exc:
                partial.unlink(missing_ok=True)
                raise StackError(f"cannot write {target}: {exc.strerror}; choose a writable path") from None
            console.print(f"wrote {target}", soft_wrap=True)
    return 0


def _parser() -> argparse.ArgumentParser:
    """Build the argument parser of `fedcompare`."""
    parser = argparse.ArgumentParser(
        prog="fedcompare",
        description="Federated comparison of a large and a small model on a local Prefect + Flower stack.",
    )
    parser.add_argument(
        "--state-dir",
        help="where PID files, logs, the Prefect database and the default store live "
        "(default: $FEDCOMPARE_STATE_DIR or ./.fedcompare)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def stack_flags(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--prefect-port", type=int, help="Prefect server port (default 4200)")
        sub.add_argument("--superlink-port", type=int, help="Flower SuperLink port (default 8000)")
        sub.add_argument("--node-base-port", type=int, help="first SuperNode Runtime API port (default 9101)")
        sub.add_argument("--gpu-nodes", type=int, help="SuperNodes of tier gpu (default 2)")
        sub.add_argument("--cpu-nodes", type=int, help="SuperNodes of tier cpu (default 2)")
        sub.add_argument("--node-privacy-budget", type=float, metavar="EPSILON",
                         help="lifetime ε each SuperNode lets DP-SGD spend on its data, over all runs "
                         "(default: no limit; every node still keeps a privacy ledger)")
        sub.add_argument("--warm-workers", action=argparse.BooleanOptionalAction, default=None,
                         help="a warm worker beside each SuperNode keeps torch, scikit-learn and the node's data "
                         "loaded between Flower messages, and a forkserver starts each message's ClientApp with "
                         "flwr imported (default: on; --no-warm-workers starts a fresh process per message, "
                         "as bare Flower does)")
        sub.add_argument("--superexec-poll", type=float, metavar="SECONDS", dest="superexec_poll_s",
                         help="seconds between the Flower SuperExecs' polls for work (default 1.0; 0.01-60)")
        sub.add_argument("--reply-poll", type=float, metavar="SECONDS", dest="reply_poll_s",
                         help="seconds between the ServerApps' polls for the nodes' replies (default 0.5)")
        sub.add_argument("--supernode-poll", type=float, metavar="SECONDS", dest="supernode_poll_s",
                         help="seconds an idle SuperNode waits before it asks the SuperLink for messages again "
                         "(default 0.5; Flower's own is 3; 0.05-60)")
        sub.add_argument("--concurrency", type=_positive_int, metavar="N",
                         help="comparisons the stack runs at once (the work pool's concurrency limit; default 1); "
                         "further runs wait, Scheduled, for a free slot")

    sub = commands.add_parser("up", help="start the local stack in the background (idempotent)")
    stack_flags(sub)
    sub.set_defaults(func=_cmd_up)
    sub = commands.add_parser("down", help="stop everything `up` started")
    sub.set_defaults(func=_cmd_down)
    sub = commands.add_parser("status", help="show each part of the stack, its address and state")
    sub.set_defaults(func=_cmd_status)
    sub = commands.add_parser(
        "demo", help=f"start the stack if needed, run {DEPLOYMENT} and print the report summary"
    )
    stack_flags(sub)
    sub.add_argument("--rounds", type=int, help="override the number of federated rounds")
    sub.add_argument(
        "--config", default="",
        help='CompareConfig fields as JSON, e.g. \'{"assignment": "by-tier", "data": {"partitioning": "iid"}}\'',
    )
    sub.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the flow run")
    sub.add_argument("--deployment", default="local", choices=("local", "private", "text", "simulation"),
                     help="local: the comparison without DP (default); private: the DP sweep over ε; text: four "
                     "text models on Rotten Tomatoes reviews partitioned by movie; simulation: 1,000 virtual nodes on "
                     "Flower's Simulation Engine (federated-compare/<name> in prefect.yaml); --config is merged over "
                     "its settings")
    sub.set_defaults(func=_cmd_demo)
    sub = commands.add_parser("report", help="print a stored report and export it as JSON, CSV or HTML")
    sub.add_argument("run", help="flow-run id (the run key) of a federated-compare run, or `latest`")
    sub.add_argument("--store", help="store URI (default: $FEDCOMPARE_STORE or <state dir>/store)")
    sub.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    sub.add_argument("--csv", metavar="FILE", help="write the per-arm, per-round table as CSV")
    sub.add_argument("--html", metavar="FILE", help="write a self-contained HTML page with the plots")
    sub.set_defaults(func=_cmd_report)
    register_federation(commands)  # superlink start, node start, certs create: deployments across machines
    register_serve(commands)  # serve an arm's exported model over HTTP
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `fedcompare`; user errors print one line and exit 1."""
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except StackError as exc:
        print(f"fedcompare: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
