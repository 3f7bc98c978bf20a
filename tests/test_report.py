"""Report arithmetic on hand-made rounds."""

import re

import numpy as np
import pytest

from flows.decision import CostModel
from flows.report import (
    build_report, first_round_reaching, model_size, render_markdown, summarize_arm, summary_rows,
)

KWH_PER_TRAIN_SECOND = 1e-5  # what the hand-made nodes report measuring (codecarbon's train-kwh)


def _round(number, accuracy, train_seconds=(1.0, 2.0)):
    return {
        "round": number, "model": "cnn", "round_seconds": 10.0, "bytes_down": 100, "bytes_up": 50,
        "central": {"accuracy": accuracy, "macro_f1": accuracy - 0.01, "loss": 1 - accuracy},
        "federated": {"accuracy": accuracy + 0.02},
        "nodes": [{"node_id": i, "train": {"train-seconds": s, "train-cpu-seconds": s / 2,
                                           "train-kwh": s * KWH_PER_TRAIN_SECOND, "energy-cpu-method": 2.0},
                   "evaluate": {}}
                  for i, s in enumerate(train_seconds)],
        "failures": [],
    }


def test_summary_takes_final_and_best_rounds_and_the_gap_to_the_reference():
    rounds = [_round(1, 0.80), _round(2, 0.93), _round(3, 0.91)]

    summary = summarize_arm("large", rounds, nodes=[7, 8], parameters=10, model_bytes=40, wall_seconds=31.0,
                            reference={"accuracy": 0.95}, target_accuracy=0.9)

    assert summary["final_accuracy"] == 0.91
    assert (summary["best_accuracy"], summary["best_round"]) == (0.93, 2)
    assert summary["gap_to_reference"] == pytest.approx(0.04)
    assert summary["first_round_reaching_target"] == 2
    assert summary["client_train_seconds"] == pytest.approx(9.0)
    assert summary["bytes_per_round"] == 150.0 and summary["bytes_total"] == 450
    assert [r["slowest_client_train_seconds"] for r in summary["per_round"]] == [2.0, 2.0, 2.0]


def test_target_not_reached_is_none():
    assert first_round_reaching([_round(1, 0.5), _round(2, 0.6)], 0.9) is None


def test_arm_without_rounds_is_an_error():
    with pytest.raises(ValueError, match="no complete round"):
        summarize_arm("small", [], nodes=[], parameters=0, model_bytes=0, wall_seconds=0.0, reference=None,
                      target_accuracy=0.9)


def test_model_size_counts_parameters_and_bytes():
    arrays = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float64)}
    assert model_size(arrays) == (16, 3 * 4 * 4 + 4 * 8)


def test_markdown_and_rows_show_every_arm():
    arms = {
        arm: summarize_arm(arm, [_round(1, acc)], nodes=[1], parameters=5, model_bytes=20, wall_seconds=1.0,
                           reference=None, target_accuracy=0.9)
        for arm, acc in (("large", 0.95), ("small", 0.85))
    }
    report = build_report(
        run_key="k", target_accuracy=0.9, arms=arms, federation={"nodes": []}, versions={},
        config={"data": {"dataset": "mnist", "partitioning": "iid"}, "assignment": "by-tier"},
    )

    rows = summary_rows(report)
    markdown = render_markdown(report, images={"accuracy per round": "data:image/png;base64,AAAA"})

    assert [r["arm"] for r in rows] == ["large", "small"]
    assert rows[0]["round reaching target"] == 1 and rows[1]["round reaching target"] is None
    assert "|  | large | small |" in markdown and "| model | cnn | cnn |" in markdown and "## small" in markdown
    assert report["recommendation"]["choice"] == "large"  # the only arm reaching 0.9
    assert report["recommendation"]["text"] in markdown
    assert "![accuracy per round](data:image/png;base64,AAAA)" in markdown
    assert "measured on each node with codecarbon" in markdown
    assert "This run's nodes measured their CPU by: TDP × process CPU load." in markdown
    assert "Node replies without an energy measurement" not in markdown


def test_a_report_from_before_measured_energy_says_its_energy_was_estimated():
    arm = summarize_arm("large", [_round(1, 0.95)], nodes=[1], parameters=5, model_bytes=20, wall_seconds=1.0,
                        reference=None, target_accuracy=0.9)
    report = build_report(run_key="k", target_accuracy=0.9, arms={"large": arm}, federation={"nodes": []},
                          versions={}, config={"data": {"dataset": "mnist", "partitioning": "iid"},
                                               "assignment": "all-nodes",
                                               "cost": {**CostModel().model_dump(), "gpu_watts": 300.0}})
    report["report_version"] = 3

    markdown = render_markdown(report)

    assert "Energy was estimated, not measured: 10.0 W per busy CPU core and 300.0 W per busy GPU" in markdown
    assert "codecarbon" not in markdown


def test_cost_is_the_price_table_applied_to_the_measured_resources():
    rounds = [_round(1, 0.8), _round(2, 0.9)]
    for r in rounds:
        r["aggregate_seconds"], r["central_evaluate_seconds"] = 0.5, 1.5
        r["nodes"][0]["train"]["on-gpu"] = 1.0  # node 0 trains on a GPU: billed by wall time
        r["nodes"][1]["evaluate"] = {"evaluate-seconds": 0.4, "evaluate-cpu-seconds": 0.3, "peak-rss-mb": 900.0,
                                     "evaluate-kwh": 4e-6}
    cost = CostModel(cpu_hour_usd=3.6, gpu_hour_usd=36.0, gb_transfer_usd=1e9 / 150, cpu_watts=100.0,
                     kg_co2_per_kwh=2.0, pue=1.25)

    summary = summarize_arm("large", rounds, nodes=[0, 1], parameters=1, model_bytes=4, wall_seconds=1.0,
                            reference=None, target_accuracy=0.9, cost=cost)

    first = summary["per_round"][0]
    # node 1: train CPU 1.0 s + evaluate CPU 0.3 s; server 0.5 + 1.5 s; node 0: GPU wall 1.0 s; 150 bytes
    assert (first["cpu_seconds"], first["gpu_seconds"], first["server_seconds"]) == pytest.approx((1.3, 1.0, 2.0))
    assert first["usd"] == pytest.approx(3.3 * 3.6 / 3600 + 1.0 * 36.0 / 3600 + 1.0)
    # measured on the nodes: train 1e-5 (node 0) + 2e-5 (node 1) + evaluate 4e-6 (node 1); server: 2 s at 100 W
    assert first["node_kwh"] == pytest.approx(3.4e-5)
    assert first["server_kwh_estimate"] == pytest.approx(2.0 * 100.0 / 3.6e6)
    assert first["kwh"] == pytest.approx((3.4e-5 + 2.0 * 100.0 / 3.6e6) * 1.25)
    assert first["kg_co2"] == pytest.approx(2.0 * first["kwh"])
    assert summary["total_usd"] == pytest.approx(2 * first["usd"])
    assert summary["total_kwh"] == pytest.approx(2 * first["kwh"])
    assert summary["total_kg_co2"] == pytest.approx(2 * 2.0 * first["kwh"])
    assert (summary["node_kwh"], summary["energy_unmeasured"]) == (pytest.approx(6.8e-5), 0)
    # the per-node rows and the server estimate add up to the per-round totals
    nodes_kwh = sum(n["kwh"] for n in summary["per_node"])
    assert nodes_kwh + summary["server_kwh_estimate"] * 1.25 == pytest.approx(summary["total_kwh"])
    assert sum(n["kg_co2"] for n in summary["per_node"]) == pytest.approx(2.0 * nodes_kwh)
    assert summary["time_to_target"]["round"] == 2
    assert summary["time_to_target"]["usd"] == pytest.approx(summary["per_round"][1]["cum_usd"])
    assert summary["peak_rss_mb"] == 900.0


def test_plots_are_png_images_of_every_arm():
    from flows.plots import report_plots

    arms = {
        arm: summarize_arm(arm, [_round(1, acc), _round(2, acc + 0.02)], nodes=[1], parameters=5, model_bytes=20,
                           wall_seconds=1.0, reference={"accuracy": acc + 0.05}, target_accuracy=0.9)
        for arm, acc in (("large", 0.92), ("small", 0.82))
    }
    report = build_report(run_key="k", target_accuracy=0.9, arms=arms, federation={"nodes": []}, versions={},
                          config={"data": {"dataset": "mnist", "partitioning": "iid"}, "assignment": "all-nodes"})

    plots = report_plots(report)

    assert [name for name, _, _ in plots] == ["accuracy", "cost"]
    for _, _, png in plots:
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5_000
    assert report_plots(report)[0][2] == plots[0][2]  # deterministic bytes for the same report


def test_node_costs_price_each_node_by_its_device_and_traffic():
    from flows.report import node_costs

    rounds = [_round(1, 0.8), _round(2, 0.9)]
    for r in rounds:
        r["nodes"][0]["train"]["on-gpu"] = 1.0
        for n in r["nodes"]:
            n["bytes"] = {"down": 1000, "up": 500}
    cost = CostModel(cpu_hour_usd=3.6, gpu_hour_usd=36.0, gb_transfer_usd=1e6)

    gpu_node, cpu_node = node_costs(rounds, cost)

    assert gpu_node["on_gpu"] and not cpu_node["on_gpu"] and gpu_node["rounds"] == 2
    assert (gpu_node["bytes_down"], gpu_node["bytes_up"]) == (2000, 1000)
    # gpu node: 2 rounds x 1.0 s wall at $36/h; cpu node: 2 x 1.0 s CPU (train-cpu-seconds) at $3.6/h
    assert gpu_node["usd"] == pytest.approx(2.0 * 36.0 / 3600 + 3000 / 1e9 * 1e6)
    assert cpu_node["usd"] == pytest.approx(2.0 * 3.6 / 3600 + 3000 / 1e9 * 1e6)
    # energy: what each node measured over its 2 rounds (1 s and 2 s of training), whatever its device
    assert (gpu_node["train_kwh"], cpu_node["train_kwh"]) == pytest.approx((2e-5, 4e-5))
    assert (gpu_node["kwh"], cpu_node["kwh"]) == pytest.approx((2e-5, 4e-5))  # default PUE 1.0
    assert cpu_node["kg_co2"] == pytest.approx(4e-5 * 0.48)
    assert cpu_node["cpu_energy_method"] == "TDP × process CPU load"


def test_replies_without_energy_are_counted_and_named_in_the_report():
    measured, old = _round(1, 0.95), _round(2, 0.96)
    for n in old["nodes"]:  # as a fedcompare before energy measurement stored them
        del n["train"]["train-kwh"], n["train"]["energy-cpu-method"]
    arm = summarize_arm("large", [measured, old], nodes=[0, 1], parameters=1, model_bytes=4, wall_seconds=1.0,
                        reference=None, target_accuracy=0.9)
    report = build_report(run_key="k", target_accuracy=0.9, arms={"large": arm}, federation={"nodes": []},
                          versions={}, config={"data": {"dataset": "mnist", "partitioning": "iid"},
                                               "assignment": "all-nodes"})

    assert [r["energy_unmeasured"] for r in arm["per_round"]] == [0, 2]
    assert arm["per_round"][1]["node_kwh"] == 0.0 and arm["node_kwh"] == pytest.approx(3e-5)
    assert "Node replies without an energy measurement (2 of large" in render_markdown(report)


def _private_round(number, accuracy, epsilon):
    return {**_round(number, accuracy), "privacy": {
        "mode": "sample-level", "accountant": "rdp", "delta": 1e-5, "target_epsilon": 8.0,
        "nodes": {"0": {"noise_multiplier": 0.8, "sample_rate": 0.04, "steps": 75, "max_grad_norm": 1.0,
                        "epsilon": epsilon, "node_epsilon": epsilon}}}}


def test_only_private_arms_within_target_are_recommended_and_privacy_costs_are_shown():
    from flows.export import to_html
    from flows.plots import report_plots

    def arm(name, rounds):
        return summarize_arm(name, rounds, nodes=[0], parameters=5, model_bytes=20, wall_seconds=1.0,
                             reference=None, target_accuracy=0.9)

    arms = {"large": arm("large", [_round(1, 0.97)]),
            "large-eps8": arm("large-eps8", [_private_round(1, 0.93, 7.99)]),
            "small-eps8": arm("small-eps8", [_private_round(1, 0.91, 7.98)])}
    report = build_report(run_key="k", target_accuracy=0.9, arms=arms, federation={"nodes": []}, versions={},
                          config={"data": {"dataset": "mnist", "partitioning": "iid"}, "assignment": "all-nodes",
                                  "privacy": {"mode": "sample-level"}})

    assert report["arms"]["large-eps8"]["gap_to_non_private"] == pytest.approx(0.04)
    assert report["arms"]["small-eps8"]["gap_to_non_private"] is None, "no small arm without DP ran"
    assert report["recommendation"]["choice"] != "large", "the arm without DP is outside the privacy budget"
    assert report["arms"]["large-eps8"]["privacy"]["epsilon"] == 7.99
    markdown = render_markdown(report)
    assert "## Privacy" in markdown and "accuracy lost to DP" in markdown
    assert [name for name, _, _ in report_plots(report)] == ["accuracy", "cost", "privacy"]
    assert "<h2>Privacy</h2>" in to_html(report)

    over = arm("large-eps8", [_private_round(1, 0.95, 9.5)])
    assert not over["privacy"]["within_target"]
    alone = build_report(run_key="k", target_accuracy=0.9, arms={"large-eps8": over}, federation={"nodes": []},
                         versions={}, config={"privacy": {"mode": "sample-level"}})
    assert alone["recommendation"]["choice"] is None, "an arm over its ε target is never recommended"


def test_tables_show_units_rounded_numbers_and_node_names_never_exponents():
    from flows.tables import format_number

    rounds = [_round(1, 0.9123456)]
    rounds[0]["nodes"][0]["node_id"] = 7301846622130012345
    arm = summarize_arm("large", rounds, nodes=[7301846622130012345], parameters=1_270_000, model_bytes=20,
                        wall_seconds=1.0, reference=None, target_accuracy=0.9)
    federation = {"nodes": [{"node_id": 7301846622130012345, "tier": "gpu", "device": "cpu", "partition-id": 0,
                             "num-partitions": 4, "data-source": "partition", "num-train": 850, "num-test": 150,
                             "classes-seen": 10}]}
    report = build_report(run_key="k", target_accuracy=0.9, arms={"large": arm}, federation=federation,
                          versions={}, config={"data": {"dataset": "mnist", "partitioning": "iid"},
                                               "assignment": "all-nodes"})

    markdown = render_markdown(report)

    assert [format_number(v) for v in (2.946e-05, 0.9123456, 12.345, 1234.5, 1_270_000, 0.0, 3.0)] == [
        "0.0000295", "0.912", "12.3", "1,234", "1,270,000", "0", "3"]
    assert not re.search(r"\d[eE][-+]?\d", markdown.split("## Privacy")[0]), "no exponent notation anywhere"
    assert "## large: cnn on nodes gpu-0" in markdown and "| gpu-0 |" in markdown
    assert "7301846622130012345" not in markdown.split("## Nodes")[0], "node ids only in the Nodes table"
    for header in ("| node CPU s |", "| $ |", "| Wh |", "| MB sent |", "| Wh total |"):
        assert header in markdown
    assert "cpu_seconds" not in markdown


def test_a_simulated_report_shows_its_virtual_nodes_as_spreads_never_a_row_each():
    from flows.export import to_html

    nodes = list(range(1000))
    rounds = [_round(r, 0.7 + r / 100, train_seconds=tuple(0.01 * (1 + i % 7) for i in range(100))) for r in (1, 2)]
    for r in rounds:  # a seeded sample of 100 of the 1,000 virtual nodes each round
        for i, node in enumerate(r["nodes"]):
            node["node_id"] = 1000 + i + 100 * r["round"]
    arms = {arm: summarize_arm(arm, rounds, nodes=nodes, parameters=5, model_bytes=20, wall_seconds=1.0,
                               reference=None, target_accuracy=0.9) for arm in ("large", "small")}
    virtual = {"nodes": 1000, "gpu_nodes": 500, "fraction_train": 0.1, "min_train_nodes": 2,
               "fraction_evaluate": 0.1, "min_evaluate_nodes": 2, "client_cpus": 1, "client_gpus": 0.0,
               "ray_address": "local", "train_examples": [10.0, 44.0, 170.0], "test_examples": [2.0, 8.0, 30.0],
               "classes": [1.0, 4.0, 9.0]}
    report = build_report(run_key="k", target_accuracy=0.9, arms=arms, federation={"virtual": virtual},
                          versions={}, config={"data": {"dataset": "mnist", "partitioning": "dirichlet"},
                                               "assignment": "all-nodes"})

    markdown = render_markdown(report)
    page = to_html(report)

    assert "## large: cnn on 1000 virtual nodes" in markdown and "on 1000 virtual nodes</h2>" in page
    assert "Over the virtual nodes that trained small (200), all rounds:" in markdown
    assert "| train s | 0.01 | 0.04 | 0.07 | 0.07 |" in markdown  # min, median, p90, max over the 200
    assert "## Virtual nodes (Flower's Simulation Engine)" in markdown and "| virtual nodes (of tier gpu) | 1000 (500) |" \
        in markdown
    assert "| train examples per node (min / median / max) | 10 / 44 / 170 |" in markdown
    assert len(markdown.splitlines()) < 120, "no row per virtual node"
    assert "Virtual nodes (Flower&#x27;s Simulation Engine)" in page
