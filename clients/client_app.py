"""Flower ClientApp of fedcompare: a thin relay from Flower messages to the node's tasks.

Each message becomes a :class:`clients.node_tasks.Task`. A node started with a warm worker
(node config ``worker-socket``; the local stack and ``fedcompare node start`` set it) has the
task answered there (`clients/_warm.py`), so this process imports neither torch nor
scikit-learn; any other node, or one whose worker cannot be reached, answers it here.
Replies say which (``worker-warm`` 1/0, ``worker-restarts``).

The app reads its node-config keys once per message into :class:`NodeConfig`: ``worker-socket``
and ``client-mods``, Flower client mods the node's operator installs around every handler
(`clients/client_mods.py`). The node's tasks read the data keys (``partition-id``, ``tier``, …).
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod

from clients import _warm
from clients.client_mods import CLIENT_MODS, load_client_mods

log = logging.getLogger("fedcompare.client")
_APP_DIR = Path(__file__).resolve().parents[1]  # the installed FAB this process runs


@dataclass(frozen=True)
class NodeConfig:
    """The node-config keys this ClientApp reads."""

    worker_socket: str  # Unix socket of the node's warm worker; "" = answer in this process
    mods: tuple[Mod, ...]  # client mods named by `client-mods`, outermost first

    @classmethod
    def of(cls, context: Context) -> NodeConfig:
        """Return the node's NodeConfig, parsed once per process for each node config."""
        return _parse(tuple(sorted(context.node_config.items())))


@functools.cache
def _parse(items: tuple[tuple[str, Any], ...]) -> NodeConfig:
    """Parse node-config items into a NodeConfig, importing the named client mods."""
    config = dict(items)
    return NodeConfig(worker_socket=str(config.get("worker-socket", "")),
                      mods=load_client_mods(str(config.get(CLIENT_MODS, ""))))


def node_mods(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Pass ``msg`` through the client mods the node's config names, then to the handler."""
    for mod in reversed(NodeConfig.of(context).mods):
        call_next = functools.partial(_call_mod, mod, call_next)
    return call_next(msg, context)


def _call_mod(mod: Mod, call_next: ClientAppCallable, msg: Message, context: Context) -> Message:
    """Call ``mod`` on ``msg`` with ``call_next`` as the rest of the chain."""
    return mod(msg, context, call_next)


app = ClientApp(mods=[node_mods])


def _answer(kind: str, msg: Message, context: Context, **task: Any) -> tuple[dict[str, Any], Any, dict[str, float]]:
    """Have the node's tasks answer ``msg``; return (reply values, arrays or None, how it was served)."""
    request = {"kind": kind, "run_config": dict(context.run_config), "node_config": dict(context.node_config),
               "message_id": msg.metadata.message_id, "created_at": msg.metadata.created_at, **task}
    socket = NodeConfig.of(context).worker_socket
    if socket:
        timeout = float(context.run_config.get("round-timeout-s", 600.0))  # the run spec's, unparsed: no pydantic here
        try:
            result, restarts = _warm.ask(socket, request, app_dir=_APP_DIR, timeout=timeout)
            return result["values"], result["arrays"], {"worker-warm": 1.0, "worker-restarts": float(restarts)}
        except _warm.WorkerUnavailable as exc:
            log.warning("%s; answering in the ClientApp process", exc)
    from clients.node_tasks import Task, handle  # imports the data and model code (and torch on first use)

    result = handle(Task(**request))
    return result.values, result.arrays, {"worker-warm": 0.0, "worker-restarts": 0.0}


def _received(msg: Message, record: str = "arrays") -> OrderedDict[str, np.ndarray]:
    """Return the arrays of ``msg``'s ArrayRecord ``record``: the global model's, or a distilled arm's "teacher"."""
    if record not in msg.content.array_records:
        return OrderedDict()
    return OrderedDict((name, array.numpy()) for name, array in msg.content[record].items())


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server what this node is: tier, device, data, number of examples and memory (counts only)."""
    values, _, served = _answer("query", msg, context)
    return Message(RecordDict({"node": ConfigRecord({**values, **served})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on the node's local training split."""
    values, trained, served = _answer("train", msg, context, arrays=_received(msg), teacher=_received(msg, "teacher"),
                                      config=dict(msg.content["config"]))
    arrays = ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in trained.items()))
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({**values, **served})}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the node's local test split."""
    values, _, served = _answer("evaluate", msg, context, arrays=_received(msg))
    return Message(RecordDict({"metrics": MetricRecord({**values, **served})}), reply_to=msg)
