"""The run spec (clients/spec.py): one definition of every setting, the flow and both apps reading it alike."""

import tomllib
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from clients.data import load_dataset
from clients.spec import ArmSpec, RunSpec, run_config_defaults
from flows.config import ArmConfig, CompareConfig, DataConfig, PrivacyConfig

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def _arm(config: CompareConfig, kind: str = "small", **kwargs) -> RunSpec:
    """Return the run spec the flow sends for arm ``kind`` of ``config``."""
    model = {"large": "cnn", "small": "logreg"}[kind]
    return config.run_spec(kind, arm=kind, model=kwargs.pop("model", model), run_key="k", store_uri="file:///tmp/s",
                           nodes=kwargs.pop("nodes", [3, 4]), **kwargs)


def test_the_pyproject_table_is_the_run_spec_defaults() -> None:
    assert PYPROJECT == run_config_defaults(), "regenerate [tool.flwr.app.config] from RunSpec().to_run_config()"
    assert RunSpec.from_run_config(PYPROJECT) == RunSpec()


def test_the_flow_config_is_built_from_the_spec_models() -> None:
    # every arm, privacy and data setting of the run spec is a field of the flow's config, with the same bounds
    for flow_model, spec_model in ((ArmConfig, ArmSpec), (PrivacyConfig, RunSpec.model_fields["privacy"].annotation),
                                   (DataConfig, RunSpec.model_fields["data"].annotation)):
        assert issubclass(flow_model, spec_model)
        for name, field in spec_model.model_fields.items():
            assert flow_model.model_fields[name].metadata == field.metadata, name
    with pytest.raises(ValidationError, match="large.local_epochs"):
        CompareConfig.model_validate({"large": {"local_epochs": 0}})
    with pytest.raises(ValueError, match="run config: local-epochs: Input should be greater than or equal to 1"):
        RunSpec.from_run_config({**PYPROJECT, "local-epochs": 0})


def test_a_run_spec_round_trips_through_the_flower_run_config() -> None:
    config = CompareConfig.model_validate({"small": {"weight_decay": 0.001, "max_update_norm": 5.0},
                                           "data": {"image_size": [16, 12]}})
    spec = _arm(config)

    run_config = spec.to_run_config()
    parsed = RunSpec.from_run_config(run_config)

    assert parsed == spec
    assert run_config["nodes"] == "3,4" and run_config["image-size"] == "16x12" and run_config["weight-decay"] == 0.001
    assert run_config["privacy-noise-multiplier"] == "", "an empty optional value travels as ''"
    assert all(isinstance(v, (bool, int, float, str)) for v in run_config.values()), "Flower takes scalars only"
    assert (parsed.training.learning_rate, parsed.rounds, parsed.nodes) == (config.small.learning_rate, config.rounds,
                                                                          [3, 4])


def test_unknown_or_missing_keys_and_bad_values_fail_in_one_line_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"unknown keys \['extra'\], missing keys \[\]"):
        RunSpec.from_run_config({**PYPROJECT, "extra": 1})
    with pytest.raises(ValueError, match=r"missing keys \['seed'\]"):
        RunSpec.from_run_config({k: v for k, v in PYPROJECT.items() if k != "seed"})
    for change, message in [
        ({"aggregation": "mean"}, "aggregation: Input should be 'fedavg', 'fedmedian', 'trimmed-mean' or 'krum'"),
        ({"min-replies": 0}, "min-replies: Input should be greater than or equal to 1"),
        ({"max-update-norm": -1.0}, "max-update-norm: Input should be greater than 0"),
        ({"max-update-norm": float("nan")}, "max-update-norm: Input should be a finite number"),
        ({"round-timeout-s": 0.0}, "round-timeout-s: Input should be greater than 0"),
        ({"privacy-delta": 0.5}, "privacy-delta: Input should be less than 0.1"),
        ({"image-size": "32"}, "image-size: .*HEIGHTxWIDTH"),
        ({"model": "auto"}, "model: 'auto' is resolved by the flow"),
        ({"trim-fraction": 0.5}, "trim-fraction: Input should be less than 0.5"),
    ]:
        with pytest.raises(ValueError) as caught:
            RunSpec.from_run_config({**PYPROJECT, **change})
        assert "\n" not in str(caught.value)
        assert caught.match(message), (change, str(caught.value))


@pytest.mark.parametrize(("config", "run_config"), [
    ({"privacy": {"mode": "sample-level"}}, {"model": "logreg", "privacy-mode": "sample-level"}),
    ({"small": {"model": "gnb"}, "privacy": {"mode": "sample-level"}}, {"model": "gnb", "privacy-mode": "sample-level"}),
    ({"large": {"aggregation": "krum"}, "privacy": {"mode": "client-level"}},
     {"aggregation": "krum", "privacy-mode": "client-level"}),
    ({"small": {"model": "gnb", "weight_decay": 0.01}}, {"model": "gnb", "weight-decay": 0.01}),
])
def test_a_combination_the_flow_refuses_is_refused_by_the_apps_with_the_same_reason(config, run_config) -> None:
    submitted = {**PYPROJECT, **run_config}  # `flwr run . --run-config ...`

    with pytest.raises(ValidationError) as flow:
        CompareConfig.model_validate(config)
    with pytest.raises(ValueError) as app:
        RunSpec.from_run_config(submitted)

    reason = str(app.value).split(": ", 2)[2]  # after "run config: <field>: "
    assert "\n" not in str(app.value)
    assert reason in str(flow.value), (reason, str(flow.value))


def test_each_arm_run_carries_its_own_round_rules_and_the_query_waits_for_the_most_patient_arm() -> None:
    config = CompareConfig.model_validate(
        {"large": {"aggregation": "fedmedian", "min_replies": 2, "max_update_norm": 25.0, "round_timeout_s": 90},
         "small": {"aggregation": "krum", "krum_byzantine": 1, "round_timeout_s": 45}})

    large, small = _arm(config, "large"), _arm(config, "small")
    query = config.query_spec(run_key="k", store_uri="file:///tmp/s", federated_statistics=False)

    assert (large.training.aggregation, large.training.min_replies, large.training.max_update_norm) == (
        "fedmedian", 2, 25.0)
    assert (small.training.aggregation, small.training.krum_byzantine, small.training.round_timeout_s) == (
        "krum", 1, 45.0)
    assert query.mode == "query" and query.training.round_timeout_s == 90.0


def test_a_private_run_takes_its_epsilon_its_dp_optimizer_and_its_step() -> None:
    config = CompareConfig.model_validate({
        "large": {"model": "cnn", "learning_rate": 0.1, "dp_optimizer": "sgd", "learning_rate_by_epsilon": {1: 0.02}},
        "privacy": {"mode": "sample-level", "arms": "large", "epsilon_sweep": [1, 8], "noise_multiplier": 1.5}})

    private = _arm(config, "large", epsilon=1.0)
    plain = _arm(config, "large")

    assert (private.privacy.mode, private.privacy.target_epsilon, private.privacy.noise_multiplier) == (
        "sample-level", 1.0, 1.5)
    assert (private.training.optimizer, private.training.learning_rate) == ("sgd", 0.02)
    assert (plain.privacy.mode, plain.training.optimizer, plain.training.learning_rate) == ("none", "adam", 0.1)


def test_weight_decay_reaches_the_optimizer_of_torch_and_scikit_learn_models() -> None:
    from clients.models import build_model

    digits = load_dataset("digits")
    for name in ("torch-logreg", "logreg"):
        trained = {}
        for decay in (None, 0.5):
            model = build_model(name, input_shape=digits.input_shape, num_classes=digits.num_classes, seed=0,
                                device="cpu")
            model.fit(digits, epochs=2, batch_size=64, learning_rate=0.05, seed=0, weight_decay=decay)
            trained[decay] = np.linalg.norm(np.concatenate([a.ravel() for a in model.get_arrays().values()]))
        assert trained[0.5] < 0.7 * trained[None], (name, trained)
    gnb = build_model("gnb", input_shape=digits.input_shape, num_classes=digits.num_classes, seed=0)
    with pytest.raises(ValueError, match="no weights to decay"):
        gnb.fit(digits, epochs=1, batch_size=32, learning_rate=0.1, seed=0, weight_decay=0.1)


def test_an_extra_arm_takes_its_kinds_settings_unless_given_and_runs_like_the_others() -> None:
    from flows.preparation import plan_variants

    config = CompareConfig.model_validate({
        "small": {"local_epochs": 9},
        "extra_arms": {"nb": {"kind": "small", "model": "gnb"}, "wide": {"kind": "large", "model": "cnn-dp"}},
        "privacy": {"mode": "client-level", "arms": "small", "epsilon_sweep": [4, 8], "compare_without_dp": True},
    })

    nb = config.extra_arms["nb"]
    assert (nb.model, nb.local_epochs, nb.learning_rate) == ("gnb", 9, config.small.learning_rate)
    decayed = CompareConfig.model_validate({"small": {"weight_decay": 0.001},
                                            "extra_arms": {"nb": {"kind": "small", "model": "gnb"}}})
    assert decayed.extra_arms["nb"].weight_decay is None, "naive Bayes does not inherit a decay it cannot apply"
    assert config.arm_kinds() == {"large": "large", "small": "small", "nb": "small", "wide": "large"}
    groups = [[(v.name, v.kind, v.arm) for v in group] for group in plan_variants(config)]
    assert groups == [
        [("large", "large", "large"), ("small", "small", "small"), ("nb", "small", "nb"), ("wide", "large", "wide")],
        [("small-eps4", "small", "small"), ("nb-eps4", "small", "nb")],
        [("small-eps8", "small", "small"), ("nb-eps8", "small", "nb")],
    ]
    spec = config.run_spec(
        "nb", arm="nb-eps4", model="gnb", run_key="k", store_uri="file:///s", nodes=[1], epsilon=4.0)
    assert (spec.arm, spec.training.model, spec.training.local_epochs, spec.privacy.target_epsilon) == (
        "nb-eps4", "gnb", 9, 4.0)


@pytest.mark.parametrize(("extra", "message"), [
    ({"large": {"kind": "small", "model": "gnb"}}, "the arm name 'large' is taken"),
    ({"cnn-eps8": {"kind": "large", "model": "cnn"}}, "the arm name 'cnn-eps8' is taken"),
    ({"nb": {"kind": "small", "model": "cnn"}}, r"extra_arms.nb.model: expected one of logreg, .*, got 'cnn' \(small models\)"),
    ({"nb": {"model": "gnb"}}, r"extra_arms.nb.kind: Field required"),
    ({"nb": {"kind": "small", "model": "gnb", "weight_decay": 0.1}}, r"weight_decay: the model 'gnb' has no weights"),
    ({"Bad Name": {"kind": "small"}}, r"extra_arms.Bad Name.\[key\]"),
])
def test_a_bad_extra_arm_is_refused_naming_it(extra, message) -> None:
    import json

    from flows.config import parse_overrides

    with pytest.raises(ValueError, match=message):  # the one line `fedcompare demo --config` prints
        parse_overrides(json.dumps({"extra_arms": extra}))


def test_distill_adds_a_small_arm_taught_by_the_large_one_after_it_and_refuses_privacy() -> None:
    from flows.preparation import plan_variants

    config = CompareConfig.model_validate({"distill": {"enabled": True, "temperature": 3.0}})

    groups = [[(v.name, v.kind, v.arm, v.teacher) for v in group] for group in plan_variants(config)]
    spec = config.run_spec("small", arm="small-distilled", model="logreg", run_key="k", store_uri="file:///s",
                           nodes=[1], teacher=("large", "cnn"))

    assert groups == [[("large", "large", "large", ""), ("small", "small", "small", "")],
                      [("small-distilled", "small", "small", "large")]]
    assert (spec.teacher_arm, spec.teacher_model, spec.distill.temperature, spec.distill.alpha) == (
        "large", "cnn", 3.0, CompareConfig().distill.alpha)
    assert RunSpec.from_run_config(spec.to_run_config()) == spec
    assert _arm(config).teacher_arm == "", "the plain arms are not distilled"
    with pytest.raises(ValidationError, match="distill.enabled: a distilled arm learns from its teacher's soft labels"):
        CompareConfig.model_validate({"distill": {"enabled": True}, "privacy": {"mode": "client-level"}})
    with pytest.raises(ValueError, match="privacy-mode: a distilled arm learns from its teacher's soft labels"):
        RunSpec.from_run_config({**spec.to_run_config(), "privacy-mode": "client-level"})
    with pytest.raises(ValueError, match="teacher-arm and teacher-model go together"):
        RunSpec.from_run_config({**PYPROJECT, "teacher-arm": "large"})


def test_the_text_set_is_partitioned_by_movie_and_its_models_are_checked_against_the_data_kind() -> None:
    from flows.config import deployment_config
    from flows.preparation import resolve_models

    text = CompareConfig.model_validate(deployment_config("text"))
    assert text.data.partition_by == "movie_name" and set(text.arm_kinds()) == {"large", "small", "bilstm",
                                                                                "tfidf-logreg"}
    assert resolve_models.fn(text) == {"large": "transformer", "large-dp": "transformer", "small": "mnb",
                                       "small-dp": "mnb", "bilstm": "bilstm", "bilstm-dp": "bilstm",
                                       "tfidf-logreg": "tfidf-logreg", "tfidf-logreg-dp": "tfidf-logreg"}
    with pytest.raises(ValidationError, match="'rotten-tomatoes' can be partitioned by movie_name, got 'site'"):
        CompareConfig.model_validate({"data": {"dataset": "rotten-tomatoes", "partitioning": "by-column",
                                               "partition_by": "site"}})
    with pytest.raises(ValueError, match=r"small.model: 'mnb' reads text \(hashed word ids\), but 'digits' is a "
                                         "tabular dataset"):
        resolve_models.fn(CompareConfig.model_validate({"data": {"dataset": "digits"}, "small": {"model": "mnb"}}))
    with pytest.raises(ValidationError, match="small.model: client-level DP clips each node's update, but 'mnb'"):
        CompareConfig.model_validate({"small": {"model": "mnb"}, "privacy": {"mode": "client-level"}})
    with pytest.raises(ValueError, match="model: max_update_norm bounds a node's update, but 'mnb'"):
        RunSpec.from_run_config({**PYPROJECT, "model": "mnb", "max-update-norm": 5.0})


def test_a_csv_text_column_becomes_hashed_word_ids_with_its_groups_and_no_preprocessing(tmp_path) -> None:
    import csv

    from clients.text import MAX_LENGTH, token_ids

    rows = [("a fresh and funny film", "fresh", "paris"), ("dull, slow and long", "rotten", "lyon"),
            ("a joy to watch", "fresh", "lyon"), ("nothing works here", "rotten", "paris")] * 5
    path = tmp_path / "reviews.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "verdict", "site", "stars"])
        writer.writerows((*row, i % 5) for i, row in enumerate(rows))

    dataset = load_dataset(str(path), label_column="verdict", text_column="review", partition_by="site")
    config = CompareConfig.model_validate({"data": {"dataset": str(path), "label_column": "verdict",
                                                    "text_column": "review", "partitioning": "by-column",
                                                    "partition_by": "site"}})

    assert dataset.kind == "text" and dataset.input_shape == (MAX_LENGTH,) and dataset.num_classes == 2
    np.testing.assert_array_equal(dataset.x, token_ids([r[0] for r in rows]))
    assert list(dataset.groups[:2]) == ["paris", "lyon"] and list(dataset.y[:2]) == [0, 1]
    assert config.data.preprocessing_mode(private=False) == "none", "text is hashed, not standardized"
    assert _arm(config, model="mnb").data.text_column == "review"
    with pytest.raises(ValueError, match="has no text column 'body'"):
        load_dataset(str(path), label_column="verdict", text_column="body")
    with pytest.raises(ValidationError, match="text_column names a column of a CSV file, but the dataset is 'mnist'"):
        CompareConfig.model_validate({"data": {"text_column": "review"}})
