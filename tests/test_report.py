"""Report arithmetic on hand-made rounds."""

import numpy as np
import pytest

from flows.report import first_round_reaching, model_size, render_markdown, summarize_arm, summary_rows


def _round(number, accuracy, train_seconds=(1.0, 2.0)):
    return {
        "round": number, "model": "cnn", "round_seconds": 10.0, "bytes_down": 100, "bytes_up": 50,
        "central": {"accuracy": accuracy, "macro_f1": accuracy - 0.01, "loss": 1 - accuracy},
        "federated": {"accuracy": accuracy + 0.02},
        "nodes": [{"node_id": i, "train": {"train-seconds": s, "train-cpu-seconds": s / 2}, "evaluate": {}}
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
    report = {"run_key": "k", "target_accuracy": 0.9, "arms": arms, "federation": {"nodes": []},
              "config": {"data": {"dataset": "mnist", "partitioning": "iid"}, "assignment": "by-tier"}}

    rows = summary_rows(report)
    markdown = render_markdown(report)

    assert [r["arm"] for r in rows] == ["large", "small"]
    assert rows[0]["round reaching target"] == 1 and rows[1]["round reaching target"] is None
    assert "| large | cnn |" in markdown and "## small" in markdown
