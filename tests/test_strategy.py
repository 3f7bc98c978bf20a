"""Server-side accounting: bytes are the serialized size of what Flower sends."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from server.strategy import RoundLog, serialized_bytes


def _content(*arrays: np.ndarray):
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    record = ArrayRecord(OrderedDict((f"a{i}", Array(a)) for i, a in enumerate(arrays)))
    return RecordDict({"arrays": record, "config": ConfigRecord({"server-round": 1, "learning-rate": 0.01})})


def test_serialized_bytes_are_the_arrays_plus_a_small_envelope():
    weights = np.arange(250_000, dtype=np.float32).reshape(500, 500)
    bias = np.arange(500, dtype=np.float32)

    size = serialized_bytes(_content(weights, bias))

    raw = weights.nbytes + bias.nbytes
    assert raw < size < raw + 4096  # numpy headers, record and config envelopes
    assert serialized_bytes(_content(weights)) < size  # every array counts
    assert serialized_bytes(_content(weights.astype(np.float64))) > 2 * weights.nbytes  # dtype, not parameter count


def test_round_log_counts_bytes_per_node_and_in_total():
    log = RoundLog()

    log.count(7, "down", 100)
    log.count(7, "up", 40)
    log.count(9, "down", 100)

    assert log.node_bytes == {7: {"down": 100, "up": 40}, 9: {"down": 100, "up": 0}}
    assert (log.bytes_down, log.bytes_up) == (200, 40)
