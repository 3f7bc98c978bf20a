"""Deliberate fault injection for tests: make a node send a bad training reply, hang or die.

THIS IS A TEST TOOL. A node started with the node-config key ``fault`` set to anything
but "" sabotages every training reply it sends; never set it on a real node. The tests
use it to check that the server rejects bad updates and goes on without failed nodes.

Values of ``fault``:
    ""       no fault (the default)
    "nan"    put NaN into the reply's arrays
    "shape"  give the first array an extra axis (its shape no longer matches the model)
    "huge"   scale the node's update (trained minus received model) by ``HUGE_FACTOR``
    "hang"   sleep ``hang_seconds`` (``HANG_TIMEOUTS`` round timeouts) before replying
    "crash"  end the ClientApp process with ``os._exit`` before replying
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

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
            "deliberate fault injector for tests: remove it from the node config of a real node"
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
