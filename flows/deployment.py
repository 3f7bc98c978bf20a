"""Price serving each arm's exported variants and describe them in the report (plain functions, no Prefect).

A serving replica runs one variant with ``threads`` onnxruntime threads. It is priced as
its vCPUs plus its measured peak memory (``CostModel.serving_vcpu_hour_usd``,
``serving_gb_hour_usd``) for the hours that the measured batch-64 throughput needs::

    replica_usd_per_hour        = threads * serving_vcpu_hour_usd + peak_rss_mb / 1024 * serving_gb_hour_usd
    usd_per_million_predictions = replica_usd_per_hour / (throughput_per_s * 3600) * 1e6
    serving_usd                 = max(predictions_per_month * months / 1e6 * usd_per_million_predictions,
                                      min_replicas * replica_usd_per_hour * 730 * months)

An arm is priced at its *serving variant*: the cheapest per prediction among those whose
accuracy is within ``max_accuracy_drop`` of its fp32 export. Its ``total_cost_usd`` is its
training cost plus that serving cost.
"""

from __future__ import annotations

from typing import Any

from flows.decision import CostModel
from flows.tables import markdown_table

HOURS_PER_MONTH = 730.0  # 8,760 hours a year / 12
VARIANT_MEANING = {
    "fp32": "the exported graph, float32 (onnxruntime)",
    "int8": "static QDQ int8 quantization, calibrated",
    "fp16": "float16 weights and compute",
}
_ORDER = ("fp32", "int8", "fp16")  # the report's row order (deploy.json's keys come back sorted)
_FIGURES = ("bytes", "accuracy", "max_abs_diff", "latency_ms_p50", "latency_ms_p90", "latency_ms_p99",
            "throughput_per_s", "load_seconds", "peak_rss_mb")


def replica_usd_per_hour(peak_rss_mb: float, *, threads: int, cost: CostModel) -> float:
    """Return what one serving replica costs per hour: its vCPUs and its peak memory."""
    return threads * cost.serving_vcpu_hour_usd + peak_rss_mb / 1024.0 * cost.serving_gb_hour_usd


def price_deployment(deploy: dict[str, Any], *, training_usd: float, settings: Any, cost: CostModel
                     ) -> dict[str, Any]:
    """Return an arm's report ``deployment`` object from its deploy.json, training cost and deployment settings.

    ``settings`` is a ``CompareConfig.deployment`` (predictions_per_month, months,
    min_replicas, max_accuracy_drop, threads).
    """
    horizon = settings.predictions_per_month * settings.months
    variants = {}
    for name, entry in deploy["variants"].items():
        hourly = replica_usd_per_hour(entry["peak_rss_mb"], threads=settings.threads, cost=cost)
        per_million = hourly / (entry["throughput_per_s"] * 3600.0) * 1e6
        floor = settings.min_replicas * hourly * HOURS_PER_MONTH * settings.months
        variants[name] = {**{k: entry.get(k) for k in _FIGURES}, "usd_per_million_predictions": per_million,
                          "serving_usd": max(horizon / 1e6 * per_million, floor)}
    reference = variants["fp32"]["accuracy"]
    eligible = [n for n, v in variants.items() if v["accuracy"] >= reference - settings.max_accuracy_drop - 1e-12]
    chosen = min(eligible, key=lambda n: (variants[n]["usd_per_million_predictions"], n))
    serving = variants[chosen]["serving_usd"]
    return {
        "variants": variants, "skipped": deploy.get("skipped", {}), "serving_variant": chosen,
        "serving_usd": serving, "training_usd": training_usd, "total_cost_usd": training_usd + serving,
        "predictions_per_month": settings.predictions_per_month, "months": settings.months,
        "min_replicas": settings.min_replicas, "threads": settings.threads, "calibration": deploy.get("calibration"),
        "training_round": deploy.get("training_round"), "opset": deploy.get("opset"),
    }


def _usd(value: float) -> str:
    """Format dollars with 4 significant digits (the recommendation's style)."""
    from flows.decision import _usd as usd

    return usd(value)


def _count(value: float) -> str:
    """Format a number of predictions, e.g. 12.3M or 950k."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


def serving_sentences(arms: dict[str, dict[str, Any]], recommendation: dict[str, Any]) -> tuple[str, list[str]]:
    """Return a sentence naming the serving cost of the recommendation, and what volume would change it.

    With a choice: its serving variant, accuracy, p50 latency and cost over the horizon, and
    for every other arm that reached the target the monthly volume at which the totals cross
    (training + serving, at full utilization). Without one: the serving cost of each arm.
    """
    deployed = {name: s["deployment"] for name, s in arms.items() if s.get("deployment")}
    if not deployed:
        return "", []
    choice = recommendation.get("choice")
    if choice not in deployed:
        listed = "; ".join(f"the {n} model serves at {_usd(d['serving_usd'])} ({d['serving_variant']}, "
                           f"{_usd(d['variants'][d['serving_variant']]['usd_per_million_predictions'])} per million predictions)"
                           for n, d in deployed.items())
        return f"Serving over the horizon: {listed}.", []
    d = deployed[choice]
    v = d["variants"][d["serving_variant"]]
    sentence = (f"Serving it as {d['serving_variant']} ({v['accuracy']:.3f} accuracy at {v['latency_ms_p50']:.2f} ms "
                f"p50) costs {_usd(v['usd_per_million_predictions'])} per million predictions, "
                f"{_usd(d['serving_usd'])} for {_count(d['predictions_per_month'])} a month over {d['months']:g} "
                f"months; training plus serving {_usd(d['total_cost_usd'])}.")
    changes = []
    rate = v["usd_per_million_predictions"] / 1e6 * d["months"]  # usd per (prediction a month)
    fixed = arms[choice]["time_to_target"]["usd"]
    for name, other in deployed.items():
        if name == choice or not arms[name]["time_to_target"]["reached"]:
            continue
        o = other["variants"][other["serving_variant"]]
        other_rate = o["usd_per_million_predictions"] / 1e6 * other["months"]
        other_fixed = arms[name]["time_to_target"]["usd"]
        if rate == other_rate:
            continue
        crossing = (other_fixed - fixed) / (rate - other_rate)
        if crossing <= 0:
            continue
        side = "more" if rate > other_rate else "fewer"
        changes.append(f"the {name} model ({other['serving_variant']}, {_usd(o['usd_per_million_predictions'])} per "
                       f"million predictions) would cost less in total above {_count(crossing)} predictions a month"
                       if side == "more" else
                       f"the {name} model ({other['serving_variant']}) would cost less in total below "
                       f"{_count(crossing)} predictions a month, where its cheaper training outweighs serving")
    if d["min_replicas"] == 0:
        changes.append("serving is priced at full utilization (deployment.min_replicas = 0); billing replicas "
                       "around the clock (min_replicas) raises every arm's serving cost at low volume")
    return sentence, changes


def add_serving(recommendation: dict[str, Any], arms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Return ``recommendation`` with the serving sentence appended to its text and volumes to what_would_change."""
    sentence, changes = serving_sentences(arms, recommendation)
    if not sentence:
        return recommendation
    return {**recommendation, "text": f"{recommendation['text']} {sentence}",
            "what_would_change": [*recommendation["what_would_change"], *changes]}


def deployment_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Return one row per arm and variant: size, accuracy, latency, throughput, memory and price."""
    rows = []
    for arm, s in report["arms"].items():
        d = s.get("deployment")
        if not d:
            continue
        for name in sorted(d["variants"], key=lambda n: _ORDER.index(n) if n in _ORDER else len(_ORDER)):
            v = d["variants"][name]
            rows.append({
                "arm": arm, "model": s["model"], "variant": name + (" (priced)" if name == d["serving_variant"] else ""),
                "MB": round(v["bytes"] / 1e6, 3), "accuracy": round(v["accuracy"], 4),
                "max Δp vs framework": v["max_abs_diff"], "p50 ms": round(v["latency_ms_p50"], 3),
                "p90 ms": round(v["latency_ms_p90"], 3), "p99 ms": round(v["latency_ms_p99"], 3),
                "batch-64 / s": round(v["throughput_per_s"], 1), "load s": round(v["load_seconds"], 3),
                "peak RSS MB": round(v["peak_rss_mb"], 1),
                "$ / M predictions": round(v["usd_per_million_predictions"], 6),
                "$ serving": round(v["serving_usd"], 4),
            })
    return rows


# the per-variant figures in two tables of at most 8 columns, so that each fits a 1,200 px page
_TABLE_COLUMNS = (
    ("arm", "model", "variant", "MB", "accuracy", "max Δp vs framework", "load s", "peak RSS MB"),
    ("arm", "variant", "p50 ms", "p90 ms", "p99 ms", "batch-64 / s", "$ / M predictions", "$ serving"),
)


def deployment_tables(report: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """Return the per-variant rows as two narrower tables: size and quality, then speed and price."""
    rows = deployment_rows(report)
    if not rows:
        return []
    return [[{column: row[column] for column in columns} for row in rows] for columns in _TABLE_COLUMNS]


def total_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Return one row per deployed arm: training, serving and total cost."""
    return [{"arm": arm, "priced variant": s["deployment"]["serving_variant"],
             "$ training": round(s["deployment"]["training_usd"], 6), "$ serving": round(s["deployment"]["serving_usd"], 4),
             "$ total": round(s["deployment"]["total_cost_usd"], 4)}
            for arm, s in report["arms"].items() if s.get("deployment")]


def deployment_explained(report: dict[str, Any]) -> str:
    """Say in plain words what the Deployment section measured and how it priced it."""
    d = next(s["deployment"] for s in report["arms"].values() if s.get("deployment"))
    skipped = "; ".join(f"{arm} {v}: {why}" for arm, s in report["arms"].items() if s.get("deployment")
                        for v, why in s["deployment"]["skipped"].items())
    return (
        "Each arm's final global model (round " f"{d['training_round']}) is exported to ONNX (opset {d['opset']}) with "
        + ("the preprocessing spec's features as its input (deploy.json's input.preprocessing says how a raw row "
           "is encoded)" if (report.get("federation") or {}).get("preprocessing") else "its input scaling inside the graph")
        + " and served by onnxruntime on this machine's CPU with "
        f"{d['threads']} threads. Variants: " + "; ".join(f"*{k}* — {m}" for k, m in VARIANT_MEANING.items()) +
        f". int8 calibration: {d['calibration']}. Accuracy is each variant's own, on the central test set; "
        "*max Δp* is the largest difference of a class probability from the framework's. Latency: batch 1, "
        "one query at a time after a warm-up; throughput: batches of 64; load s and peak RSS: a fresh serving "
        "process. A replica is priced as its vCPUs and peak memory for the hours its throughput needs "
        f"(`CompareConfig.cost`, `CompareConfig.deployment`: {_count(d['predictions_per_month'])} predictions a "
        f"month for {d['months']:g} months); each arm is priced at its cheapest variant within "
        "`max_accuracy_drop` of fp32 (*priced*)." + (f" Not made: {skipped}." if skipped else "")
    )


def render_section(report: dict[str, Any], image: str | None = None) -> list[str]:
    """Return the markdown lines of the Deployment section (none when no arm was deployed)."""
    tables = deployment_tables(report)
    if not tables:
        return []
    parts = ["## Deployment", deployment_explained(report), "", *(markdown_table(rows) for rows in tables),
             markdown_table(total_rows(report))]
    if image:
        parts += [f"![Accuracy against p50 latency]({image})", ""]
    return parts


def calibration_source(*, private: bool, pooled: bool) -> str:
    """Say which data calibrates an arm's int8 variant, and why the flow may use it."""
    if not pooled:
        return "none: the nodes hold their own data, which never leaves them, so no int8 variant"
    if private:
        return ("the central test set (the server's own data, which no node trains on): the nodes' training "
                "data would leave the DP guarantee, since quantization ranges are not noised")
    return ("the arm's nodes' pooled training data, which the flow already pools for the central reference "
            "(a shared dataset split over simulated nodes)")


def deployment_data(dataset: Any, *, partition_ids: list[int] | None, num_partitions: int, private: bool,
                    examples: int, data_kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """Return (central test set, int8 calibration inputs or None) for one arm, as ``calibration_source`` says."""
    import numpy as np

    from clients.data import central_test, pooled_train

    test = central_test(dataset, central_test_fraction=data_kwargs["central_test_fraction"], seed=data_kwargs["seed"])
    if partition_ids is None:
        return test, None
    pool = test if private else pooled_train(dataset, num_partitions=num_partitions,
                                             partition_ids=tuple(partition_ids), **data_kwargs)
    pick = np.random.default_rng(data_kwargs["seed"]).permutation(len(pool))[:examples]
    return test, pool.x[np.sort(pick)]


def deploy_arm(store: Any, run_key: str, arm: str, *, dataset: Any, test: Any, calibration_x: Any,
               calibration: str, settings: Any, preprocessing: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export, compress and measure an arm's final stored model; write the variants and deploy.json; return it.

    ``dataset`` is the run's dataset, ``test`` the central test set (or the examples to
    measure accuracy on), ``calibration_x`` int8 calibration inputs (None: no int8),
    ``preprocessing`` the spec that turned the raw table into the model's features (stored
    in deploy.json so that a client encodes its rows the same way).
    """
    from clients.inference import InferenceSettings, deploy_variants
    from clients.models import build_model
    from infra.checkpoints import load_latest, read_checkpoint
    from infra.deployments import write_deployment

    round_, arrays, _ = load_latest(store, run_key, arm)
    meta = read_checkpoint(store, run_key, arm, round_) or {}
    described = meta.get("model") or {}
    args = described.get("args") or {}
    model = build_model(described["name"], input_shape=tuple(args.get("input_shape", dataset.input_shape)),
                        num_classes=int(args.get("num_classes", dataset.num_classes)), seed=0, device="cpu",
                        private=bool(args.get("private", False)))
    model.set_arrays(arrays)
    result = deploy_variants(model, dataset_name=dataset.name, test=test, calibration_x=calibration_x,
                             settings=InferenceSettings(threads=settings.threads, queries=settings.latency_queries,
                                                        warmup=settings.warmup_queries,
                                                        batches=settings.throughput_batches))
    first = next(iter(result["variants"].values()))
    import onnxruntime

    document = {
        "model": described["name"], "training_round": round_, "opset": _opset(),
        "input": {"name": "input", "shape": ["batch", *first["input_shape"]], "example_shape": first["input_shape"],
                  "dtype": "float32", "raw_input_max": first["raw_input_max"],
                  "units": (f"raw values 0..{first['raw_input_max']:g} (the graph divides by {first['raw_input_max']:g})"
                            if first["raw_input_max"] else
                            "the features after input.preprocessing (clients.preprocess.apply_spec)" if preprocessing
                            else "the features as the dataset loads them"),
                  **({"preprocessing": preprocessing} if preprocessing else {})},
        "output": {"name": "probabilities", "dtype": "float32", "classes": int(dataset.num_classes)},
        "calibration": calibration, "skipped": result["skipped"], "framework_accuracy": result["framework_accuracy"],
        "test_examples": len(test), "onnxruntime": onnxruntime.__version__,
        "variants": {n: {k: v for k, v in m.items() if k not in ("onnx", "input_shape", "raw_input_max")}
                     for n, m in result["variants"].items()},
    }
    return write_deployment(store, run_key, arm, models={n: m["onnx"] for n, m in result["variants"].items()},
                            document=document)


def _opset() -> int:
    """Return the ONNX opset the exported graphs use."""
    from clients.export import OPSET

    return OPSET
