"""CompareConfig: defaults are valid, bad values are rejected with the field named."""

import pytest
from pydantic import ValidationError

from flows.assignment import assign_nodes, memory_fit, node_table
from flows.config import CompareConfig, resolve_store_uri, resolve_superlink


def test_defaults_are_the_demo_configuration():
    config = CompareConfig()

    assert config.data.dataset == "mnist"
    assert config.data.partitioning == "dirichlet" and config.data.dirichlet_alpha == 0.5
    assert config.rounds >= 5
    assert config.assignment == "all-nodes" and config.node_evaluation == "final"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"rounds": 0}, "rounds"),
        ({"data": {"partitioning": "random"}}, "data.partitioning"),
        ({"data": {"dirichlet_alpha": 0}}, "data.dirichlet_alpha"),
        ({"data": {"dataset": "imagenet"}}, "data.dataset"),
        ({"large": {"model": "cnn", "learning_rate": -1}}, "large.learning_rate"),
        ({"large": {"model": "cnn", "learning_rate": 0.1, "optimizer": "rmsprop"}}, "large.optimizer"),
        ({"assignment": "random"}, "assignment"),
        ({"superlink": "localhost"}, "superlink"),
        ({"store_uri": "ftp://host/x"}, "store_uri"),
        ({"store_uri": "s3://"}, "store_uri"),
        ({"target_accuracy": 1.5}, "target_accuracy"),
        ({"unknown_knob": 1}, "unknown_knob"),
        ({"data": {"alpha": 0.3}}, "data.alpha"),
        ({"large": {"model": "cnn", "learning_rate": 0.1, "aggregation": "mean"}}, "large.aggregation"),
        ({"small": {"model": "logreg", "learning_rate": 0.1, "min_replies": 0}}, "small.min_replies"),
        ({"large": {"model": "cnn", "learning_rate": 0.1, "max_update_norm": 0}}, "large.max_update_norm"),
        ({"large": {"model": "cnn", "learning_rate": 0.1, "max_update_norm": float("inf")}}, "large.max_update_norm"),
        ({"small": {"model": "logreg", "learning_rate": 0.1, "round_timeout_s": 0}}, "small.round_timeout_s"),
        ({"round_timeout_s": 60}, "round_timeout_s"),  # moved into each arm: large.round_timeout_s, small...
    ],
)
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ValidationError) as caught:
        CompareConfig.model_validate(override)

    located = {".".join(str(p) for p in error["loc"]) for error in caught.value.errors()}
    assert field in located


def test_arm_models_must_match_their_arm():
    with pytest.raises(ValidationError, match="small.model: expected one of logreg, torch-logreg"):
        CompareConfig.model_validate({"small": {"model": "cnn", "learning_rate": 0.1}})
    with pytest.raises(ValidationError, match="large.model"):
        CompareConfig.model_validate({"large": {"model": "logreg", "learning_rate": 0.1}})


def test_csv_path_is_accepted_as_dataset():
    assert CompareConfig.model_validate({"data": {"dataset": "/data/site_a.csv"}}).data.dataset.endswith(".csv")


def test_json_schema_renders_for_the_prefect_form():
    schema = CompareConfig.model_json_schema()

    assert {"data", "rounds", "large", "small", "assignment", "seed", "store_uri", "superlink"} <= set(
        schema["properties"]
    )


def test_endpoints_resolve_from_config_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDCOMPARE_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("FEDCOMPARE_STORE", raising=False)
    monkeypatch.delenv("FEDCOMPARE_SUPERLINK", raising=False)
    assert resolve_store_uri(CompareConfig()) == f"file://{tmp_path}/store"
    assert resolve_superlink(CompareConfig()) == "127.0.0.1:8000"

    monkeypatch.setenv("FEDCOMPARE_STORE", "s3://bucket/prefix")
    monkeypatch.setenv("FEDCOMPARE_SUPERLINK", "10.0.0.5:8000")
    assert resolve_store_uri(CompareConfig()) == "s3://bucket/prefix"
    assert resolve_superlink(CompareConfig()) == "10.0.0.5:8000"
    assert resolve_superlink(CompareConfig(superlink="coord:9000")) == "coord:9000"


def test_by_tier_assignment_splits_nodes_and_explains_a_missing_tier():
    nodes = [{"node_id": 1, "tier": "gpu"}, {"node_id": 2, "tier": "cpu"}, {"node_id": 3, "tier": "gpu"}]

    assert assign_nodes(nodes, "by-tier").nodes == {"large": [1, 3], "small": [2]}
    assert assign_nodes(nodes, "by-tier", small_on_gpu_nodes=True).nodes == {"large": [1, 3], "small": [1, 2, 3]}
    assert assign_nodes(nodes, "all-nodes").nodes == {"large": [1, 2, 3], "small": [1, 2, 3]}
    with pytest.raises(ValueError, match="at least one node of tier 'cpu'.*all-nodes"):
        assign_nodes([n for n in nodes if n["tier"] == "gpu"], "by-tier")


def _node(node_id: int, tier: str, **facts) -> dict:
    """Return a node's query answer as the federation JSON holds it."""
    return {"node_id": node_id, "tier": tier, "device": "cpu", "partition-id": node_id, "num-partitions": 4,
            "num-train": 100, "num-test": 20, "classes-seen": 10, **facts}


def test_by_tier_puts_the_large_model_only_on_nodes_whose_memory_holds_it():
    # Arrange: a 16 GB GPU, a 2 GB GPU, a CPU-only gpu-tier node with 64 GB free, a cpu node
    nodes = [
        _node(1, "gpu", device="cuda", **{"gpu-name": "A", "gpu-memory-mb": 16_000.0, "memory-mb": 500.0}),
        _node(2, "gpu", device="cuda", **{"gpu-name": "T4-small", "gpu-memory-mb": 2_000.0}),
        _node(3, "gpu", **{"memory-mb": 64_000.0}),
        _node(4, "cpu", **{"memory-mb": 1_000.0}),
    ]
    need = 3 * 2**30  # 3 GiB of tensors
    # Act
    placed = assign_nodes(nodes, "by-tier", large_need_bytes=need)
    # Assert: judged by GPU memory on CUDA (node 1 fits although its host memory is small), host memory otherwise
    assert placed.nodes == {"large": [1, 3], "small": [4]}
    assert list(placed.left_out) == [2] and "T4-small memory is 2000 MB" in placed.left_out[2]
    assert memory_fit(nodes[2], need) == "" and "host memory" in memory_fit(nodes[3], need)
    assert memory_fit({"node_id": 9, "tier": "gpu", "device": "cpu"}, need) == "", "no memory reported: trusted"
    with pytest.raises(ValueError, match="no gpu-tier node can hold the large model.*lower large.batch_size"):
        assign_nodes(nodes[1:2] + nodes[3:], "by-tier", large_need_bytes=need)
    rows = node_table(nodes, placed)
    assert [r["arms"] for r in rows] == ["large", "none", "large", "small"]
    assert rows[1]["note"] == placed.left_out[2] and rows[0]["device"] == "cuda (A, 16000 MB)"
    assert rows[3]["data"] == "partition 4 of 4"


def test_overrides_are_validated_into_one_line_naming_the_fields():
    from flows.config import parse_overrides

    assert parse_overrides('{"rounds": 3, "assignment": "by-tier"}') == {"rounds": 3, "assignment": "by-tier"}
    assert parse_overrides("") == {}
    with pytest.raises(ValueError) as caught:
        parse_overrides('{"rounds": 0, "data": {"dirichlet_alpha": -1}}')
    message = str(caught.value)
    assert "\n" not in message and "rounds:" in message and "data.dirichlet_alpha:" in message
    with pytest.raises(ValueError, match="not JSON"):
        parse_overrides("{rounds: 3}")
    with pytest.raises(ValueError, match="JSON object"):
        parse_overrides("[1, 2]")


def test_an_arm_given_in_part_keeps_its_own_defaults_for_the_rest():
    from flows.config import parse_overrides

    config = CompareConfig.model_validate(parse_overrides('{"large": {"local_epochs": 2}, "small": {"batch_size": 8}}'))

    assert config.large.local_epochs == 2 and config.small.batch_size == 8
    assert (config.large.model, config.large.learning_rate) == (CompareConfig().large.model, CompareConfig().large.learning_rate)
    assert (config.small.model, config.small.local_epochs) == (CompareConfig().small.model, CompareConfig().small.local_epochs)
    assert CompareConfig.model_validate(config.model_dump()) == config
    with pytest.raises(ValueError, match="large.local_epochs"):
        parse_overrides('{"large": {"local_epochs": 0}}')


def test_resume_from_takes_a_run_key_and_retries_are_bounded():
    assert CompareConfig(resume_from="3f1c-42_a.b").resume_from == "3f1c-42_a.b"
    for bad in ("../other", "runs/x", ".."):
        with pytest.raises(ValidationError, match="resume_from"):
            CompareConfig(resume_from=bad)
    with pytest.raises(ValidationError, match="arm_retries"):
        CompareConfig(arm_retries=-1)


def test_round_rules_are_per_arm_with_safe_defaults():
    config = CompareConfig.model_validate(
        {"large": {"model": "cnn", "learning_rate": 0.1, "aggregation": "krum", "min_replies": 2,
                   "max_update_norm": 25.0, "round_timeout_s": 90}}
    )

    assert (config.large.aggregation, config.large.min_replies) == ("krum", 2)
    assert (config.large.max_update_norm, config.large.round_timeout_s) == (25.0, 90)
    small = config.small
    assert (small.aggregation, small.min_replies, small.max_update_norm, small.round_timeout_s) == (
        "fedavg", 1, None, 600.0)


def test_robust_aggregation_with_client_level_dp_is_refused_naming_the_arm():
    with pytest.raises(ValidationError, match=r"small\.aggregation: client-level DP"):
        CompareConfig.model_validate({"small": {"model": "logreg", "learning_rate": 0.01, "aggregation": "krum"},
                                      "privacy": {"mode": "client-level"}})
    allowed = CompareConfig.model_validate({"small": {"model": "logreg", "learning_rate": 0.01, "aggregation": "krum"},
                                            "privacy": {"mode": "client-level", "arms": "large"}})
    assert allowed.small.aggregation == "krum"


def test_preprocessing_auto_is_federated_for_a_file_and_none_for_built_ins_images_and_private_runs(tmp_path) -> None:
    (tmp_path / "images" / "0").mkdir(parents=True)

    def mode(dataset: str, private: bool = False) -> str:
        return CompareConfig.model_validate({"data": {"dataset": dataset}}).data.preprocessing_mode(private=private)

    assert mode("/data/site.csv") == "federated" and mode("/data/site.npz") == "federated"
    assert mode("digits") == "none" and mode(str(tmp_path / "images")) == "none"
    assert mode("/data/site.csv", private=True) == "none"


def test_a_private_run_refuses_federated_statistics_and_takes_a_fixed_spec() -> None:
    spec = {"version": 1, "columns": [{"name": "age", "kind": "numeric", "mean": 40.0, "std": 12.0, "fill": 40.0}]}
    private = {"privacy": {"mode": "client-level"}}

    with pytest.raises(ValidationError, match=r"data.preprocessing: 'federated' would compute the nodes' feature "
                                              r"means.*outside the privacy budget.*fixed spec"):
        CompareConfig.model_validate({**private, "data": {"dataset": "/d/a.csv", "preprocessing": "federated"}})
    fixed = CompareConfig.model_validate({**private, "data": {"dataset": "/d/a.csv", "preprocessing": spec}})
    assert fixed.data.preprocessing_mode(private=True) == "fixed"
    with pytest.raises(ValidationError, match=r"column 'age' needs std > 0"):
        CompareConfig.model_validate({"data": {"preprocessing": {**spec, "columns": [{**spec["columns"][0], "std": 0}]}}})


def test_by_column_partitioning_and_its_column_come_together_on_a_csv() -> None:
    ok = CompareConfig.model_validate({"data": {"dataset": "/d/a.csv", "partitioning": "by-column",
                                                "partition_by": "site"}})

    assert ok.data.partition_by == "site"
    with pytest.raises(ValidationError, match=r"'by-column' and partition_by go together"):
        CompareConfig.model_validate({"data": {"dataset": "/d/a.csv", "partitioning": "by-column"}})
    with pytest.raises(ValidationError, match=r"partition_by names a column of a CSV file, but the dataset is 'mnist'"):
        CompareConfig.model_validate({"data": {"partitioning": "by-column", "partition_by": "site"}})


def test_prefect_accepts_an_arm_given_in_part_as_the_deployments_parameter():
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import is_valid, validate

    from flows.compare import federated_compare

    schema = parameter_schema(federated_compare).model_dump_for_openapi()
    partial = {"config": {"small": {"model": "gnb"}, "large": {"local_epochs": 2}}}

    validate(partial, schema, raise_on_error=True)  # what the Prefect server checks before it creates the run
    assert not is_valid({"config": {"small": {"local_epochs": 0}}}, schema), "the bounds still travel to the server"
    config = CompareConfig.model_validate(partial["config"])
    assert (config.small.model, config.small.learning_rate) == ("gnb", CompareConfig().small.learning_rate)
    assert (config.large.model, config.large.local_epochs) == ("auto", 2)

