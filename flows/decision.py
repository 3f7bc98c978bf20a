"""Turn per-round measurements into cost, time-to-target and a plain-English recommendation.

Plain functions over plain values: no Prefect, no Flower, no torch, so the decision can be
unit-tested and reused by the report, the CLI and the UI alike.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# What each per-round input means; used in error messages so they say what was expected.
_ROUND_KEYS = {
    "round": "the 1-based round number",
    "accuracy": "central accuracy after the round",
    "seconds": "the round's wall-clock seconds",
    "bytes": "bytes sent plus received in the round",
    "cpu_seconds": "summed client CPU-process seconds on CPU devices; 0 when every client used a GPU",
    "gpu_seconds": "summed client seconds on GPU devices; 0 when no client used a GPU",
    "server_seconds": "server aggregation plus evaluation seconds",
    "node_kwh": "kWh the nodes measured with codecarbon for their training and evaluation (CPU, RAM, GPU; no PUE)",
}
_COST_KEYS = ("usd", "kwh", "kg_co2")
_ARM_KEYS = ("model", "final_accuracy", "best_accuracy", "time_to_target", "total_usd")


class CostModel(BaseModel):
    """Prices that turn seconds, bytes and measured energy into dollars, facility energy and CO2."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # USD per GPU-hour: AWS EC2 on-demand g5.xlarge (1 NVIDIA A10G) us-east-1 Linux list price, 2025.
    gpu_hour_usd: float = Field(1.006, ge=0)
    # USD per vCPU-hour: AWS EC2 on-demand m5.large us-east-1 Linux list price, 2025 ($0.096/h for 2 vCPUs).
    cpu_hour_usd: float = Field(0.048, ge=0)
    # USD per GB transferred: AWS data transfer out to the internet, first 10 TB/month tier.
    gb_transfer_usd: float = Field(0.09, ge=0)
    # kg CO2 per kWh: Ember Global Electricity Review 2024, world average grid carbon intensity 2023 (480 g/kWh).
    kg_co2_per_kwh: float = Field(0.48, ge=0)
    # Watts drawn by one busy CPU core, used only to estimate the server's aggregation and central
    # evaluation energy (the nodes measure theirs): Intel Xeon Platinum 8175M (AWS m5) TDP per core, 240 W / 24.
    cpu_watts: float = Field(10.0, gt=0)
    # Data-centre power usage effectiveness (facility power / IT power); 1.0 counts the devices only and
    # ignores cooling. Uptime Institute Global Data Center Survey 2023 reports an average of 1.58.
    pue: float = Field(1.0, ge=1.0)
    # Serving (flows/deployment.py prices a replica as its vCPUs plus its peak memory, for the hours its
    # measured throughput needs): USD per vCPU-hour, AWS Fargate Linux/x86 on-demand us-east-1 list price, 2025.
    serving_vcpu_hour_usd: float = Field(0.04048, ge=0)
    # USD per GB-hour of a serving replica's memory: AWS Fargate Linux/x86 on-demand us-east-1 list price, 2025.
    serving_gb_hour_usd: float = Field(0.004445, ge=0)


def _check_round_row(index: int, row: dict) -> None:
    """Raise ValueError unless `row` holds every per-round key as a finite, non-negative number."""
    label = f"per_round[{index}]" + (f" (round {row['round']})" if "round" in row else "")
    for key, meaning in _ROUND_KEYS.items():
        if key not in row:
            raise ValueError(f"{label} lacks {key!r} ({meaning}); add it to every row")
        value = row[key]
        kind = numbers.Integral if key == "round" else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value < 0:
            expected = "an integer >= 0" if key == "round" else "a finite number >= 0"
            raise ValueError(f"{label} has {key}={value!r}, expected {expected} ({meaning}); fix the measurement")


def _check_round_order(per_round: list[dict]) -> None:
    """Raise ValueError unless round numbers strictly increase."""
    for index in range(1, len(per_round)):
        previous, current = per_round[index - 1]["round"], per_round[index]["round"]
        if current <= previous:
            raise ValueError(
                f"per_round[{index}] has round {current} after round {previous}; rounds must strictly "
                "increase, so sort the rows by round and drop duplicates"
            )


def price(*, cpu_seconds: float, gpu_seconds: float, bytes: int, device_kwh: float,
          cost: CostModel) -> dict[str, float]:
    """Return the usd of some CPU seconds, GPU seconds and bytes, and the kwh and kg_co2 of `device_kwh` with PUE."""
    usd = (
        cpu_seconds / 3600 * cost.cpu_hour_usd
        + gpu_seconds / 3600 * cost.gpu_hour_usd
        + bytes / 1e9 * cost.gb_transfer_usd
    )
    kwh = device_kwh * cost.pue
    return {"usd": usd, "kwh": kwh, "kg_co2": kwh * cost.kg_co2_per_kwh}


def server_kwh_estimate(server_seconds: float, cost: CostModel) -> float:
    """Estimate the server's device kWh: its aggregation and evaluation seconds on one busy core at cpu_watts."""
    return server_seconds * cost.cpu_watts / 3.6e6


def _round_cost(row: dict, cost: CostModel) -> dict[str, float]:
    """Return the usd, kwh, kg_co2 and server_kwh_estimate of one validated round (the server is billed as CPU)."""
    server_kwh = server_kwh_estimate(row["server_seconds"], cost)
    return {**price(cpu_seconds=row["cpu_seconds"] + row["server_seconds"], gpu_seconds=row["gpu_seconds"],
                    bytes=row["bytes"], device_kwh=row["node_kwh"] + server_kwh, cost=cost),
            "server_kwh_estimate": server_kwh}


def round_costs(per_round: list[dict], cost: CostModel) -> list[dict]:
    """Price every round and add running totals.

    Per round, with CPU time = cpu_seconds + server_seconds (the server is billed as CPU):

        usd                 = CPU time / 3600 * cpu_hour_usd + gpu_seconds / 3600 * gpu_hour_usd
                              + bytes / 1e9 * gb_transfer_usd
        server_kwh_estimate = server_seconds * cpu_watts / 3.6e6     (the server does not measure)
        kwh                 = (node_kwh + server_kwh_estimate) * pue  (node_kwh: measured on the nodes)
        kg_co2              = kwh * kg_co2_per_kwh

    Args:
        per_round: rows with keys round, accuracy, seconds, bytes, cpu_seconds, gpu_seconds,
            server_seconds and node_kwh, in increasing round order; other keys are kept as they are.
        cost: the price table.

    Returns:
        One new dict per round: the input keys plus usd, server_kwh_estimate, kwh, kg_co2 and the
        cumulative cum_seconds, cum_bytes, cum_usd, cum_kwh and cum_kg_co2 up to and including that round.

    Raises:
        ValueError: a key is missing, a value is negative or not a finite number, or the rounds do
            not strictly increase; the message names the row, the key and the fix.
    """
    for index, row in enumerate(per_round):
        _check_round_row(index, row)
    _check_round_order(per_round)
    totals = dict.fromkeys(("seconds", "bytes", *_COST_KEYS), 0)
    rows = []
    for row in per_round:
        priced = {**row, **_round_cost(row, cost)}
        for key in totals:
            totals[key] += priced[key]
            priced[f"cum_{key}"] = totals[key]
        rows.append(priced)
    return rows


def time_to_target(rows: list[dict], target: float) -> dict[str, Any]:
    """Return the cumulative time, traffic and cost up to the first round whose accuracy reaches `target`.

    Args:
        rows: the output of `round_costs` for one arm (at least one round).
        target: the accuracy to reach; a round reaches it when its accuracy >= target.

    Returns:
        {"reached", "round", "seconds", "bytes", "usd", "kwh", "kg_co2", "best_accuracy"}: the
        cumulative values of the first reaching round, or reached False and None for everything
        but best_accuracy when no round reached the target.

    Raises:
        ValueError: `rows` is empty or `target` is not a finite number.
    """
    if not rows:
        raise ValueError("time_to_target got no rounds; pass the round_costs rows of an arm that completed a round")
    if not math.isfinite(target):
        raise ValueError(f"target accuracy is {target!r}, expected a finite number such as 0.9")
    best_accuracy = max(row["accuracy"] for row in rows)
    first = next((row for row in rows if row["accuracy"] >= target), None)
    if first is None:
        return {"reached": False, "round": None, "seconds": None, "bytes": None,
                "usd": None, "kwh": None, "kg_co2": None, "best_accuracy": best_accuracy}
    cumulative = {key: first[f"cum_{key}"] for key in ("seconds", "bytes", *_COST_KEYS)}
    return {"reached": True, "round": first["round"], **cumulative, "best_accuracy": best_accuracy}


def _acc(value: float) -> str:
    """Format an accuracy with 3 decimals."""
    return f"{value:.3f}"


def _usd(value: float) -> str:
    """Format dollars with 4 significant digits and no exponent, e.g. $0.01234 or $12.50."""
    if value == 0:
        return "$0"
    decimals = 3 - math.floor(math.log10(abs(value)))
    rounded = round(value, decimals)
    decimals = 3 - math.floor(math.log10(abs(rounded)))  # 9.9996 rounds up to 10.00, not 10.000
    return f"${round(value, decimals):.{max(decimals, 0)}f}"


def _check_arms(arms: dict[str, dict], target: float, privacy_ok: dict[str, bool]) -> None:
    """Raise ValueError unless every arm carries the keys `recommend` reads and agrees with `target`."""
    if not arms:
        raise ValueError("recommend got no arms; pass at least one arm's summary")
    if not math.isfinite(target):
        raise ValueError(f"target accuracy is {target!r}, expected a finite number such as 0.9")
    for name, arm in arms.items():
        for key in _ARM_KEYS:
            if key not in arm:
                raise ValueError(f"arm {name!r} lacks {key!r}; add it (expected keys: {', '.join(_ARM_KEYS)})")
        ttt = arm["time_to_target"]
        reached = ttt.get("reached")
        if reached is None or (reached and None in (ttt.get("usd"), ttt.get("round"))):
            raise ValueError(f"arm {name!r}: time_to_target is incomplete; pass the output of time_to_target")
        if reached != (arm["best_accuracy"] >= target):
            raise ValueError(
                f"arm {name!r}: best_accuracy {arm['best_accuracy']} and time_to_target reached={reached} "
                f"disagree for target {target}; compute time_to_target with the same target"
            )
    unknown = sorted(set(privacy_ok) - set(arms))
    if unknown:
        raise ValueError(f"privacy_ok names unknown arm(s) {unknown}; use arm names from {sorted(arms)}")


def _rank_key(arm: dict) -> tuple:
    """Order candidates: cheapest to reach the target (plus serving, where priced), then overall, then fewest rounds."""
    ttt = arm["time_to_target"]
    return ttt["usd"] + arm.get("serving_usd", 0.0), arm["total_usd"], ttt["round"]


def _tie_reason(choice: dict, others: list[dict]) -> str:
    """Say which rule picked `choice` over the other candidates."""
    if all(_rank_key(o)[0] > _rank_key(choice)[0] for o in others):
        return "lowest cost to reach the target" + (" plus serving" if "serving_usd" in choice else "")
    if all(_rank_key(o)[:2] > _rank_key(choice)[:2] for o in others):
        return "tied on cost to reach the target; lowest total cost"
    if all(_rank_key(o) > _rank_key(choice) for o in others):
        return "tied on cost to reach the target and total cost; fewest rounds"
    return "tied on cost, total cost and rounds; first by arm name"


def _chosen(arms: dict[str, dict], target: float, choice: str, candidates: list[str],
            excluded: list[str]) -> dict[str, Any]:
    """Build the recommendation when `choice` is the best of the arms that qualify."""
    arm = arms[choice]
    ttt_usd = arm["time_to_target"]["usd"]
    others = [name for name in candidates if name != choice]
    cost_ratio = {name: (arms[name]["time_to_target"]["usd"] / ttt_usd if ttt_usd else None) for name in others}
    margin = {"arm": choice, "accuracy_over_target": arm["best_accuracy"] - target,
              "final_accuracy_over_target": arm["final_accuracy"] - target, "cost_ratio": cost_ratio}
    sentences = [f"Choose the {choice} model ({arm['model']}): it reached the target accuracy {_acc(target)} "
                 f"in round {arm['time_to_target']['round']} for {_usd(ttt_usd)}."]
    if others:
        listed = " and ".join(f"the {n} model ({_usd(arms[n]['time_to_target']['usd'])})" for n in others)
        sentences.append(f"{listed[0].upper()}{listed[1:]} also reached it.")
    left_out = [f"the {n} model did not reach it (best accuracy {_acc(arms[n]['best_accuracy'])})"
                for n in arms if n not in candidates and n not in excluded]
    left_out += [f"the {n} model is excluded by the privacy requirement" for n in excluded]
    if left_out:
        joined = "; ".join(left_out)
        sentences.append(f"{joined[0].upper()}{joined[1:]}.")
    reason = _tie_reason(arm, [arms[n] for n in others]) if others else "the only arm that reached the target"
    return {"choice": choice, "reason": reason, "margin": margin,
            "what_would_change": _changes(arms, choice=choice, excluded=excluded), "text": " ".join(sentences)}


def _none_chosen(arms: dict[str, dict], target: float, excluded: list[str]) -> dict[str, Any]:
    """Build the recommendation when no arm qualifies."""
    blocked = [n for n in excluded if arms[n]["time_to_target"]["reached"]]
    rest = sorted((n for n in arms if n not in blocked), key=lambda n: -arms[n]["best_accuracy"])
    closest = rest[0] if rest else max(arms, key=lambda n: arms[n]["best_accuracy"])
    margin = {"arm": closest, "accuracy_over_target": arms[closest]["best_accuracy"] - target,
              "final_accuracy_over_target": arms[closest]["final_accuracy"] - target, "cost_ratio": {}}
    if blocked:
        verb = "is" if len(blocked) == 1 else "are"
        names = " and ".join(f"the {n} model" for n in blocked)
        sentences = [f"No arm qualifies: {names} reached the target accuracy {_acc(target)} but {verb} "
                     "excluded by the privacy requirement."]
        others = "; ".join(f"the {n} model's best accuracy was {_acc(arms[n]['best_accuracy'])}" for n in rest)
        reason = "every arm that reached the target is excluded by the privacy requirement"
    elif len(arms) == 1:
        sentences = [f"The {closest} model did not reach the target accuracy {_acc(target)}; its best accuracy "
                     f"was {_acc(arms[closest]['best_accuracy'])}."]
        others, reason = "", "no arm reached the target"
    else:
        subject = "Neither arm" if len(arms) == 2 else "No arm"
        sentences = [f"{subject} reached the target accuracy {_acc(target)}."]
        others = f"the {closest} model came closest with a best accuracy of {_acc(arms[closest]['best_accuracy'])}"
        others += "".join(f"; the {n} model reached {_acc(arms[n]['best_accuracy'])}" for n in rest[1:])
        reason = "no arm reached the target"
    if others:
        sentences.append(f"{others[0].upper()}{others[1:]}.")
    return {"choice": None, "reason": reason, "margin": margin,
            "what_would_change": _changes(arms, choice=None, excluded=excluded), "text": " ".join(sentences)}


def _allowed_changes(arms: dict[str, dict], name: str, choice: str | None, allowed: list[str]) -> list[str]:
    """Say what would make the allowed, unchosen arm `name` qualify or win."""
    arm, ttt = arms[name], arms[name]["time_to_target"]
    if not ttt["reached"]:
        also = "also " if choice else ""
        return [f"the {name} model would {also}qualify if the target were at most {_acc(arm['best_accuracy'])} "
                "(its best accuracy)"]
    if choice is None:
        return []
    choice_usd = arms[choice]["time_to_target"]["usd"]
    changes = [f"the {name} model would be chosen if its cost to reach the target fell below {_usd(choice_usd)} "
               f"(the {choice} model's); it was {_usd(ttt['usd'])}"]
    runner_up = max((n for n in allowed if n != name), key=lambda n: arms[n]["best_accuracy"])
    if arm["best_accuracy"] > arms[runner_up]["best_accuracy"]:
        changes.append(f"the {name} model would be chosen, as the only arm to qualify, if the target were above "
                       f"{_acc(arms[runner_up]['best_accuracy'])} (the {runner_up} model's best accuracy) and at "
                       f"most {_acc(arm['best_accuracy'])} (its own)")
    return changes


def _privacy_changes(arms: dict[str, dict], choice: str | None, excluded: list[str]) -> list[str]:
    """Say what waiving the privacy requirement would change for each excluded arm that reached the target."""
    changes = []
    for name in excluded:
        ttt = arms[name]["time_to_target"]
        if not ttt["reached"]:
            continue
        if choice is None:
            changes.append(f"the {name} model would qualify if the privacy requirement were waived; "
                           f"it reached the target for {_usd(ttt['usd'])}")
            continue
        verdict = "be chosen instead" if _rank_key(arms[name]) < _rank_key(arms[choice]) else "still not be chosen"
        changes.append(f"without the privacy requirement the {name} model would {verdict}: it reached the "
                       f"target for {_usd(ttt['usd'])} against {_usd(arms[choice]['time_to_target']['usd'])}")
    return changes


def _changes(arms: dict[str, dict], *, choice: str | None, excluded: list[str]) -> list[str]:
    """List concrete, number-backed changes to the inputs that would change the recommendation."""
    allowed = [n for n in arms if n not in excluded]
    changes = []
    if choice is not None:
        changes.append(f"the {choice} model would no longer qualify if the target were above "
                       f"{_acc(arms[choice]['best_accuracy'])} (its best accuracy)")
    for name in allowed:
        if name != choice:
            changes += _allowed_changes(arms, name, choice, allowed)
    return changes + _privacy_changes(arms, choice, excluded)


def recommend(arms: dict[str, dict], target: float, *, privacy_ok: dict[str, bool] | None = None) -> dict[str, Any]:
    """Choose the arm that reaches the target accuracy most cheaply and explain the choice.

    Args:
        arms: arm name -> {"model", "final_accuracy", "best_accuracy", "time_to_target" (the output
            of `time_to_target` for `target`), "total_usd"}, and optionally "serving_usd" (the arm's
            serving cost over the deployment horizon), which is added to its cost to reach the target.
        target: the accuracy an arm must reach to qualify.
        privacy_ok: arm name -> whether the arm meets the privacy requirement; an arm mapped to
            False never qualifies, an arm left out is allowed.

    Returns:
        {"choice", "reason", "margin", "what_would_change", "text"}. choice is the qualifying arm
        with the lowest time-to-target cost (ties: lower total_usd, then fewer rounds), or None.
        margin is {"arm", "accuracy_over_target", "final_accuracy_over_target", "cost_ratio"}: the
        chosen arm's (or, with no choice, the closest allowed arm's) best and final accuracy minus
        the target, and each other qualifying arm's time-to-target cost divided by the choice's
        (None when the choice cost nothing). what_would_change lists number-backed sentences; text
        is 1-3 plain sentences whose every number is an input value (accuracies with 3 decimals,
        dollars with 4 significant digits).

    Raises:
        ValueError: an arm lacks a key, its time_to_target disagrees with its best_accuracy for
            this target, or privacy_ok names an unknown arm.
    """
    privacy_ok = privacy_ok or {}
    _check_arms(arms, target, privacy_ok)
    excluded = [name for name in arms if privacy_ok.get(name) is False]
    candidates = [name for name in arms if arms[name]["time_to_target"]["reached"] and name not in excluded]
    if not candidates:
        return _none_chosen(arms, target, excluded)
    choice = min(candidates, key=lambda name: (*_rank_key(arms[name]), name))
    return _chosen(arms, target, choice, candidates, excluded)
