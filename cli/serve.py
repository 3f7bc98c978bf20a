"""`fedcompare serve`: serve a stored ONNX variant of an arm's final model over HTTP."""

from __future__ import annotations

import argparse
import os

from infra.stack import StackError
from infra.state import STATE_DIR_ENV, state_dir

VARIANTS = ("fp32", "int8", "fp16")


def register(commands: argparse._SubParsersAction) -> None:
    """Add `serve` to `fedcompare`'s subcommands."""
    sub = commands.add_parser(
        "serve", help="serve an arm's exported model (fp32, int8 or fp16) over HTTP",
        description="Serve one exported variant of an arm's final model with onnxruntime: POST /predict "
        '({"inputs": [example, ...]} in raw units, e.g. MNIST pixels 0-255; for a table trained with a '
        'preprocessing spec also {"rows": [{column: value, ...}, ...]}) answers classes and probabilities; '
        "GET /health; GET /metadata (model, variant, run key, accuracy, input schema). The model's sha256 is "
        "checked against its deploy.json before it is loaded.")
    sub.add_argument("run", help="run key (flow-run id) of a federated-compare run, or `latest`")
    sub.add_argument("--arm", default="large", help="arm whose model to serve, e.g. large or small (default large)")
    sub.add_argument("--variant", default="fp32", choices=VARIANTS,
                     help="fp32: the exported graph; int8: static QDQ quantization; fp16: half precision "
                     "(default fp32)")
    sub.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sub.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    sub.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default 0: one per core)")
    sub.add_argument("--store", help="store URI (default: $FEDCOMPARE_STORE or <state dir>/store)")
    sub.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    """Verify and load the variant, then serve it until interrupted."""
    from infra.deployments import DeploymentError, latest_deployed_run
    from infra.serving import load, serve
    from infra.store import StoreError, open_store

    uri = args.store or _default_store(args)
    _require_free(args.host, args.port)
    try:
        store = open_store(uri)
        run_key = latest_deployed_run(store, args.arm) if args.run == "latest" else args.run
        loaded = load(store, run_key, args.arm, args.variant, threads=args.threads)
    except (DeploymentError, StoreError, ValueError) as exc:
        raise StackError(str(exc)) from None
    spec = loaded.document["input"].get("preprocessing")
    if spec:  # a table's model also takes raw rows by column name, encoded as in training
        from functools import partial

        from clients.preprocess import encode_rows

        loaded.encode_rows = partial(encode_rows, spec)
    entry = loaded.document["variants"][args.variant]
    print(f"serving {args.arm} ({loaded.document['model']}, {args.variant}, {entry['bytes']} bytes, sha256 "
          f"{entry['sha256'][:12]}… verified) of run {run_key} at http://{args.host}:{args.port}", flush=True)
    serve(loaded, host=args.host, port=args.port)
    return 0


def _require_free(host: str, port: int) -> None:
    """Raise StackError in one line when host:port cannot be listened on (uvicorn would log several)."""
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise StackError(f"cannot listen on {host}:{port} ({exc.strerror}): stop what uses it or choose "
                             "another --port") from None


def _default_store(args: argparse.Namespace) -> str:
    """Return the store the local stack uses: $FEDCOMPARE_STORE, else <state dir>/store."""
    from flows.config import CompareConfig, resolve_store_uri

    os.environ.setdefault(STATE_DIR_ENV, str(state_dir(args.state_dir)))
    return resolve_store_uri(CompareConfig())
