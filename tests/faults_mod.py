"""Deliberate fault injection for tests, as a Flower client mod: a node sends bad training replies, hangs or dies.

THIS IS A TEST TOOL; production code never imports it. The fault tests install :func:`fault_mod`
on a SuperNode through the ClientApp's generic node-config key ``client-mods``
(``client-mods="tests.faults_mod:fault_mod"``, with the repository on the SuperNode's
``PYTHONPATH``); the node-config key ``fault`` then says what the mod does to the node's honest
replies. The tests use it to check that the server rejects bad updates and goes on without
failed nodes. The query reply says which fault the node has (``fault``), so the report shows it.

Values of ``fault``:
    ""       no fault (the default)
    "nan"    put NaN into the reply's arrays
    "shape"  give the first array an extra axis (its shape no longer matches the model)
    "huge"   scale the node's update (trained minus received model) by ``HUGE_FACTOR``
    "hang"   sleep ``HANG_TIMEOUTS`` round timeouts (run config ``round-timeout-s``) before replying
    "crash"  end the ClientApp process with ``os._exit`` before replying
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

FAULTS = ("", "nan", "shape", "huge", "hang", "crash")
HUGE_FACTOR = 1e6
HANG_TIMEOUTS = 10  # a hanging node sleeps this many round timeouts
CRASH_EXIT_CODE = 86  # an exit status no library uses, so a log shows the crash was injected


def node_fault(node_config: Mapping[str, object]) -> str:
    """Return the node's injected fault ("" for none) from its node config; unknown values fail."""
    fault = str(node_config.get("fault", ""))
    if fault not in FAULTS:
        raise ValueError(
            f"node config fault={fault!r}: expected one of {', '.join(repr(f) for f in FAULTS)}; it is a "
            "deliberate fault injector for tests: remove it (and tests.faults_mod from client-mods) on a real node"
        )
    return fault


def apply_fault(
    fault: str, trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], *, hang_seconds: float
) -> OrderedDict[str, np.ndarray]:
    """Return the arrays a node with ``fault`` replies instead of ``trained`` (``received``: the global model).

    "hang" sleeps ``hang_seconds`` first and "crash" never returns.
    """
    arrays = OrderedDict((name, np.array(array, copy=True)) for name, array in trained.items())
    if fault == "":
        return arrays
    if fault == "nan":
        for name, array in arrays.items():
            if np.issubdtype(array.dtype, np.inexact) and array.size:
                array.reshape(-1)[0] = np.nan
    elif fault == "shape":
        first = next(iter(arrays))
        arrays[first] = arrays[first].reshape(arrays[first].shape + (1,))
    elif fault == "huge":
        for name, array in arrays.items():
            base = np.asarray(received[name], dtype=np.float64)
            arrays[name] = (base + HUGE_FACTOR * (array.astype(np.float64) - base)).astype(array.dtype)
    elif fault == "hang":
        time.sleep(hang_seconds)
    elif fault == "crash":
        os._exit(CRASH_EXIT_CODE)
    else:
        raise ValueError(f"fault: expected one of {', '.join(repr(f) for f in FAULTS)}, got {fault!r}")
    return arrays


def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply the node's ``fault`` to its honest training reply, and name the fault in its query reply."""
    fault = node_fault(context.node_config)
    reply = call_next(msg, context)
    category = msg.metadata.message_type.split(".")[0]
    if reply.has_error():
        return reply
    if category == MessageType.QUERY:
        reply.content["node"]["fault"] = fault
    elif category == MessageType.TRAIN and fault:
        received = OrderedDict((name, array.numpy()) for name, array in msg.content["arrays"].items())
        trained = OrderedDict((name, array.numpy()) for name, array in reply.content["arrays"].items())
        hang = HANG_TIMEOUTS * float(context.run_config.get("round-timeout-s", 600.0))
        sent = apply_fault(fault, trained, received, hang_seconds=hang)
        reply.content["arrays"] = ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in sent.items()))
    return reply
