"""The arm's round loop: train, evaluate and checkpoint each round without waiting on nodes that fail or hang.

Flower's ``Strategy.start`` waits forever for nodes to connect and aggregates whatever
arrives. This loop calls the same strategy methods, but each attempt of a round is
bounded by ``RoundPolicy.timeout_s`` (connecting included), every node that was asked
gets exactly one reply in the records (a stand-in error for a missing, misaddressed or
rejected reply), and a round with fewer than ``min_replies`` valid training replies is
tried once more, then fails the arm with one line that says what to change.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import Strategy

from clients.spec import ROUND_ATTEMPTS
from server._grid import ArmGrid
from server._updates import check_update, check_weight
from server.strategy import Recording

log = logging.getLogger("fedcompare.server")

NODE_POLL_S = 1.0  # how often a round that waits for nodes asks the SuperLink which are connected
NOT_CONNECTED = "not connected at the start of the round"


@dataclass(frozen=True)
class RoundPolicy:
    """How a round treats its nodes: how long it waits, how many valid replies it needs, what it accepts."""

    timeout_s: float  # one training attempt waits this long for nodes to connect and reply; evaluation as long
    min_replies: int  # valid training replies a round needs; with fewer it is tried again, then the arm fails
    max_update_norm: float | None = None  # largest accepted L2 norm of (reply - global model); None: no bound
    attempts: int = ROUND_ATTEMPTS  # tries of a round that gets too few valid training replies

    def missing_reason(self) -> str:
        """Return the failure reason of a node that did not reply in time."""
        return f"no reply within the round timeout ({self.timeout_s:g} s)"


@dataclass(frozen=True)
class Shortfall:
    """A training attempt that got fewer valid replies than the round needs."""

    valid: int
    needed: int
    asked: int
    reasons: tuple[str, ...]  # "node N: why" for every node of the arm without a valid reply


def run_rounds(
    strategy: Strategy, recorder: Recording, grid: ArmGrid, *, arm: str, arrays: ArrayRecord, rounds: range,
    policy: RoundPolicy, train_config: ConfigRecord, evaluate_config: ConfigRecord,
    evaluate_fn: Callable[[int, ArrayRecord], Callable[[], object]],
) -> ArrayRecord:
    """Run the ``rounds`` of ``strategy`` over ``grid`` and return the final global arrays.

    ``rounds`` are the run's own round numbers (``range(4, 6)``: a run of 5 rounds that
    resumes after round 3), for the nodes, the records and ``evaluate_fn(round, arrays)``.
    That runs on this thread after every round and returns the round's slow step (the
    central evaluation and the checkpoint), which runs on a thread of its own while the
    nodes train the next round: the nodes do not wait for the server's evaluation. One
    step runs at a time, in round order; the next round's step starts only once the one
    before it is done, and the loop returns (or raises that step's error) only when the
    last is. ``recorder`` is the recording strategy: ``strategy`` itself, or the one a DP
    wrapper wraps.

    Raises:
        RuntimeError: a round got fewer than ``policy.min_replies`` valid training replies in every attempt.
    """
    # leaving the block waits for the last step, also when a round fails: the last good round reaches the store
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"checkpoint-{arm}") as steps:
        pending: Future | None = None
        for server_round in rounds:
            arrays = _train(strategy, recorder, grid, arm, server_round, arrays, train_config, policy)
            _evaluate(strategy, recorder, grid, server_round, arrays, evaluate_config, policy)
            step = evaluate_fn(server_round, arrays)
            if pending is not None:
                pending.result()  # raises the previous step's error (a store that went away) before going on
            pending = steps.submit(step)
        if pending is not None:
            pending.result()
    return arrays


def _train(strategy: Strategy, recorder: Recording, grid: ArmGrid, arm: str, server_round: int, arrays: ArrayRecord,
           config: ConfigRecord, policy: RoundPolicy) -> ArrayRecord:
    """Run the training of one round, trying it again once if too few valid replies come; return the new arrays."""
    reference = {name: array.numpy() for name, array in arrays.items()}
    check = partial(check_train_reply, reference=reference, weight_key=recorder.weighted_by_key,
                    max_update_norm=policy.max_update_norm)
    short = None
    for attempt in range(1, policy.attempts + 1):
        deadline = time.monotonic() + policy.timeout_s
        nodes = _connected(grid, policy.min_replies, deadline)
        sent = list(strategy.configure_train(server_round, arrays, config, grid.pinned(nodes))) if nodes else []
        received = grid.send_and_receive(sent, timeout=max(0.0, deadline - time.monotonic()))
        replies, rejected = settle(sent, received, missing_reason=policy.missing_reason(), check=check)
        for reply, reason in rejected:
            log.warning("arm %s round %d: node %d's training reply %s", arm, server_round, reply.metadata.src_node_id,
                        reason)
        recorder.count_replies(server_round, [reply for reply, _ in rejected])
        valid = [reply for reply in replies if not reply.has_error()]
        missed = failures(replies) + [(node, NOT_CONNECTED) for node in grid.members if node not in nodes]
        short = shortfall(len(valid), policy.min_replies, asked=len(sent), missed=missed)
        if short is None:
            for node, reason in missed:
                recorder.note_failure(server_round, node, "train", reason)
            if missed:
                log.warning("arm %s round %d: going on with %d of %d nodes, without %s", arm, server_round, len(valid),
                            len(valid) + len(missed), "; ".join(f"node {n}: {_one_line(r)}" for n, r in missed))
            aggregated, _ = strategy.aggregate_train(server_round, valid)
            return arrays if aggregated is None else aggregated
        for node, reason in missed:
            recorder.note_failure(server_round, node, "train", f"{reason} (attempt {attempt} of {policy.attempts})")
        recorder.count_replies(server_round, valid)  # trained and sent, then dropped with the attempt
        if attempt < policy.attempts:
            log.warning("arm %s round %d: %s; trying the round again", arm, server_round, describe(short))
    raise RuntimeError(shortfall_message(arm, server_round, short, policy))


def _evaluate(strategy: Strategy, recorder: Recording, grid: ArmGrid, server_round: int, arrays: ArrayRecord,
              config: ConfigRecord, policy: RoundPolicy) -> None:
    """Let the arm's connected nodes evaluate the global arrays if this round has node evaluation."""
    if not recorder.evaluates(server_round):
        return
    grid.admit_new_nodes(timeout=policy.timeout_s)  # a node restarted during training evaluates already
    nodes = sorted(grid.get_node_ids())
    sent = list(strategy.configure_evaluate(server_round, arrays, config, grid.pinned(nodes))) if nodes else []
    received = grid.send_and_receive(sent, timeout=policy.timeout_s)
    replies, rejected = settle(sent, received, missing_reason=policy.missing_reason(), check=check_evaluate_reply)
    recorder.count_replies(server_round, [reply for reply, _ in rejected])
    missed = failures(replies) + [(node, NOT_CONNECTED) for node in grid.members if node not in nodes]
    for node, reason in missed:
        recorder.note_failure(server_round, node, "evaluate", reason)
    strategy.aggregate_evaluate(server_round, [reply for reply in replies if not reply.has_error()])


def _connected(grid: ArmGrid, needed: int, deadline: float) -> list[int]:
    """Return the arm's connected nodes, in id order, once ``needed`` are (or whichever are at ``deadline``).

    Restarted nodes that hold one of the arm's partitions are admitted on the way.
    """
    waiting = False
    while True:
        grid.admit_new_nodes(timeout=max(0.0, deadline - time.monotonic()))
        nodes = sorted(grid.get_node_ids())
        left = deadline - time.monotonic()
        if len(nodes) >= needed or left <= 0:
            return nodes
        if not waiting:
            log.info("%d of the %d nodes a round needs are connected; waiting up to %.0f s for more",
                     len(nodes), needed, left)
            waiting = True
        time.sleep(min(NODE_POLL_S, left))


def settle(
    sent: list[Message], received: Iterable[Message], *, missing_reason: str,
    check: Callable[[Message], str | None] | None = None,
) -> tuple[list[Message], list[tuple[Message, str]]]:
    """Return one reply per sent message in node-id order, and the (reply, reason) pairs that ``check`` rejected.

    A message without a reply gets an error reply with ``missing_reason``; an error the
    SuperLink sent in a node's place (it names the SuperLink as its sender) is re-addressed
    from the node; a reply ``check`` rejects is replaced by an error reply with the reason.
    """
    by_id = {message.metadata.message_id: message for message in sent}
    arrived: dict[str, Message] = {}
    for reply in received:
        arrived.setdefault(reply.metadata.reply_to_message_id, reply)
    settled: list[Message] = []
    rejected: list[tuple[Message, str]] = []
    for request in sorted(sent, key=lambda message: message.metadata.dst_node_id):
        reply = arrived.get(request.metadata.message_id)
        if reply is None:
            reply = _error_reply(request, ErrorCode.NODE_UNAVAILABLE, missing_reason)
        elif reply.has_error():
            if reply.metadata.src_node_id != request.metadata.dst_node_id:
                reply = _error_reply(request, reply.error.code, reply.error.reason or "error without a reason")
        elif check is not None and (reason := check(reply)) is not None:
            rejected.append((reply, reason))
            reply = _error_reply(request, ErrorCode.UNKNOWN, reason)
        settled.append(reply)
    unknown = set(arrived) - set(by_id)
    if unknown:
        log.warning("ignored %d replies to messages this round did not send", len(unknown))
    return settled, rejected


def _error_reply(request: Message, code: int, reason: str) -> Message:
    """Return an error reply to ``request`` as if its destination node had sent it."""
    return Message(Error(code=code, reason=reason), reply_to=request)


def check_train_reply(reply: Message, *, reference: Mapping[str, np.ndarray], weight_key: str,
                      max_update_norm: float | None) -> str | None:
    """Return why a training reply must be rejected (its records, weight or arrays), or None to accept it."""
    content = reply.content
    records_ok = len(content.array_records) == 1 and list(content.metric_records) == ["metrics"]
    if not records_ok:
        return (f"rejected: expected one ArrayRecord and one MetricRecord 'metrics', got "
                f"{sorted(content.array_records)} and {sorted(content.metric_records)}")
    problem = check_weight(weight_key, content["metrics"].get(weight_key))
    if problem is not None:
        return problem
    record = next(iter(content.array_records.values()))
    try:
        update = {name: array.numpy() for name, array in record.items()}
    except (ValueError, TypeError) as exc:
        return f"rejected: its arrays cannot be read as numpy ({exc})"
    return check_update(update, reference, max_update_norm=max_update_norm)


def check_evaluate_reply(reply: Message) -> str | None:
    """Return why an evaluation reply must be rejected (no metrics or no valid example count), or None."""
    content = reply.content
    if list(content.metric_records) != ["metrics"]:
        return f"rejected: expected one MetricRecord 'metrics', got {sorted(content.metric_records)}"
    return check_weight("num-examples", content["metrics"].get("num-examples"))


def failures(replies: Iterable[Message]) -> list[tuple[int, str]]:
    """Return (node id, reason) for every error reply."""
    return [(reply.metadata.src_node_id, reply.error.reason) for reply in replies if reply.has_error()]


def shortfall(valid: int, needed: int, *, asked: int, missed: list[tuple[int, str]]) -> Shortfall | None:
    """Return what a training attempt lacked when it got fewer than ``needed`` valid replies, else None."""
    if valid >= needed:
        return None
    return Shortfall(valid=valid, needed=needed, asked=asked,
                     reasons=tuple(f"node {node}: {_one_line(reason)}" for node, reason in missed))


def _one_line(reason: str, limit: int = 300) -> str:
    """Return ``reason`` on one line, cut to ``limit`` characters (a node's error may carry a traceback)."""
    line = " ".join(str(reason).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe(short: Shortfall) -> str:
    """Return a shortfall as one clause: how many replied, how many were needed, and why the others did not."""
    why = "; ".join(short.reasons) or "no node of the arm is connected"
    return f"{short.valid} valid training replies from {short.asked} nodes asked, {short.needed} needed ({why})"


def shortfall_message(arm: str, server_round: int, short: Shortfall, policy: RoundPolicy) -> str:
    """Return the one-line error of an arm whose round got too few valid replies in every attempt."""
    return (
        f"arm {arm} round {server_round}: {describe(short)} in the last of {policy.attempts} attempts of "
        f"{policy.timeout_s:g} s each: start the arm's nodes, lower the arm's min_replies "
        f"(now {policy.min_replies}), or raise its round_timeout_s"
    )
