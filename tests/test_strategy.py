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


def _evaluate_reply(node: int, examples: int, accuracy: float):
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.common import MessageType

    sent = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.EVALUATE)
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": examples, "accuracy": accuracy})}),
                   reply_to=sent)


def test_evaluation_is_weighted_by_test_examples_when_training_is_weighted_by_another_key(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    from server.strategy import RecordingFedAvg

    for name, value in {"_run_id": 1, "_node_id": 0, "_task_id": 1}.items():  # what a ServerApp process has set
        monkeypatch.setattr(TaskIdentity, name, value)

    strategy = RecordingFedAvg(weighted_by_key="dp-unit-weight")  # as client-level DP trains

    metrics = strategy.aggregate_evaluate(1, [_evaluate_reply(1, 30, 1.0), _evaluate_reply(2, 10, 0.0)])

    assert dict(metrics) == {"accuracy": 0.75}
    assert strategy.weighted_by_key == "dp-unit-weight"
    assert strategy.rounds[1].evaluate == {1: {"num-examples": 30, "accuracy": 1.0}, 2: {"num-examples": 10, "accuracy": 0.0}}
