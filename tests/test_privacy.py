"""Differential privacy: calibration, accounting you can recompute, budgets, DP-SGD training."""

from __future__ import annotations

import json
import multiprocessing

import numpy as np
import pytest
import torch
from torch import nn

from clients.data import load_dataset, node_data
from clients.models import build_model
from flows.preparation import Variant, check_privacy, plan_variants
from flows.config import CompareConfig
from flows.report import privacy_summary
from privacy.accounting import Mechanism, PrivacyInfeasible, epsilon, plan_client_level, plan_sample_level
from privacy.ledger import BudgetExceeded, PrivacyLedger
from privacy.sample_level import dp_sgd, make_compatible
from tests.accounting import independent_epsilon


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrated_noise_meets_the_target_over_all_rounds(accountant):
    plan = plan_sample_level(num_examples=850, batch_size=32, local_epochs=3, rounds=5, target_epsilon=3.0,
                             delta=1e-5, max_grad_norm=1.0, accountant=accountant)

    assert plan.sample_rate == pytest.approx(1 / 27) and plan.steps_per_round == 81
    spent = plan.epsilon_after(5)
    assert 2.95 <= spent <= 3.0
    history = [[plan.noise_multiplier, plan.sample_rate, plan.steps_per_round]] * 5
    assert independent_epsilon(history, 1e-5, accountant) == pytest.approx(spent, rel=0.01)
    assert plan.epsilon_after(6) > 3.0, "one more round than planned would exceed the target"


def test_more_privacy_needs_more_noise():
    sigmas = [plan_sample_level(num_examples=850, batch_size=32, local_epochs=3, rounds=5, target_epsilon=eps,
                                delta=1e-5, max_grad_norm=1.0, accountant="rdp").noise_multiplier
              for eps in (1.0, 3.0, 8.0)]
    assert sigmas[0] > sigmas[1] > sigmas[2] > 0


def test_delta_above_one_over_examples_is_refused_with_the_fix():
    with pytest.raises(PrivacyInfeasible, match=r"privacy.delta=0.01 is above 1/850.*at most 0.0012"):
        plan_sample_level(num_examples=850, batch_size=32, local_epochs=1, rounds=1, target_epsilon=1.0,
                          delta=0.01, max_grad_norm=1.0, accountant="rdp")


def test_a_fixed_noise_below_what_the_target_needs_is_refused_with_the_minimum():
    with pytest.raises(PrivacyInfeasible, match=r"noise_multiplier=0.3 spends ε=.* raise noise_multiplier to at least"):
        plan_sample_level(num_examples=850, batch_size=32, local_epochs=3, rounds=5, target_epsilon=1.0,
                          delta=1e-5, max_grad_norm=1.0, accountant="rdp", noise_multiplier=0.3)
    plan = plan_sample_level(num_examples=850, batch_size=32, local_epochs=3, rounds=5, target_epsilon=8.0,
                             delta=1e-5, max_grad_norm=1.0, accountant="rdp", noise_multiplier=5.0)
    assert plan.noise_multiplier == 5.0 and not plan.calibrated and plan.epsilon_after(5) < 8.0


def test_client_level_plan_accounts_rounds_and_the_sampled_fraction():
    plan = plan_client_level(num_nodes=4, sampled_nodes=4, rounds=5, target_epsilon=8.0, delta=1e-5,
                             clipping_norm=1.0, accountant="rdp")
    assert plan.sample_rate == 1.0 and plan.steps_per_round == 1
    assert plan.epsilon_after(5) == pytest.approx(independent_epsilon([[plan.noise_multiplier, 1.0, 5]], 1e-5, "rdp"))
    with pytest.raises(PrivacyInfeasible, match="1/4"):
        plan_client_level(num_nodes=4, sampled_nodes=4, rounds=5, target_epsilon=8.0, delta=0.3,
                          clipping_norm=1.0, accountant="rdp")


def _plan(target: float = 3.0):
    return plan_sample_level(num_examples=850, batch_size=32, local_epochs=3, rounds=5, target_epsilon=target,
                             delta=1e-5, max_grad_norm=1.0, accountant="rdp")


def test_ledger_refuses_the_round_past_the_run_target_and_records_nothing(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    plan = _plan()
    spent = [ledger.charge(plan, run_key="run-a", arm="large", server_round=r)["epsilon_run"] for r in range(1, 6)]

    assert spent == sorted(spent) and spent[-1] <= 3.0
    with pytest.raises(BudgetExceeded, match=r"round 6 would take the large arm of run run-a to ε=.* above its target 3"):
        ledger.charge(plan, run_key="run-a", arm="large", server_round=6)
    assert len(ledger.entries()) == 5
    other = ledger.charge(plan, run_key="run-a", arm="small", server_round=1)
    assert other["epsilon_run"] == pytest.approx(spent[0])
    assert other["epsilon_node"] > spent[-1], "another arm on the same data adds to the node's ε"


def test_ledger_enforces_the_nodes_lifetime_budget_across_runs(tmp_path):
    plan = _plan()
    PrivacyLedger(tmp_path / "ledger.json").charge(plan, run_key="old", arm="large", server_round=1)
    ledger = PrivacyLedger(tmp_path / "ledger.json", budget_epsilon=2.5)
    first = ledger.charge(plan, run_key="new", arm="large", server_round=1)
    assert first["epsilon_node"] > first["epsilon_run"]
    with pytest.raises(BudgetExceeded, match=r"this node's data to ε=.* above its budget 2.5"):
        for server_round in range(2, 6):
            ledger.charge(plan, run_key="new", arm="large", server_round=server_round)
    assert ledger.spent(delta=1e-5, accountant="rdp") <= 2.5


def _charge_many(path: str, arm: str) -> None:
    ledger = PrivacyLedger(path)
    for server_round in range(1, 4):
        ledger.charge(_plan(8.0), run_key="run", arm=arm, server_round=server_round)


def test_concurrent_arms_on_one_node_lose_no_entry(tmp_path):
    path = str(tmp_path / "ledger.json")
    workers = [multiprocessing.get_context("spawn").Process(target=_charge_many, args=(path, arm))
               for arm in ("large", "small")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert all(worker.exitcode == 0 for worker in workers)
    entries = json.loads((tmp_path / "ledger.json").read_text())["entries"]
    assert sorted((e["arm"], e["round"]) for e in entries) == [(a, r) for a in ("large", "small") for r in (1, 2, 3)]


def test_a_corrupt_ledger_is_reported_not_reset(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable.*deleting it would forget privacy already spent"):
        PrivacyLedger(path).charge(_plan(), run_key="r", arm="large", server_round=1)
    assert path.read_text() == "{not json"


def _digits_split():
    dataset = load_dataset("digits")
    return node_data(dataset, partition_id=0, num_partitions=1, scheme="iid", seed=0, alpha=0.5,
                     classes_per_node=2, central_test_fraction=0.2, local_test_fraction=0.2)


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_dp_sgd_trains_a_torch_model_and_its_noise_is_not_replayable_from_the_seed(mode):
    train, test = _digits_split()
    plan = plan_sample_level(num_examples=len(train), batch_size=64, local_epochs=4, rounds=1, target_epsilon=8.0,
                             delta=1e-5, max_grad_norm=1.0, accountant="rdp")
    finals = []
    for _ in range(2):
        model = build_model("torch-logreg", input_shape=train.input_shape, num_classes=train.num_classes, seed=0,
                            device="cpu", private=True)
        model.fit(train, epochs=4, batch_size=64, learning_rate=0.05, seed=1, wrap=dp_sgd(plan, grad_sample_mode=mode))
        finals.append(model.get_arrays()["linear.weight"])
        assert model.evaluate(test, batch_size=256)["accuracy"] > 0.5, "DP-SGD at ε=8 still learns digits"
        assert not any(hasattr(p, "grad_sample") for p in model.network.parameters()), "Opacus hooks removed"
    assert not np.array_equal(finals[0], finals[1]), "the noise comes from the OS, not from the public seed"


def test_layers_opacus_rejects_are_replaced_and_named():
    network = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    fixed, fixes = make_compatible(network)
    assert any(isinstance(m, nn.GroupNorm) for m in fixed.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fixed.modules())
    assert fixes and "BatchNorm" in " ".join(fixes)
    assert make_compatible(nn.Linear(3, 2))[1] == []
    _ = torch  # the zoo's networks need no fix: build_model(private=True) keeps their arrays
    cnn = build_model("cnn", input_shape=(1, 28, 28), num_classes=10, seed=0, device="cpu", private=True)
    assert cnn.dp_fixes == []


def test_sample_level_needs_a_torch_small_model():
    with pytest.raises(ValueError, match="small.model\): .*use the model 'torch-logreg'"):
        CompareConfig.model_validate({"privacy": {"mode": "sample-level"}})
    CompareConfig.model_validate({"privacy": {"mode": "client-level"}})


def test_a_sweep_runs_plain_arms_first_then_one_group_per_epsilon():
    config = CompareConfig.model_validate({
        "small": {"model": "torch-logreg", "learning_rate": 0.01},
        "privacy": {"mode": "sample-level", "epsilon_sweep": [8, 1, 3], "compare_without_dp": True}})
    groups = plan_variants(config)
    assert [[v.name for v in g] for g in groups] == [
        ["large", "small"], ["large-eps1", "small-eps1"], ["large-eps3", "small-eps3"], ["large-eps8", "small-eps8"]]
    only_large = CompareConfig.model_validate({"privacy": {"mode": "client-level", "arms": "large"}})
    assert plan_variants(only_large) == [[Variant("small", "small")], [Variant("large-eps8", "large", 8.0)]]


def test_an_unreachable_target_fails_before_training_naming_arm_node_and_fix():
    config = CompareConfig.model_validate({
        "small": {"model": "torch-logreg", "learning_rate": 0.01}, "privacy": {"mode": "sample-level",
                                                                             "delta": 1e-3}})
    nodes = [{"node_id": 11, "num-train": 400}, {"node_id": 12, "num-train": 5000}]
    variants = [v for g in plan_variants(config) for v in g]
    with pytest.raises(ValueError, match=r"privacy \(large-eps8 arm, ε=8\): privacy.delta=0.001 is above 1/5000 "
                                         r"\(the training examples of node 12\); set privacy.delta to at most 0.0002"):
        check_privacy(config, variants, nodes, {"large": [11, 12], "small": [11, 12]})
    nodes[1]["num-train"] = 900
    plans = check_privacy(config, variants, nodes, {"large": [11, 12], "small": [11, 12]})
    assert set(plans["large-eps8"]["noise_multiplier"]) == {11, 12}


def test_report_keeps_every_accountant_input_and_epsilon_recomputes_within_one_percent():
    plan = _plan(3.0)
    rounds = []
    for server_round in range(1, 6):
        node = {"noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
                "steps": plan.steps_per_round, "max_grad_norm": 1.0,
                "epsilon": plan.epsilon_after(server_round), "node_epsilon": plan.epsilon_after(server_round)}
        rounds.append({"round": server_round, "failures": [] if server_round < 5 else [
            {"node_id": 8, "phase": "train", "reason": "BudgetExceeded: privacy budget exhausted: ..."}],
            "privacy": {"mode": "sample-level", "accountant": "rdp", "delta": 1e-5, "target_epsilon": 3.0,
                        "nodes": {"7": node}}})
    summary = privacy_summary(rounds)

    assert summary["within_target"] and summary["refused"][0]["node_id"] == 8
    recorded = summary["nodes"]["7"]
    assert independent_epsilon(recorded["history"], 1e-5, "rdp") == pytest.approx(recorded["epsilon"], rel=0.01)
    assert summary["epsilon"] == recorded["epsilon"] <= 3.0
    assert epsilon([Mechanism(*h) for h in recorded["history"]], delta=1e-5, accountant="rdp") == pytest.approx(
        summary["epsilon"])


def test_each_private_run_trains_with_the_learning_rate_of_its_epsilon():
    from flows.report import privacy_rows

    config = CompareConfig.model_validate(json.loads(json.dumps({  # through JSON, as Prefect hands it over
        "large": {"model": "cnn", "learning_rate": 0.1, "dp_optimizer": "sgd", "learning_rate_by_epsilon": {1: 0.02}},
        "small": {"model": "torch-logreg", "learning_rate": 0.01},
        "privacy": {"mode": "sample-level", "epsilon_sweep": [1, 8], "compare_without_dp": True}})))
    runs = {v.name: config.run_spec(v.kind, arm=v.name, model="cnn" if v.kind == "large" else "torch-logreg",
                                    run_key="k", store_uri="file:///s", nodes=[1], epsilon=v.epsilon).to_run_config()
            for group in plan_variants(config) for v in group}

    assert {name: run["learning-rate"] for name, run in runs.items()} == {
        "large": 0.1, "small": 0.01, "large-eps1": 0.02, "small-eps1": 0.01, "large-eps8": 0.1, "small-eps8": 0.01}
    assert {name: run["optimizer"] for name, run in runs.items()} == {
        "large": "adam", "small": "adam", "large-eps1": "sgd", "small-eps1": "adam", "large-eps8": "sgd",
        "small-eps8": "adam"}, "dp_optimizer applies to the private runs of its arm only"
    report = {"config": config.model_dump(mode="json"), "arms": {
        "large-eps1": {"arm": "large-eps1", "kind": "large", "model": "cnn", "final_accuracy": 0.5, "reference": None,
                       "privacy": {"mode": "sample-level", "target_epsilon": 1.0, "epsilon": 0.99, "delta": 1e-5,
                                   "accountant": "rdp", "noise_multiplier": 2.0, "clipping_norm": 1.0,
                                   "refused": []}}}}
    row = privacy_rows(report)[0]
    assert (row["optimizer"], row["learning rate"]) == ("sgd", 0.02), "the report names the step the private arm took"


def test_a_learning_rate_for_an_epsilon_no_run_uses_is_noted_not_refused():
    config = CompareConfig.model_validate({
        "large": {"model": "cnn", "learning_rate": 0.1, "learning_rate_by_epsilon": {2: 0.02, 8: 0.1}},
        "small": {"model": "torch-logreg", "learning_rate": 0.01},
        "privacy": {"mode": "sample-level", "epsilon_sweep": [1, 8]}})

    assert config.unused_steps() == [
        "large.learning_rate_by_epsilon: the steps for ε=2 are unused (the private runs of this arm train at "
        "ε=1, 8); add an ε to privacy.epsilon_sweep to train at it"]
    assert config.large.learning_rate_at(1.0) == 0.1 and config.large.learning_rate_at(8.0) == 0.1


def test_the_private_preset_can_be_narrowed_to_fewer_epsilons():
    from flows.preparation import plan_variants
    from flows.config import deployment_config, parse_overrides

    overrides = parse_overrides('{"privacy": {"epsilon_sweep": [3, 8]}}', base=deployment_config("private"))
    config = CompareConfig.model_validate(overrides)

    assert [v.name for group in plan_variants(config) for v in group if v.epsilon] == [
        "large-eps3", "small-eps3", "large-eps8", "small-eps8"]
    assert [note.split(":")[0] for note in config.unused_steps()] == ["large.learning_rate_by_epsilon"]
    assert "ε=1 are unused" in config.unused_steps()[0]
    assert config.large.learning_rate_at(3.0) == 0.1
    with pytest.raises(ValueError, match="learning rate in"):
        CompareConfig.model_validate({"large": {"model": "cnn", "learning_rate": 0.1,
                                                "learning_rate_by_epsilon": {1: 0}}})


def test_an_arm_can_train_a_more_compact_model_under_dp():
    from clients.models import estimate_training_memory_bytes
    from flows.preparation import arm_model as _model, large_need_bytes as _large_need_bytes, resolve_models

    settings = {"large": {"model": "auto", "learning_rate": 1e-3, "dp_model": "cnn-dp", "dp_optimizer": "sgd"},
                "small": {"model": "torch-logreg", "learning_rate": 0.01},
                "privacy": {"mode": "sample-level", "compare_without_dp": True}, "assignment": "by-tier"}
    config = CompareConfig.model_validate(settings)
    models = resolve_models.fn(config)

    assert models == {"large": "cnn", "large-dp": "cnn-dp", "small": "torch-logreg", "small-dp": "torch-logreg"}
    assert [_model(models, "large", eps) for eps in (None, 1.0, 8.0)] == ["cnn", "cnn-dp", "cnn-dp"]
    assert config.large.model_at(None) == "auto" and config.large.model_at(3.0) == "cnn-dp"
    shape = {"input_shape": (1, 28, 28), "num_classes": 10, "batch_size": 32}
    plain = estimate_training_memory_bytes("cnn", private=False, optimizer="adam", **shape)
    private = estimate_training_memory_bytes("cnn-dp", private=True, optimizer="sgd", **shape)
    assert plain > private, "the 1.3M-parameter CNN needs more than the compact one even with DP-SGD"
    assert _large_need_bytes(config, models, None) == plain, "by-tier sizes nodes for the larger of the arm's runs"
    only_private = CompareConfig.model_validate({**settings, "privacy": {"mode": "sample-level"}})
    assert _large_need_bytes(only_private, models, None) == private

    with pytest.raises(ValueError, match="large.dp_model: expected one of auto, cnn, cnn-dp, mlp, transformer, bilstm, got 'logreg'"):
        CompareConfig.model_validate({**settings, "large": {**settings["large"], "dp_model": "logreg"}})
    with pytest.raises(ValueError, match="small.dp_model\): sample-level DP-SGD .*the scikit-learn 'logreg'"):
        CompareConfig.model_validate({**settings, "small": {**settings["small"], "dp_model": "logreg"}})
