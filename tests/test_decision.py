"""Cost, time-to-target and recommendation arithmetic on hand-made rounds and arms."""

import re
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest

from flows.decision import CostModel, price, recommend, round_costs, server_kwh_estimate, time_to_target

REPO = Path(__file__).resolve().parents[1]
TARGET = 0.9


def _row(number, accuracy, *, seconds=10.0, bytes_=1000, cpu=0.0, gpu=0.0, server=0.0, node_kwh=0.0):
    return {"round": number, "accuracy": accuracy, "seconds": seconds, "bytes": bytes_,
            "cpu_seconds": cpu, "gpu_seconds": gpu, "server_seconds": server, "node_kwh": node_kwh}


def _arm(model, best, *, usd=None, rounds=None, final=None, total=None):
    """An arm summary whose time_to_target agrees with `best` and TARGET."""
    reached = best >= TARGET
    ttt = {"reached": reached, "round": rounds if reached else None, "seconds": 1.0 if reached else None,
           "bytes": 10 if reached else None, "usd": usd if reached else None, "kwh": 0.1 if reached else None,
           "kg_co2": 0.05 if reached else None, "best_accuracy": best}
    return {"model": model, "final_accuracy": best if final is None else final, "best_accuracy": best,
            "time_to_target": ttt, "total_usd": (usd or 0.1) * 2 if total is None else total}


# --- CostModel ----------------------------------------------------------------------------------


def test_cost_model_defaults_are_the_documented_price_table():
    cost = CostModel()

    assert (cost.gpu_hour_usd, cost.cpu_hour_usd, cost.gb_transfer_usd) == (1.006, 0.048, 0.09)
    assert (cost.kg_co2_per_kwh, cost.cpu_watts, cost.pue) == (0.48, 10.0, 1.0)


@pytest.mark.parametrize("bad", [{"gpu_hour_usd": -1.0}, {"cpu_watts": 0.0}, {"pue": 0.9}, {"gpu_hours": 1.0},
                                 {"gpu_watts": 300.0}])  # the nodes measure GPU energy: no GPU wattage to set
def test_cost_model_rejects_out_of_range_and_unknown_fields(bad):
    with pytest.raises(pydantic.ValidationError):
        CostModel(**bad)


def test_cost_model_is_frozen():
    with pytest.raises(pydantic.ValidationError):
        CostModel().gpu_hour_usd = 2.0


# --- round_costs --------------------------------------------------------------------------------

PRICES = CostModel(gpu_hour_usd=2.0, cpu_hour_usd=0.5, gb_transfer_usd=0.1, kg_co2_per_kwh=0.4,
                   cpu_watts=20.0, pue=1.5)
TWO_ROUNDS = [
    _row(1, 0.70, seconds=100.0, bytes_=2_000_000_000, cpu=720.0, gpu=360.0, server=180.0, node_kwh=0.029),
    _row(2, 0.85, seconds=50.0, bytes_=500_000_000, cpu=1800.0, gpu=0.0, server=0.0, node_kwh=0.01),
]


def test_round_cost_is_the_price_table_applied_by_hand():
    # Round 1: CPU time 720 + 180 = 900 s = 0.25 h; GPU 360 s = 0.1 h; 2 GB.
    usd_1 = 0.25 * 0.5 + 0.1 * 2.0 + 2 * 0.1                 # 0.125 + 0.2 + 0.2 = 0.525
    server_1 = 180 * 20 / 3_600_000                         # server estimate: 180 s at 20 W = 0.001 kWh
    kwh_1 = (0.029 + server_1) * 1.5                        # measured 0.029 + 0.001 = 0.03 kWh, * PUE = 0.045
    # Round 2: CPU time 1800 s = 0.5 h; no GPU; 0.5 GB; no server time.
    usd_2 = 0.5 * 0.5 + 0.5 * 0.1                           # 0.25 + 0.05 = 0.3
    kwh_2 = 0.01 * 1.5                                      # measured 0.01 kWh * PUE = 0.015

    rows = round_costs(TWO_ROUNDS, PRICES)

    assert [r["usd"] for r in rows] == pytest.approx([usd_1, usd_2])
    assert [r["usd"] for r in rows] == pytest.approx([0.525, 0.3])
    assert [r["server_kwh_estimate"] for r in rows] == pytest.approx([0.001, 0.0])
    assert [r["kwh"] for r in rows] == pytest.approx([kwh_1, kwh_2])
    assert [r["kwh"] for r in rows] == pytest.approx([0.045, 0.015])
    assert [r["kg_co2"] for r in rows] == pytest.approx([0.045 * 0.4, 0.015 * 0.4])


def test_energy_is_the_measured_kwh_times_pue_whatever_the_seconds():
    # the same measured energy priced for an hour of CPU and for an hour of GPU: the seconds set the dollars only
    on_cpu = price(cpu_seconds=3600.0, gpu_seconds=0.0, bytes=0, device_kwh=0.2, cost=PRICES)
    on_gpu = price(cpu_seconds=0.0, gpu_seconds=3600.0, bytes=0, device_kwh=0.2, cost=PRICES)

    assert on_cpu["kwh"] == on_gpu["kwh"] == pytest.approx(0.2 * 1.5)
    assert on_cpu["kg_co2"] == pytest.approx(0.2 * 1.5 * 0.4)
    assert (on_cpu["usd"], on_gpu["usd"]) == pytest.approx((0.5, 2.0))


def test_server_energy_is_estimated_from_its_seconds_at_cpu_watts():
    assert server_kwh_estimate(3600.0, PRICES) == pytest.approx(20.0 / 1000)  # one hour at 20 W
    assert server_kwh_estimate(0.0, PRICES) == 0.0


def test_round_costs_accumulate_and_keep_the_inputs():
    rows = round_costs(TWO_ROUNDS, PRICES)

    assert [r["cum_seconds"] for r in rows] == [100.0, 150.0]
    assert [r["cum_bytes"] for r in rows] == [2_000_000_000, 2_500_000_000]
    assert [r["cum_usd"] for r in rows] == pytest.approx([0.525, 0.825])
    assert [r["cum_kwh"] for r in rows] == pytest.approx([0.045, 0.06])
    assert [r["cum_kg_co2"] for r in rows] == pytest.approx([0.018, 0.024])
    assert all(rows[i].items() >= TWO_ROUNDS[i].items() for i in range(2))
    assert "usd" not in TWO_ROUNDS[0], "the input rows must not be modified"


def test_no_rounds_cost_nothing():
    assert round_costs([], PRICES) == []


@pytest.mark.parametrize(("rows", "names"), [
    ([{k: v for k, v in _row(1, 0.5).items() if k != "gpu_seconds"}], ["'gpu_seconds'", "per_round[0]"]),
    ([_row(1, 0.5), _row(2, 0.6, bytes_=-1)], ["bytes=-1", "round 2"]),
    ([_row(1, 0.5, cpu=float("nan"))], ["cpu_seconds=nan"]),
    ([{k: v for k, v in _row(1, 0.5).items() if k != "node_kwh"}], ["'node_kwh'", "codecarbon"]),
    ([_row(1, 0.5, node_kwh=-0.1)], ["node_kwh=-0.1"]),
    ([_row(1, 0.5), _row(1, 0.6)], ["round 1 after round 1", "sort the rows"]),
    ([_row(2, 0.5), _row(1, 0.6)], ["round 1 after round 2"]),
    ([_row(1.5, 0.5)], ["round=1.5", "integer"]),
])
def test_invalid_rounds_fail_with_one_line_naming_the_key(rows, names):
    with pytest.raises(ValueError) as error:
        round_costs(rows, PRICES)

    message = str(error.value)
    assert "\n" not in message
    for name in names:
        assert name in message


# --- time_to_target -----------------------------------------------------------------------------


def _three_rounds():
    return round_costs([_row(1, 0.50, cpu=3600.0), _row(2, 0.80, gpu=3600.0), _row(3, 0.90, server=60.0)],
                       CostModel())


def test_time_to_target_takes_the_cumulative_values_of_the_first_reaching_round():
    rows = _three_rounds()

    result = time_to_target(rows, 0.8)

    assert result["reached"] is True and result["round"] == 2
    for key in ("seconds", "bytes", "usd", "kwh", "kg_co2"):
        assert result[key] == rows[1][f"cum_{key}"]
    assert result["usd"] == pytest.approx(0.048 + 1.006 + 2 * 1000 / 1e9 * 0.09)
    assert result["best_accuracy"] == 0.90


def test_time_to_target_counts_a_round_exactly_at_the_target():
    assert time_to_target(_three_rounds(), 0.5)["round"] == 1


def test_time_to_target_not_reached_is_none_with_the_best_accuracy():
    result = time_to_target(_three_rounds(), 0.95)

    assert result == {"reached": False, "round": None, "seconds": None, "bytes": None, "usd": None,
                      "kwh": None, "kg_co2": None, "best_accuracy": 0.90}


def test_time_to_target_without_rounds_is_an_error():
    with pytest.raises(ValueError, match="no rounds"):
        time_to_target([], 0.9)


# --- recommend ----------------------------------------------------------------------------------

LARGE_ONLY = {"large": _arm("resnet18", 0.95, usd=0.5, rounds=4), "small": _arm("cnn", 0.88)}
BOTH = {"large": _arm("resnet18", 0.95, usd=0.05678, rounds=5, final=0.94),
        "small": _arm("cnn", 0.93, usd=0.01234, rounds=3, final=0.92)}
NEITHER = {"large": _arm("resnet18", 0.87, final=0.86), "small": _arm("cnn", 0.85)}


def test_large_wins_when_the_small_model_does_not_reach_the_target():
    result = recommend(LARGE_ONLY, TARGET)

    assert result["choice"] == "large"
    assert result["reason"] == "the only arm that reached the target"
    assert result["margin"] == {"arm": "large", "accuracy_over_target": pytest.approx(0.05),
                                "final_accuracy_over_target": pytest.approx(0.05), "cost_ratio": {}}
    assert "the small model would also qualify if the target were at most 0.880 (its best accuracy)" \
        in result["what_would_change"]
    assert result["text"].startswith("Choose the large model (resnet18): it reached the target accuracy 0.900 "
                                     "in round 4 for $0.5000.")
    assert "the small model did not reach it (best accuracy 0.880)" in result["text"].lower()


def test_small_wins_when_both_reach_and_it_is_cheaper():
    result = recommend(BOTH, TARGET)

    assert result["choice"] == "small"
    assert result["reason"] == "lowest cost to reach the target"
    assert result["margin"]["accuracy_over_target"] == pytest.approx(0.93 - 0.9)
    assert result["margin"]["final_accuracy_over_target"] == pytest.approx(0.92 - 0.9)
    assert result["margin"]["cost_ratio"] == {"large": pytest.approx(0.05678 / 0.01234)}
    changes = result["what_would_change"]
    assert ("the large model would be chosen, as the only arm to qualify, if the target were above 0.930 "
            "(the small model's best accuracy) and at most 0.950 (its own)") in changes
    assert "the large model would be chosen if its cost to reach the target fell below $0.01234 " \
           "(the small model's); it was $0.05678" in changes
    assert "$0.01234" in result["text"] and "$0.05678" in result["text"]


def test_neither_reaching_says_so_and_names_the_closest():
    result = recommend(NEITHER, TARGET)

    assert result["choice"] is None
    assert result["text"].startswith("Neither arm reached the target accuracy 0.900.")
    assert "the large model came closest with a best accuracy of 0.870" in result["text"].lower()
    assert result["margin"]["arm"] == "large"
    assert result["margin"]["accuracy_over_target"] == pytest.approx(-0.03)
    assert result["what_would_change"] == [
        "the large model would qualify if the target were at most 0.870 (its best accuracy)",
        "the small model would qualify if the target were at most 0.850 (its best accuracy)",
    ]


def test_privacy_excludes_an_arm_even_when_it_is_cheaper():
    result = recommend(BOTH, TARGET, privacy_ok={"small": False, "large": True})

    assert result["choice"] == "large"
    assert "the small model is excluded by the privacy requirement" in result["text"].lower()
    assert result["margin"]["cost_ratio"] == {}
    assert "without the privacy requirement the small model would be chosen instead: it reached the target " \
           "for $0.01234 against $0.05678" in result["what_would_change"]


def test_no_arm_qualifies_when_the_only_reaching_arm_fails_privacy():
    result = recommend(LARGE_ONLY, TARGET, privacy_ok={"large": False})

    assert result["choice"] is None
    assert result["text"].startswith("No arm qualifies: the large model reached the target accuracy 0.900 but "
                                     "is excluded by the privacy requirement.")
    assert "neither arm reached" not in result["text"].lower()
    assert "the large model would qualify if the privacy requirement were waived; it reached the target for " \
           "$0.5000" in result["what_would_change"]


def test_ties_on_cost_go_to_lower_total_cost_then_fewer_rounds():
    tied_cost = {"a": _arm("m1", 0.91, usd=0.2, rounds=2, total=0.9),
                 "b": _arm("m2", 0.92, usd=0.2, rounds=5, total=0.4)}
    tied_total = {"a": _arm("m1", 0.91, usd=0.2, rounds=6, total=0.4),
                  "b": _arm("m2", 0.92, usd=0.2, rounds=5, total=0.4)}

    assert recommend(tied_cost, TARGET)["choice"] == "b"
    assert recommend(tied_cost, TARGET)["reason"] == "tied on cost to reach the target; lowest total cost"
    assert recommend(tied_total, TARGET)["choice"] == "b"
    assert recommend(tied_total, TARGET)["reason"].endswith("fewest rounds")


def test_dollars_keep_four_significant_digits_without_exponents():
    arms = {"large": _arm("m", 0.95, usd=9.99996, rounds=1), "small": _arm("n", 0.91, usd=0.0000123456, rounds=2)}

    text = recommend(arms, TARGET)["text"]

    assert "$0.00001235" in text and "$10.00" in text


def _input_numbers(arms):
    values = {TARGET}
    for arm in arms.values():
        values |= {arm["final_accuracy"], arm["best_accuracy"], arm["total_usd"]}
        values |= {v for k, v in arm["time_to_target"].items() if k != "reached" and v is not None}
    return values


def _is_rounding_of_an_input(token, values):
    decimals = len(token.partition(".")[2])
    return any(abs(float(token) - v) <= 0.5 * 10 ** -decimals + 1e-12 for v in values)


@pytest.mark.parametrize(("arms", "privacy_ok"), [
    (LARGE_ONLY, None), (BOTH, None), (NEITHER, None), (BOTH, {"small": False}), (LARGE_ONLY, {"large": False}),
    ({"large": _arm("vit-b16", 0.97, usd=123.456, rounds=12), "small": _arm("mlp2", 0.901, usd=1.5, rounds=7),
      "tiny": _arm("lr", 0.6)}, None),
])
def test_every_number_in_the_text_is_an_input_value(arms, privacy_ok):
    result = recommend(arms, TARGET, privacy_ok=privacy_ok)
    values = _input_numbers(arms)

    for sentence in [result["text"], *result["what_would_change"]]:
        tokens = re.findall(r"(?<![\w.])\d+(?:\.\d+)?", sentence)
        assert tokens, sentence
        for token in tokens:
            assert _is_rounding_of_an_input(token, values), f"{token} in {sentence!r} is not an input value"
        for dollars in re.findall(r"\$(\d+(?:\.\d+)?)", sentence):
            assert len(dollars.replace(".", "").lstrip("0")) == 4, f"${dollars} is not 4 significant digits"
        for accuracy in re.findall(r"accuracy (?:of )?(\d+\.\d+)", sentence):
            assert len(accuracy.partition(".")[2]) == 3, accuracy
    assert 1 <= len(re.findall(r"[.!?](?:\s|$)", result["text"])) <= 3, result["text"]


@pytest.mark.parametrize(("arms", "kwargs", "names"), [
    ({"large": {k: v for k, v in _arm("m", 0.95, usd=1.0, rounds=1).items() if k != "total_usd"}}, {},
     ["'large'", "'total_usd'"]),
    ({"large": _arm("m", 0.95, usd=1.0, rounds=1)}, {"privacy_ok": {"huge": False}}, ["'huge'"]),
    ({"large": {**_arm("m", 0.95, usd=1.0, rounds=1), "best_accuracy": 0.85}}, {},
     ["'large'", "same target"]),
    ({}, {}, ["no arms"]),
])
def test_invalid_arms_fail_with_one_line_naming_the_key(arms, kwargs, names):
    with pytest.raises(ValueError) as error:
        recommend(arms, TARGET, **kwargs)

    message = str(error.value)
    assert "\n" not in message
    for name in names:
        assert name in message


# --- imports ------------------------------------------------------------------------------------


def test_importing_decision_pulls_in_neither_prefect_nor_flower_nor_torch():
    code = ("import sys, flows.decision; "
            "print(sorted(m for m in ('prefect', 'flwr', 'torch') if m in sys.modules))")

    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "[]"
