"""The simulation engine's parts without Ray: settings, tiers, seeded sampling by partition, store ledgers."""

from __future__ import annotations

import json
import random

import pytest
from prefect.logging import disable_run_logger
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from pydantic import ValidationError

from clients.node_tasks import node_facts
from clients.spec import RunSpec, SimulationSpec
from flows.config import CompareConfig
from flows.simulation import arm_tier, federation_config, virtual_federation
from infra.store import open_store
from privacy.accounting import plan_sample_level
from privacy.ledger import BudgetExceeded, PrivacyLedger, StoreLedger
from server._grid import ArmGrid
from server.arm import _sampled_nodes, _sampling
from server.strategy import recording_strategy


def test_the_first_gpu_share_of_the_partitions_is_tier_gpu_and_a_virtual_node_takes_its_tier_from_it():
    sim = SimulationSpec(num_nodes=10, gpu_share=0.3)
    run = RunSpec(simulation=sim)

    assert [sim.tier_of(p) for p in range(10)] == ["gpu"] * 3 + ["cpu"] * 7
    assert node_facts({"partition-id": 2, "num-partitions": 10}, run).tier == "gpu"
    assert node_facts({"partition-id": 3, "num-partitions": 10}, run).tier == "cpu"
    assert node_facts({"partition-id": 3, "num-partitions": 10}).tier == "cpu", "a real node without a tier: cpu"
    assert node_facts({"partition-id": 3, "num-partitions": 10, "tier": "gpu"}, run).tier == "gpu", "its own wins"


def test_a_round_samples_flowers_share_with_the_minimum_and_never_more_than_there_are():
    sim = SimulationSpec(num_nodes=1000, fraction_train=0.1, min_train_nodes=2)
    assert sim.sample_size(1000, 0.1, 2) == 100
    assert sim.sample_size(10, 0.1, 2) == 2
    assert sim.sample_size(1, 0.1, 2) == 1
    run = RunSpec(simulation=sim)
    assert _sampled_nodes(run, 500) == 50 and _sampled_nodes(RunSpec(), 4) == 4
    assert _sampling(RunSpec()) == {"min_train_nodes": 0, "min_evaluate_nodes": 0}, "real nodes: every node"


def test_the_flow_refuses_a_tier_and_a_malformed_ray_address_and_sets_each_arms_tier():
    with pytest.raises(ValidationError, match="simulation.tier"):
        CompareConfig(engine="simulation", simulation={"tier": "gpu"})
    with pytest.raises(ValidationError, match="simulation.ray_address"):
        CompareConfig(engine="simulation", simulation={"ray_address": "http://head:8265/x y"})
    config = CompareConfig(engine="simulation", simulation={"num_nodes": 40, "ray_address": "ray://head:10001"})
    spec = config.run_spec("large", arm="large", model="cnn", run_key="k", store_uri="/s", nodes=[], tier="gpu")
    assert (spec.simulation.num_nodes, spec.simulation.tier, spec.simulated) == (40, "gpu", True)
    again = RunSpec.from_run_config(spec.to_run_config())
    assert again.simulation == spec.simulation, "the run config carries the simulation settings"
    deployed = CompareConfig().run_spec("large", arm="large", model="cnn", run_key="k", store_uri="/s", nodes=[1])
    assert not deployed.simulated
    assert federation_config(config) == {"num_supernodes": 40, "client_resources_num_cpus": 1,
                                         "client_resources_num_gpus": 0.0}


def test_the_virtual_nodes_are_their_partitions_and_an_arm_trains_on_one_tier_or_all():
    config = CompareConfig(engine="simulation", simulation={"num_nodes": 30, "gpu_share": 0.2},
                           data={"dataset": "digits", "partitioning": "iid"})
    with disable_run_logger():
        answer = virtual_federation.fn(config)
    nodes = answer["nodes"]

    assert [n["partition-id"] for n in nodes] == list(range(30)) == [n["node_id"] for n in nodes]
    assert sum(n["num-train"] + n["num-test"] for n in nodes) == 1437  # digits' pool: 80% of 1,797
    assert answer["virtual"]["gpu_nodes"] == 6 == sum(n["tier"] == "gpu" for n in nodes)
    assert answer["virtual"]["train_examples"][0] >= 1
    assert arm_tier(nodes, list(range(30))) == ""
    assert arm_tier(nodes, list(range(6))) == "gpu" and arm_tier(nodes, list(range(6, 30))) == "cpu"
    with pytest.raises(ValueError, match="one tier"):
        arm_tier(nodes, [0, 29])


def test_too_many_virtual_nodes_for_the_data_fail_naming_the_setting():
    config = CompareConfig(engine="simulation", simulation={"num_nodes": 500}, data={"dataset": "digits"})
    with pytest.raises(ValueError, match=r"simulation.num_nodes: 500 virtual nodes.*min_partition_size"), \
            disable_run_logger():
        virtual_federation.fn(config)


class _Grid:
    """The least of a Flower grid that ArmGrid.ordered and Flower's sampling read: the node ids."""

    def __init__(self, node_ids):
        self.node_ids = node_ids

    def get_node_ids(self):
        return list(self.node_ids)


def test_seeded_sampling_by_partition_picks_the_same_partitions_whatever_ids_flower_gave_the_nodes():
    def sampled(ids_by_partition: dict[int, int], server_round: int) -> list[int]:
        grid = ArmGrid(_Grid(ids_by_partition.values()), list(ids_by_partition.values()),
                       partitions={node: p for p, node in ids_by_partition.items()}, by_partition=True)
        strategy = recording_strategy("fedavg", fraction_train=0.1, min_train_nodes=2, min_available_nodes=0,
                                      sampling_seed=7)
        random.seed(12345)  # whatever state `random` is in
        strategy._seed_sample("train", server_round)  # what configure_train does before Flower's FedAvg samples
        chosen, _ = sample_nodes(grid.pinned(grid.get_node_ids()), 0, 20)  # FedAvg's sampler: 10% of 200
        partition = {node: p for p, node in ids_by_partition.items()}
        return sorted(partition[node] for node in chosen)

    one = {p: 10_000 + 37 * p for p in range(200)}
    other = {p: node for p, node in zip(range(200), random.Random(3).sample(range(10**9), 200))}

    assert sampled(one, 1) == sampled(other, 1) and len(sampled(one, 1)) == 20
    assert sampled(one, 1) != sampled(one, 2)


def test_a_store_ledger_charges_a_virtual_node_once_per_message_and_keeps_its_budget(tmp_path):
    store = open_store(f"file://{tmp_path}")
    plan = plan_sample_level(num_examples=40, batch_size=8, local_epochs=1, rounds=3, target_epsilon=3.0,
                             delta=1e-5, max_grad_norm=1.0, accountant="rdp")
    ledger = StoreLedger(store, "privacy-ledgers/x/partition-4.json")
    first = ledger.charge(plan, run_key="r", arm="small", server_round=1, message_id="m1")
    again = ledger.charge(plan, run_key="r", arm="small", server_round=1, message_id="m1")  # a retried message
    ledger.charge(plan, run_key="r", arm="small", server_round=2, message_id="m2")

    assert again == first and len(ledger.entries()) == 2
    stored = json.loads(store.get_bytes("privacy-ledgers/x/partition-4.json"))
    assert [e["round"] for e in stored["entries"]] == [1, 2]
    file_ledger = PrivacyLedger(tmp_path / "same.json")
    for r, m in ((1, "m1"), (2, "m2")):
        file_ledger.charge(plan, run_key="r", arm="small", server_round=r, message_id=m)
    assert ledger.spent(delta=1e-5, accountant="rdp") == pytest.approx(file_ledger.spent(delta=1e-5, accountant="rdp"))
    capped = StoreLedger(store, "privacy-ledgers/x/partition-4.json", budget_epsilon=first["epsilon_node"] * 1.5)
    with pytest.raises(BudgetExceeded, match="above its budget"):
        capped.charge(plan, run_key="later", arm="small", server_round=1, message_id="m9")
    assert len(capped.entries()) == 2, "a refused charge records nothing"


def test_the_simulation_deployment_is_1000_virtual_nodes_of_fashion_mnist_each_holding_a_partition():
    from flows.config import deployment_config

    config = CompareConfig.model_validate(deployment_config("simulation"))

    assert (config.engine, config.simulation.num_nodes, config.simulation.fraction_train) == ("simulation", 1000, 0.1)
    assert (config.data.dataset, config.data.partitioning, config.data.dirichlet_alpha) == ("fashion-mnist",
                                                                                            "dirichlet", 0.5)
    with disable_run_logger():
        virtual = virtual_federation.fn(config)["virtual"]
    assert virtual["nodes"] == 1000 and virtual["train_examples"][0] >= 1  # min_partition_size 10: at least 8
