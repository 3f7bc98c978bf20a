"""Client mods on the ClientApp: node config `client-mods`, and the tests' fault injector installed through it."""

from __future__ import annotations

import time
import tomllib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from clients.client_mods import ClientModsError, load_client_mods
from clients.client_app import NodeConfig, app, node_mods
from tests import faults_mod
from tests.faults_mod import HANG_TIMEOUTS, HUGE_FACTOR, fault_mod

REPO = Path(__file__).resolve().parents[1]
FAULT_MOD = "tests.faults_mod:fault_mod"
CALLS: list[str] = []  # what `recording_mod` saw, in order


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Set the identity a ClientApp process has, which Flower needs to build messages."""
    for name, value in {"_run_id": 1, "_node_id": 0, "_task_id": 1}.items():
        monkeypatch.setattr(TaskIdentity, name, value)


def recording_mod(msg, context, call_next):
    """Record the message type going in and the largest value it sees coming out (an operator's own mod)."""
    CALLS.append(f"in {msg.metadata.message_type}")
    reply = call_next(msg, context)
    CALLS.append(f"out {max(float(a.numpy().max()) for a in reply.content['arrays'].values())}")
    return reply


def _context(node_config: dict, run_config: dict | None = None) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config or {})


def _global_model() -> OrderedDict[str, np.ndarray]:
    return OrderedDict(weight=np.zeros((3, 4), dtype=np.float32), bias=np.zeros(3, dtype=np.float32))


def _train_message() -> Message:
    arrays = ArrayRecord(OrderedDict((k, Array(v)) for k, v in _global_model().items()))
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord({})}), dst_node_id=7,
                   message_type=MessageType.TRAIN)


def _honest_app(*mods) -> ClientApp:
    """Return a ClientApp whose train handler adds 0.5 to every array (an honest update) and whose query answers."""
    honest = ClientApp(mods=list(mods))

    @honest.train()
    def train(msg: Message, context: Context) -> Message:
        trained = OrderedDict((k, Array(a.numpy() + np.float32(0.5))) for k, a in msg.content["arrays"].items())
        return Message(RecordDict({"arrays": ArrayRecord(trained), "metrics": MetricRecord({"n": 1})}), reply_to=msg)

    @honest.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"node": ConfigRecord({"tier": "cpu"})}), reply_to=msg)

    return honest


def _sent(reply: Message) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in reply.content["arrays"].items()}


# --- the fault mod, applied by Flower's own ClientApp ---------------------------------------------


@pytest.mark.parametrize("fault", ["nan", "shape", "huge"])
def test_the_fault_mod_sabotages_the_honest_training_reply(fault):
    honest = _sent(_honest_app()(_train_message(), _context({})))

    sent = _sent(_honest_app(fault_mod)(_train_message(), _context({"fault": fault})))

    assert all(np.all(honest[name] == 0.5) for name in honest)
    if fault == "nan":
        assert np.isnan(sent["weight"]).any() and np.isnan(sent["bias"]).any()
    elif fault == "shape":
        assert sent["weight"].shape == (3, 4, 1) and sent["bias"].shape == (3,)
    else:
        np.testing.assert_allclose(sent["weight"], 0.5 * HUGE_FACTOR)


def test_the_fault_mod_leaves_a_node_without_fault_alone_and_names_the_fault_in_the_query_reply():
    query = Message(RecordDict(), dst_node_id=7, message_type=MessageType.QUERY)

    sent = _sent(_honest_app(fault_mod)(_train_message(), _context({})))
    faulty = _honest_app(fault_mod)(query, _context({"fault": "nan"})).content["node"]
    healthy = _honest_app(fault_mod)(query, _context({})).content["node"]

    assert all(np.all(sent[name] == 0.5) for name in sent)
    assert dict(faulty) == {"tier": "cpu", "fault": "nan"}
    assert dict(healthy) == {"tier": "cpu", "fault": ""}


def test_the_fault_mod_hangs_for_hang_timeouts_round_timeouts_then_replies_honestly():
    round_timeout = 0.02

    started = time.monotonic()
    sent = _sent(_honest_app(fault_mod)(_train_message(), _context({"fault": "hang"}, {"round-timeout-s": round_timeout})))

    assert time.monotonic() - started >= HANG_TIMEOUTS * round_timeout
    assert all(np.all(sent[name] == 0.5) for name in sent)


def test_the_fault_mod_refuses_an_unknown_fault_before_training():
    with pytest.raises(ValueError, match="fault='slow'.*remove it"):
        _honest_app(fault_mod)(_train_message(), _context({"fault": "slow"}))


# --- node config client-mods -----------------------------------------------------------------------


def test_client_mods_installs_the_named_mods_outermost_first_around_every_handler():
    CALLS.clear()
    config = {"client-mods": f"tests.test_client_mods:recording_mod, {FAULT_MOD}", "fault": "huge"}

    sent = _sent(_honest_app(node_mods)(_train_message(), _context(config)))

    np.testing.assert_allclose(sent["bias"], 0.5 * HUGE_FACTOR)
    assert CALLS == ["in train", f"out {0.5 * HUGE_FACTOR}"]  # outermost: it sees the fault mod's reply


def test_the_real_client_app_installs_client_mods_from_its_node_config():
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    run_config = {**table, "mode": "query", "dataset": "digits", "model": "logreg"}
    node_config = {"partition-id": 0, "num-partitions": 3, "tier": "cpu", "client-mods": FAULT_MOD, "fault": "huge"}
    query = Message(RecordDict(), dst_node_id=7, message_type=MessageType.QUERY)

    node = app(query, _context(node_config, run_config)).content["node"]

    assert node["fault"] == "huge" and node["tier"] == "cpu" and node["partition-id"] == 0
    assert node["num-train"] > 0 and node["worker-warm"] == 0.0


def test_node_config_is_parsed_once_into_a_typed_object():
    config = {"worker-socket": "/tmp/w.sock", "client-mods": FAULT_MOD, "partition-id": 0}

    first, again = NodeConfig.of(_context(config)), NodeConfig.of(_context(dict(config)))

    assert first is again
    assert first == NodeConfig(worker_socket="/tmp/w.sock", mods=(faults_mod.fault_mod,))
    assert NodeConfig.of(_context({})) == NodeConfig(worker_socket="", mods=())


@pytest.mark.parametrize(("spec", "reason"), [
    ("tests.faults_mod", "expected module:attribute"),
    ("no_such_module_x:mod", "ModuleNotFoundError: No module named 'no_such_module_x'"),
    ("tests.faults_mod:no_such_mod", "AttributeError"),
    ("tests.faults_mod:HUGE_FACTOR", "float is not callable"),
])
def test_a_bad_client_mods_entry_fails_in_one_line_naming_the_key_the_entry_and_the_fix(spec, reason):
    with pytest.raises(ClientModsError) as raised:
        load_client_mods(f"{FAULT_MOD},{spec}")

    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"node config client-mods entry {spec!r}: ")
    assert reason in message and "on its PYTHONPATH" in message and "remove the entry" in message


def test_a_bad_client_mods_entry_fails_the_message_through_the_app():
    with pytest.raises(ClientModsError, match="client-mods entry 'nowhere:mod'"):
        _honest_app(node_mods)(_train_message(), _context({"client-mods": "nowhere:mod"}))


def test_no_client_mods_means_none():
    assert load_client_mods("") == () and load_client_mods(" , ") == ()
