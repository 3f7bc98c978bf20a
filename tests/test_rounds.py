"""The round loop's decisions on real Flower messages: one reply per node, rejections, and too few replies."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.task_identity import TaskIdentity

from server._grid import ArmGrid
from server.rounds import (
    NOT_CONNECTED, RoundPolicy, check_evaluate_reply, check_train_reply, describe, failures, settle, shortfall,
    shortfall_message,
)
from server.strategy import ClientLevelDp, RecordingFedAvg

GLOBAL = OrderedDict(w=np.zeros((2, 2), dtype=np.float32), b=np.zeros(2, dtype=np.float32))


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch):
    """Set what a ServerApp process has set before it builds messages."""
    for name, value in {"_run_id": 1, "_node_id": SUPERLINK_NODE_ID, "_task_id": 1}.items():
        monkeypatch.setattr(TaskIdentity, name, value)


def _pushed(message: Message) -> Message:
    """Give ``message`` its id, as the grid does when it pushes it to the SuperLink."""
    message.metadata.__dict__["_message_id"] = message.object_id
    return message


def _request(node: int, message_type: str = MessageType.TRAIN) -> Message:
    content = RecordDict({"arrays": _record(GLOBAL), "config": ConfigRecord({"server-round": 1})})
    return _pushed(Message(content, dst_node_id=node, message_type=message_type))


def _record(arrays) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items()))


def _train_reply(request: Message, arrays=None, *, examples=10, **records) -> Message:
    arrays = OrderedDict((k, v + np.float32(0.5)) for k, v in GLOBAL.items()) if arrays is None else arrays
    content = RecordDict({"arrays": _record(arrays), "metrics": MetricRecord({"num-examples": examples}), **records})
    return Message(content, reply_to=request)


def _check(reply: Message, max_update_norm: float | None = None) -> str | None:
    return check_train_reply(reply, reference=GLOBAL, weight_key="num-examples", max_update_norm=max_update_norm)


# --- one reply per node -------------------------------------------------------------------------


def test_settle_gives_every_asked_node_one_reply_in_node_order_and_names_the_missing_ones():
    sent = [_request(30), _request(10), _request(20)]
    received = [_train_reply(sent[0]), _train_reply(sent[2])]

    settled, rejected = settle(sent, received, missing_reason="no reply within the round timeout (5 s)")

    assert [reply.metadata.src_node_id for reply in settled] == [10, 20, 30]
    assert settled[0].has_error() and settled[0].error.reason == "no reply within the round timeout (5 s)"
    assert settled[0].metadata.reply_to_message_id == sent[1].metadata.message_id
    assert not settled[1].has_error() and not settled[2].has_error()
    assert rejected == []
    assert failures(settled) == [(10, "no reply within the round timeout (5 s)")]


def test_an_error_the_superlink_sends_for_a_dead_node_is_recorded_against_that_node():
    sent = [_request(7)]
    unavailable = create_message_error_unavailable_res_message(sent[0].metadata, "node_unavail")
    assert unavailable.metadata.src_node_id == SUPERLINK_NODE_ID  # what Flower does: the node never answered

    settled, _ = settle(sent, [unavailable], missing_reason="missing")

    assert settled[0].metadata.src_node_id == 7
    assert "Node Unavailable" in settled[0].error.reason


def test_rejected_replies_become_errors_with_the_reason_and_are_returned_for_the_records():
    sent = [_request(1), _request(2), _request(3)]
    bad = OrderedDict(w=np.full((2, 2), np.nan, dtype=np.float32), b=np.zeros(2, dtype=np.float32))
    received = [_train_reply(sent[0]), _train_reply(sent[1], bad), _train_reply(sent[2], examples=0)]

    settled, rejected = settle(sent, received, missing_reason="missing", check=_check)

    assert [reply.has_error() for reply in settled] == [False, True, True]
    assert [reply.metadata.src_node_id for reply, _ in rejected] == [2, 3]
    assert settled[1].error.reason == rejected[0][1] and "'w' holds 4 NaN/Inf values" in rejected[0][1]
    assert settled[2].error.reason.startswith("rejected: metric 'num-examples' is 0")
    assert not rejected[0][0].has_error()  # the original reply, for its byte count


def test_a_duplicate_reply_and_a_reply_to_another_round_are_ignored():
    sent = [_request(4)]
    first, again, stranger = _train_reply(sent[0]), _train_reply(sent[0], examples=99), _train_reply(_request(5))

    settled, _ = settle(sent, [first, again, stranger], missing_reason="missing")

    assert len(settled) == 1 and settled[0] is first


# --- the checks on a reply's records ------------------------------------------------------------


def test_a_well_formed_training_reply_is_accepted_and_the_norm_bound_applies():
    reply = _train_reply(_request(1))  # update of 0.5 on 6 values: norm sqrt(1.5)

    assert _check(reply) is None
    assert _check(reply, max_update_norm=1.3) is None
    assert _check(reply, max_update_norm=1.2).startswith("rejected: update norm 1.22474")


def test_training_replies_with_missing_or_extra_records_or_weights_are_rejected():
    request = _request(1)
    extra = _train_reply(request, more=ArrayRecord())
    no_weight = Message(RecordDict({"arrays": _record(GLOBAL), "metrics": MetricRecord({"loss": 0.1})}),
                        reply_to=request)

    assert _check(extra).startswith("rejected: expected one ArrayRecord")
    assert _check(no_weight).startswith("rejected: metric 'num-examples' is None")
    assert check_evaluate_reply(no_weight).startswith("rejected: metric 'num-examples'")
    assert check_evaluate_reply(_train_reply(request)) is None


# --- too few replies ----------------------------------------------------------------------------


def test_enough_valid_replies_complete_the_round():
    assert shortfall(2, 2, asked=3, missed=[(9, "no reply")]) is None
    assert shortfall(3, 1, asked=3, missed=[]) is None


def test_too_few_valid_replies_fail_with_one_line_naming_round_counts_reasons_and_fix():
    policy = RoundPolicy(timeout_s=30.0, min_replies=3)
    missed = [(11, "no reply within the round timeout (30 s)"), (12, "rejected: update norm 1e+06 exceeds"),
              (13, NOT_CONNECTED), (14, "ClientApp raised\nTraceback (most recent call last):\n  boom")]

    short = shortfall(1, 3, asked=3, missed=missed)
    message = shortfall_message("large", 4, short, policy)

    assert short is not None and (short.valid, short.needed, short.asked) == (1, 3, 3)
    assert "\n" not in message
    assert message.startswith("arm large round 4: 1 valid training replies from 3 nodes asked, 3 needed")
    for part in ("node 11: no reply", "node 12: rejected", f"node 13: {NOT_CONNECTED}", "node 14: ClientApp raised",
                 "2 attempts of 30 s", "start the arm's nodes", "min_replies (now 3)", "round_timeout_s"):
        assert part in message


def test_a_round_with_no_connected_node_says_so():
    assert "no node of the arm is connected" in describe(shortfall(0, 1, asked=0, missed=[]))


def test_the_missing_reason_names_the_timeout():
    assert RoundPolicy(timeout_s=12.5, min_replies=1).missing_reason() == "no reply within the round timeout (12.5 s)"


# --- client-level DP sees only the accepted replies ---------------------------------------------


def test_client_level_dp_clips_and_averages_only_the_replies_the_checks_accepted():
    recorder = RecordingFedAvg(weighted_by_key="num-examples", min_train_nodes=0, min_evaluate_nodes=0,
                               min_available_nodes=0)
    private = ClientLevelDp(recorder, noise_multiplier=0.0, clipping_norm=1.0, num_sampled_clients=3)
    pinned = ArmGrid(None, [1, 2, 3]).pinned([1, 2, 3])  # configure_train only asks a grid for its nodes
    sent = [_pushed(m) for m in private.configure_train(1, _record(GLOBAL), ConfigRecord({}), pinned)]
    poisoned = OrderedDict(w=np.full((2, 2), np.inf, dtype=np.float32), b=np.zeros(2, dtype=np.float32))
    replies = {m.metadata.dst_node_id: m for m in sent}
    received = [_train_reply(replies[1]), _train_reply(replies[2], poisoned), _train_reply(replies[3])]

    settled, rejected = settle(sent, received, missing_reason="missing", check=_check)
    arrays, _ = private.aggregate_train(1, [reply for reply in settled if not reply.has_error()])

    clipped = 0.5 / np.sqrt(1.5)  # each honest update (0.5 on 6 values) clipped to norm 1, averaged, no noise
    assert [reply.metadata.src_node_id for reply, _ in rejected] == [2]
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 2), clipped), rtol=1e-6)
    assert sorted(recorder.rounds[1].train) == [1, 3]


def test_client_level_dp_scales_the_noise_to_the_replies_it_averages():
    zeros = OrderedDict(w=np.zeros(40_000, dtype=np.float32))
    recorder = RecordingFedAvg(weighted_by_key="num-examples", min_train_nodes=0, min_evaluate_nodes=0,
                               min_available_nodes=0)
    private = ClientLevelDp(recorder, noise_multiplier=1.0, clipping_norm=1.0, num_sampled_clients=4)
    pinned = ArmGrid(None, [1, 2, 3, 4]).pinned([1, 2, 3, 4])
    sent = [_pushed(m) for m in private.configure_train(1, _record(zeros), ConfigRecord({}), pinned)]

    moved = OrderedDict(w=zeros["w"] + np.float32(1e-3))  # a tiny update (an exactly-zero one divides by 0 in Flower)
    arrays, _ = private.aggregate_train(1, [_train_reply(m, moved) for m in sent[:2]])  # 2 of 4 replied

    # a mean of 2 clipped updates moves by up to C/2 when one node changes: the noise must be σ·C/2, not σ·C/4
    assert float(arrays["w"].numpy().std()) == pytest.approx(1.0 * 1.0 / 2, rel=0.05)
    assert private.num_sampled_clients == 4, "the planned sample size is kept for the next round"


def test_the_flows_wait_for_an_arm_follows_the_round_policy():
    from clients.spec import longest_round_s
    from server.rounds import RoundPolicy

    policy = RoundPolicy(timeout_s=60.0, min_replies=1)

    assert longest_round_s(60.0) == (policy.attempts + 1) * policy.timeout_s, "every attempt and the evaluation"
    assert longest_round_s(60.0, attempts=3) == 240.0
