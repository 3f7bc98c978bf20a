"""Flower ClientApp of fedcompare: a thin relay from Flower messages to the node's tasks.

Each message becomes a :class:`clients.node_tasks.Task`. A node started with a warm worker
(node config ``worker-socket``; the local stack and ``fedcompare node start`` set it) has the
task answered there (`clients/_warm.py`), so this process imports neither torch nor
scikit-learn; any other node, or one whose worker cannot be reached, answers it here.
Replies say which (``worker-warm`` 1/0, ``worker-restarts``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import _warm
from clients._faults import HANG_TIMEOUTS, apply_fault, node_fault  # test-only fault injection

app = ClientApp()
log = logging.getLogger("fedcompare.client")
_APP_DIR = Path(__file__).resolve().parents[1]  # the installed FAB this process runs


def _answer(kind: str, msg: Message, context: Context, **task: Any) -> tuple[dict[str, Any], Any, dict[str, float]]:
    """Have the node's tasks answer ``msg``; return (reply values, arrays or None, how it was served)."""
    request = {"kind": kind, "run_config": dict(context.run_config), "node_config": dict(context.node_config),
               "message_id": msg.metadata.message_id, "created_at": msg.metadata.created_at, **task}
    socket = str(context.node_config.get("worker-socket", ""))
    if socket:
        timeout = float(context.run_config.get("round-timeout", 600.0))
        try:
            result, restarts = _warm.ask(socket, request, app_dir=_APP_DIR, timeout=timeout)
            return result["values"], result["arrays"], {"worker-warm": 1.0, "worker-restarts": float(restarts)}
        except _warm.WorkerUnavailable as exc:
            log.warning("%s; answering in the ClientApp process", exc)
    from clients.node_tasks import Task, handle  # imports the data and model code (and torch on first use)

    result = handle(Task(**request))
    return result.values, result.arrays, {"worker-warm": 0.0, "worker-restarts": 0.0}


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server what this node is: tier, device, data, number of examples and memory (counts only)."""
    values, _, served = _answer("query", msg, context)
    info = ConfigRecord({**values, **served,
                         "fault": node_fault(context.node_config)})  # "" unless a test injects a fault
    return Message(RecordDict({"node": info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on the node's local training split."""
    fault = node_fault(context.node_config)  # "" on a real node; tests inject faults (clients/_faults.py)
    received = OrderedDict((name, array.numpy()) for name, array in msg.content["arrays"].items())
    values, trained, served = _answer("train", msg, context, arrays=received, config=dict(msg.content["config"]))
    if fault:
        hang = HANG_TIMEOUTS * float(context.run_config.get("round-timeout", 600.0))
        trained = apply_fault(fault, trained, received, hang_seconds=hang)
    arrays = ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in trained.items()))
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({**values, **served})}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the node's local test split."""
    received = OrderedDict((name, array.numpy()) for name, array in msg.content["arrays"].items())
    values, _, served = _answer("evaluate", msg, context, arrays=received)
    return Message(RecordDict({"metrics": MetricRecord({**values, **served})}), reply_to=msg)
