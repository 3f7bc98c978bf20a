"""Server-side recording and aggregation: bytes are what Flower sends; every aggregation keeps node order."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from server.strategy import RoundLog, recording_strategy, serialized_bytes


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


# --- robust aggregation -------------------------------------------------------------------------

NODES = [5, 1, 4, 2, 3]  # arrival order; node-id order is 1..5


def _train_replies(values: dict[int, np.ndarray], examples: dict[int, int]):
    """Return each node's training reply (arrays ``w``, metrics with ``num-examples``) in ``NODES`` order."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.common import MessageType

    replies = []
    for node in NODES:
        sent = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN)
        content = RecordDict({"arrays": ArrayRecord(OrderedDict(w=Array(values[node]))),
                              "metrics": MetricRecord({"num-examples": examples[node], "train-seconds": 0.5})})
        replies.append(Message(content, reply_to=sent))
    return replies


@pytest.fixture
def _server_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in {"_run_id": 1, "_node_id": 1, "_task_id": 1}.items():  # what a ServerApp process has set
        monkeypatch.setattr(TaskIdentity, name, value)


def _aggregate(aggregation: str, values, examples, *, reverse: bool = False):
    from server.strategy import recording_strategy

    strategy = recording_strategy(aggregation, min_train_nodes=0, min_evaluate_nodes=0, min_available_nodes=0)
    replies = _train_replies(values, examples)  # fresh replies: FedMedian and FedTrimmedAvg pop their arrays
    arrays, _ = strategy.aggregate_train(1, list(reversed(replies)) if reverse else replies)
    return arrays["w"].numpy(), strategy


@pytest.mark.parametrize("aggregation", ["fedavg", "fedmedian", "trimmed-mean", "krum"])
def test_every_aggregation_is_independent_of_arrival_order_and_records_every_node(aggregation, _server_identity):
    rng = np.random.default_rng(7)
    values = {node: (rng.standard_normal(4096) * 10.0 ** rng.integers(-3, 4, 4096)).astype(np.float32)
              for node in NODES}
    examples = {node: 10 * node + 3 for node in NODES}
    sums = [np.zeros(4096, np.float32), np.zeros(4096, np.float32)]
    for i, order in enumerate((NODES, NODES[::-1])):
        for node in order:
            sums[i] += values[node] * np.float32(examples[node] / 163)
    assert not np.array_equal(sums[0], sums[1])  # these arrays do give different sums in different orders

    first, strategy = _aggregate(aggregation, values, examples)
    second, _ = _aggregate(aggregation, values, examples, reverse=True)

    assert first.tobytes() == second.tobytes()
    log = strategy.rounds[1]
    assert sorted(log.train) == [1, 2, 3, 4, 5] and log.train[4]["num-examples"] == 43
    assert set(log.node_bytes) == {1, 2, 3, 4, 5} and log.bytes_up > 5 * values[1].nbytes


def test_robust_aggregations_resist_one_outlier_node_and_fedavg_does_not(_server_identity):
    honest = {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}
    values = {node: np.full(3, honest.get(node, 1000.0), dtype=np.float32) for node in NODES}  # node 5 is off
    examples = {node: 10 for node in NODES}

    results = {name: _aggregate(name, values, examples)[0] for name in ("fedavg", "fedmedian", "trimmed-mean", "krum")}

    np.testing.assert_allclose(results["fedavg"], 202.0)  # (1+2+3+4+1000)/5
    np.testing.assert_allclose(results["fedmedian"], 3.0)
    np.testing.assert_allclose(results["trimmed-mean"], 3.0)  # beta 0.2 of 5 cuts 1 and 1000
    assert results["krum"][0] in honest.values()  # one honest node's update, never the outlier's


def test_an_unknown_aggregation_fails_naming_the_choices():
    from server.strategy import recording_strategy

    with pytest.raises(ValueError, match="expected one of fedavg, fedmedian, trimmed-mean, krum, got 'mean'"):
        recording_strategy("mean")


def test_the_aggregation_names_agree_between_the_flow_the_run_config_and_the_server():
    from typing import get_args

    from clients.spec import AGGREGATIONS as RUN_CONFIG_AGGREGATIONS
    from flows.config import ArmConfig
    from server.strategy import AGGREGATIONS

    flow_choices = list(get_args(ArmConfig.model_fields["aggregation"].annotation))
    assert list(AGGREGATIONS) == list(RUN_CONFIG_AGGREGATIONS) == flow_choices


def test_krum_f_and_the_trimmed_share_are_settings_of_the_arm():
    from clients.spec import ArmSpec

    arm = ArmSpec(model="cnn", aggregation="trimmed-mean", trim_fraction=0.3, krum_byzantine=2)

    trimmed = recording_strategy("trimmed-mean", trim_fraction=arm.trim_fraction, krum_byzantine=arm.krum_byzantine)
    krum = recording_strategy("krum", trim_fraction=arm.trim_fraction, krum_byzantine=arm.krum_byzantine)

    assert trimmed.beta == 0.3 and krum.num_malicious_nodes == 2
    assert recording_strategy("trimmed-mean").beta == ArmSpec().trim_fraction == 0.2, "Flower's default stays ours"


def test_summed_arrays_sent_as_shares_come_back_as_the_federations_exact_sums(_server_identity):
    from clients.models import to_shares

    counts = {node: np.arange(6, dtype=np.float64) * node + node for node in NODES}  # each node's counts
    examples = {node: 10 * node + 3 for node in NODES}
    shares = {node: to_shares({"w": counts[node]}, examples[node], ("w",))["w"] for node in NODES}
    strategy = recording_strategy("fedavg", min_train_nodes=0, min_evaluate_nodes=0, min_available_nodes=0,
                                  summed=("w",))

    arrays, _ = strategy.aggregate_train(1, _train_replies(shares, examples))

    np.testing.assert_allclose(arrays["w"].numpy(), sum(counts.values()), rtol=1e-12)
    plain, _ = _aggregate("fedavg", shares, examples)
    assert not np.allclose(plain, sum(counts.values())), "without it FedAvg gives the mean share, not the sums"
