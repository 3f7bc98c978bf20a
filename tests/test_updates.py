"""Update checks the server runs before aggregating, and the fault injector (tests/faults_mod.py) that breaks them."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from tests.faults_mod import CRASH_EXIT_CODE, FAULTS, HUGE_FACTOR, apply_fault, node_fault
from server._updates import check_update, check_weight, update_norm

REPO = Path(__file__).resolve().parents[1]


def _model() -> OrderedDict[str, np.ndarray]:
    return OrderedDict(weight=np.zeros((3, 4), dtype=np.float32), bias=np.zeros(3, dtype=np.float32))


def _trained(step: float = 0.1) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((name, array + np.float32(step)) for name, array in _model().items())


# --- accepted -----------------------------------------------------------------------------------


def test_a_well_formed_update_within_the_bound_is_accepted():
    update = _trained(0.1)

    assert check_update(update, _model()) is None
    assert check_update(update, _model(), max_update_norm=update_norm(update, _model()) * 1.01) is None


def test_update_norm_is_the_l2_norm_of_the_difference_over_all_arrays():
    reference = OrderedDict(a=np.zeros(2, dtype=np.float32), b=np.ones(1, dtype=np.float32))
    update = OrderedDict(a=np.array([3.0, 0.0], dtype=np.float32), b=np.array([5.0], dtype=np.float32))

    assert update_norm(update, reference) == pytest.approx(5.0)  # sqrt(3² + 4²)


# --- rejected -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("update", "expected"),
    [
        (OrderedDict(weight=np.zeros((3, 4), np.float32)), "missing ['bias']"),
        (OrderedDict(weight=np.zeros((3, 4), np.float32), bias=np.zeros(3, np.float32), x=np.zeros(1, np.float32)),
         "unexpected ['x']"),
        (OrderedDict(bias=np.zeros(3, np.float32), weight=np.zeros((3, 4), np.float32)), "order"),
        (OrderedDict(weight=np.zeros((4, 3), np.float32), bias=np.zeros(3, np.float32)),
         "'weight' has shape (4, 3), expected (3, 4)"),
        (OrderedDict(weight=np.zeros((3, 4), np.float64), bias=np.zeros(3, np.float32)),
         "'weight' has dtype float64, expected float32"),
        (OrderedDict(weight=np.zeros((3, 4), np.float32), bias=np.array([0, np.nan, 0], np.float32)),
         "'bias' holds 1 NaN/Inf values"),
        (OrderedDict(weight=np.full((3, 4), np.inf, np.float32), bias=np.zeros(3, np.float32)),
         "'weight' holds 12 NaN/Inf values"),
    ],
    ids=["missing", "extra", "order", "shape", "dtype", "nan", "inf"],
)
def test_malformed_or_non_finite_updates_are_rejected_with_the_reason(update, expected):
    reason = check_update(update, _model())

    assert reason is not None and reason.startswith("rejected: ")
    assert expected in reason


def test_an_update_past_the_norm_bound_is_rejected_and_no_bound_accepts_it():
    update = _trained(10.0)  # norm sqrt(15) * 10 ≈ 38.7

    reason = check_update(update, _model(), max_update_norm=5.0)

    assert reason is not None and reason.startswith("rejected: update norm 38.7")
    assert "max_update_norm 5" in reason
    assert check_update(update, _model(), max_update_norm=None) is None


def test_an_update_whose_norm_overflows_is_rejected_by_the_bound():
    reference = OrderedDict(a=np.zeros(2, dtype=np.float64))
    update = OrderedDict(a=np.array([1e300, 1e300], dtype=np.float64))  # finite, but its square is not

    assert check_update(update, reference, max_update_norm=1e6).startswith("rejected: update norm inf")


@pytest.mark.parametrize("weight", [0, -3, math.nan, math.inf, None, True, [1.0, 2.0], "12"])
def test_aggregation_weights_must_be_positive_finite_numbers(weight):
    reason = check_weight("num-examples", weight)

    assert reason is not None and reason.startswith("rejected: metric 'num-examples'")


def test_positive_weights_are_accepted():
    assert check_weight("num-examples", 120) is None
    assert check_weight("dp-unit-weight", 1.0) is None


# --- fault injection (test tool) ----------------------------------------------------------------


def test_fault_defaults_to_none_and_unknown_faults_fail_naming_the_choices():
    assert node_fault({}) == ""
    assert node_fault({"fault": "nan"}) == "nan"

    with pytest.raises(ValueError, match="fault='slow'.*'hang'.*remove it"):
        node_fault({"fault": "slow"})


@pytest.mark.parametrize(("fault", "expected"), [("nan", "NaN/Inf"), ("shape", "shape"), ("huge", "update norm")])
def test_each_injected_bad_update_is_rejected_by_the_server_checks(fault, expected):
    received, trained = _model(), _trained(0.1)

    sent = apply_fault(fault, trained, received, hang_seconds=0.0)

    assert check_update(trained, received, max_update_norm=10.0) is None  # the honest update passes
    reason = check_update(sent, received, max_update_norm=10.0)
    assert reason is not None and expected in reason


def test_huge_scales_the_update_not_the_model():
    received = OrderedDict(w=np.full(4, 2.0, dtype=np.float32))
    trained = OrderedDict(w=np.full(4, 2.5, dtype=np.float32))

    sent = apply_fault("huge", trained, received, hang_seconds=0.0)

    assert sent["w"].dtype == np.float32
    np.testing.assert_allclose(sent["w"], 2.0 + 0.5 * HUGE_FACTOR)
    assert update_norm(sent, received) == pytest.approx(update_norm(trained, received) * HUGE_FACTOR, rel=1e-6)


def test_no_fault_and_hang_leave_the_arrays_intact_and_hang_sleeps_first():
    received, trained = _model(), _trained(0.1)

    started = time.monotonic()
    hung = apply_fault("hang", trained, received, hang_seconds=0.3)

    assert time.monotonic() - started >= 0.3
    for sent in (hung, apply_fault("", trained, received, hang_seconds=0.0)):
        assert list(sent) == list(trained)
        assert all(np.array_equal(sent[name], trained[name]) for name in trained)


def test_crash_ends_the_process_with_the_injected_exit_code():
    code = ("import numpy as np; from tests.faults_mod import apply_fault\n"
            "apply_fault('crash', {'w': np.zeros(2)}, {'w': np.zeros(2)}, hang_seconds=0)\n"
            "print('still running')")

    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)

    assert result.returncode == CRASH_EXIT_CODE
    assert "still running" not in result.stdout


def test_every_listed_fault_is_accepted_by_the_node_config_reader():
    assert [node_fault({"fault": fault}) for fault in FAULTS] == list(FAULTS)


# --- imports ------------------------------------------------------------------------------------


def test_update_checks_import_neither_flower_nor_prefect_nor_torch():
    code = ("import sys, server._updates; "
            "print(sorted(m for m in ('prefect', 'flwr', 'torch', 'minio') if m in sys.modules))")

    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "[]"
