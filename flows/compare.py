"""The `federated-compare` flow: train a large and a small model federatedly and compare them."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run

from clients.centralized import train_centralized
from clients.models import TEXT_MODELS
from clients.spec import longest_round_s
from flows.assignment import assign_nodes, node_table
from flows.config import CompareConfig, resolve_store_uri, resolve_superlink
from flows.deployment import calibration_source, deploy_arm, deployment_data, price_deployment
from flows.following import run_failed, submit, wait_for
from flows.flower import stop_run
from flows.plots import data_uri, report_plots
from flows.preparation import (
    Variant, arm_model, check_privacy, data_kwargs, discover_nodes, large_need_bytes, plan_variants,
    prepared_dataset, resolve_models, resolve_preprocessing,
)
from flows.report import build_report, model_size, render_markdown, summarize_arm, summary_rows
from flows.simulation import arm_tier, federation_config, virtual_federation, virtual_table
from infra.checkpoints import load_latest, plot_key, read_manifest, report_key, round_metrics
from infra.simulation import simulation_superlink
from infra.state import state_dir
from infra.store import StoreError, open_store

@task(name="train-arm", task_run_name="train-{arm}")
def train_arm(arm: str, model: str, nodes: list[int], config: CompareConfig, run_key: str,
              store_uri: str, superlink: str, base: str | None = None, teacher: tuple[str, str] | None = None,
              epsilon: float | None = None, preprocessing: dict[str, Any] | None = None,
              tier: str | None = None) -> dict[str, Any]:
    """Submit one arm's Flower run, mirror its rounds into Prefect, and wait for it to end.

    ``tier`` (a simulated arm only, ``nodes`` then unused): the tier of the virtual nodes it
    trains on, "" for every virtual node.
    """
    logger = get_run_logger()
    store = open_store(store_uri)
    manifest = read_manifest(store, run_key, arm)
    seen = manifest["latest_complete_round"] if manifest else 0  # a retry or a resume continues after it
    progress = create_progress_artifact(
        progress=100.0 * seen / config.rounds, key=f"progress-{arm}",
        description=f"{arm} arm ({model}): rounds completed",
    )
    simulated = tier is not None
    spec = config.run_spec(base or arm, arm=arm, model=model, run_key=run_key, store_uri=store_uri,
                           nodes=[] if simulated else nodes, epsilon=epsilon, preprocessing=preprocessing,
                           teacher=teacher, tier=tier or "")
    started = time.monotonic()
    run_id = submit(spec, superlink, simulation=federation_config(config) if simulated else None)
    where = f"{len(nodes)} virtual nodes{f' of tier {tier}' if tier else ''}" if simulated else f"nodes {nodes}"
    logger.info("%s arm: Flower run %s submitted (%s on %s%s)", arm, run_id, model, where,
                f", resuming after round {seen}" if seen else "")

    store_down = False

    def mirror_rounds(strict: bool = False) -> None:
        """Log every newly completed round and advance the progress artifact (``strict``: store errors raise)."""
        nonlocal seen, store_down
        try:
            manifest = read_manifest(store, run_key, arm)
            latest = manifest["latest_complete_round"] if manifest else 0
            if latest < seen:  # the ServerApp found stored rounds that fail verification: they are trained again
                logger.warning("%s arm: rounds %d to %d failed verification and are trained again",
                               arm, latest + 1, seen)
                seen = latest
            new = round_metrics(store, run_key, arm)[seen:latest] if latest > seen else []
        except StoreError as exc:
            if strict:
                raise
            # Mirroring is a view of the store; the ServerApp owns the writes and fails the run
            # itself if the store stays away, so an outage here only pauses the mirror.
            if not store_down:
                logger.warning("%s arm: cannot read the store to follow the rounds (%s); will retry", arm, exc)
            store_down = True
            return
        if store_down:
            logger.info("%s arm: the store answers again", arm)
            store_down = False
        if not new:
            return
        for metrics in new:
            logger.info(
                "%s round %d/%d: central accuracy %.4f, macro-F1 %.4f, %d nodes, %.1f s",
                arm, metrics["round"], config.rounds, metrics["central"]["accuracy"],
                metrics["central"]["macro_f1"], len(metrics["nodes"]), metrics["round_seconds"],
            )
        seen = latest
        update_progress_artifact(artifact_id=progress, progress=100.0 * seen / config.rounds)

    try:
        # the round policy's training attempts and the evaluation, each within the arm's round timeout
        round_limit_s = longest_round_s(config.arm(base or arm).round_timeout_s)
        status = wait_for(run_id, superlink, config.rounds * round_limit_s + 300,
                           on_poll=mirror_rounds, looks_done=lambda: seen >= config.rounds)
    except BaseException:
        stop_run(run_id, superlink)
        raise
    if not status.completed:
        raise run_failed(f"the {arm} arm", run_id, status.status, superlink)
    mirror_rounds(strict=True)
    if seen != config.rounds:
        raise RuntimeError(f"the {arm} arm finished with {seen} of {config.rounds} rounds in the store")
    return {"flower_run_id": run_id, "wall_seconds": time.monotonic() - started,
            "flower_bytes": status.bytes_in + status.bytes_out}


@task(name="train-reference", task_run_name="reference-{arm}")
def train_reference(arm: str, model: str, partition_ids: list[int], num_partitions: int,
                    config: CompareConfig, base: str | None = None,
                    epsilon: float | None = None, preprocessing: dict[str, Any] | None = None,
                    teacher: tuple[str, str] | None = None, run_key: str = "", store_uri: str = "") -> dict[str, Any]:
    """Train the arm's model centrally on its nodes' pooled training data, as a labelled reference.

    With ``epsilon`` the reference trains with DP-SGD at that ε (over all its epochs) on
    the pooled data: what the same privacy would cost without federation. With ``teacher``
    (arm, model) it is distilled, as the arm was, from that arm's final global model in the store.
    """
    arm_config = config.arm(base or arm)
    privacy = config.privacy
    dp = None if epsilon is None else {"target_epsilon": epsilon, "delta": privacy.delta,
                                       "max_grad_norm": privacy.max_grad_norm, "accountant": privacy.accountant}
    dataset = prepared_dataset(config, preprocessing)
    result = train_centralized(
        dataset, model_name=model, partition_ids=tuple(partition_ids), num_partitions=num_partitions,
        epochs=config.rounds * arm_config.local_epochs, batch_size=arm_config.batch_size,
        learning_rate=arm_config.learning_rate_at(epsilon), optimizer=arm_config.optimizer_at(epsilon),
        weight_decay=arm_config.weight_decay, seed=config.seed,
        teacher=None if teacher is None else (teacher[1], load_latest(open_store(store_uri), run_key, teacher[0])[1]),
        distill={"temperature": config.distill.temperature, "alpha": config.distill.alpha},
        data_kwargs=data_kwargs(config), dp=dp,
    )
    get_run_logger().info("%s central reference%s: accuracy %.4f after %d epochs on %d examples", arm,
                          f" (DP-SGD, ε={result['privacy']['epsilon']:.3f})" if dp else "",
                          result["accuracy"], result["epochs"], result["num_examples"])
    return result


def _versions() -> dict[str, str]:
    """Return the versions of fedcompare and the libraries that shape its numbers."""
    names = ("fedcompare", "flwr", "prefect", "torch", "opacus", "scikit-learn", "numpy", "codecarbon")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


@task(name="deploy", task_run_name="deploy-{arm}")
def deploy(arm: str, config: CompareConfig, run_key: str, store_uri: str, partition_ids: list[int] | None,
           num_partitions: int, private: bool, preprocessing: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export the arm's final model to ONNX, compress and measure it, and store the variants with deploy.json.

    ``partition_ids`` None: the nodes' data cannot be pooled (no int8 calibration data).
    """
    dataset = prepared_dataset(config, preprocessing)
    test, calibration = deployment_data(dataset, partition_ids=partition_ids, num_partitions=num_partitions,
                                        private=private, examples=config.deployment.calibration_examples,
                                        data_kwargs=data_kwargs(config))
    document = deploy_arm(open_store(store_uri), run_key, arm, dataset=dataset, test=test, calibration_x=calibration,
                          calibration=calibration_source(private=private, pooled=partition_ids is not None),
                          settings=config.deployment, preprocessing=preprocessing)
    for name, v in document["variants"].items():
        get_run_logger().info("%s %s: %d bytes, accuracy %.4f, p50 %.3f ms, %.0f/s at batch 64", arm, name,
                              v["bytes"], v["accuracy"], v["latency_ms_p50"], v["throughput_per_s"])
    return document


def _deploy_all(config: CompareConfig, run_key: str, store_uri: str, nodes: list[dict[str, Any]],
                assignment: dict[str, list[int]], variants: list[Variant],
                spec: dict[str, Any] | None, models: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Deploy every arm's final model, one after another (each measurement wants the CPU to itself)."""
    if not config.deployment.enabled:
        return {}
    pooled = not any(n.get("data-source") == "node-file" for n in nodes)
    partitions = {n["node_id"]: n["partition-id"] for n in nodes}
    exportable = [v for v in variants if arm_model(models, v.arm, v.epsilon) not in TEXT_MODELS]
    for v in variants:
        if v not in exportable:
            get_run_logger().warning("%s arm: no ONNX export of the text model %s yet; it is not deployed or priced "
                                     "for serving", v.name, arm_model(models, v.arm, v.epsilon))
    return {v.name: deploy(v.name, config, run_key, store_uri,
                           sorted(partitions[n] for n in assignment[v.kind]) if pooled else None,
                           nodes[0]["num-partitions"], v.epsilon is not None, spec)
            for v in exportable}


@task(name="publish-report")
def publish_report(config: CompareConfig, run_key: str, store_uri: str, federation: dict[str, Any],
                   assignment: dict[str, list[int]], arms: dict[str, dict[str, Any]],
                   references: dict[str, dict[str, float]],
                   deployments: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Build the report from the store, write report.json, and publish markdown and table artifacts."""
    store = open_store(store_uri)
    summaries = {}
    for arm, result in arms.items():
        _, arrays, _ = load_latest(store, run_key, arm)
        parameters, model_bytes = model_size(arrays)
        summaries[arm] = {
            **summarize_arm(
                arm, round_metrics(store, run_key, arm), nodes=assignment[result["kind"]], parameters=parameters,
                model_bytes=model_bytes, wall_seconds=result["wall_seconds"], reference=references.get(arm),
                target_accuracy=config.target_accuracy, cost=config.cost,
            ),
            "kind": result["kind"],
            "base": result["base"],
            **({"distilled_from": result["distilled_from"]} if "distilled_from" in result else {}),
            "flower_run_id": result["flower_run_id"],
        }
        if arm in (deployments or {}):
            priced = price_deployment(deployments[arm], training_usd=summaries[arm]["total_usd"],
                                      settings=config.deployment, cost=config.cost)
            summaries[arm].update(deployment=priced, serving_usd=priced["serving_usd"],
                                  total_cost_usd=priced["total_cost_usd"])
    report = build_report(run_key=run_key, config=config.model_dump(mode="json"), federation=federation,
                          arms=summaries, target_accuracy=config.target_accuracy, versions=_versions())
    store.put_json(report_key(run_key), report)
    images = {}
    for name, caption, png in report_plots(report):
        store.put_bytes(plot_key(run_key, name), png)
        images[caption] = data_uri(png)
    create_markdown_artifact(render_markdown(report, images), key="federated-compare-report",
                             description="federated-compare: large vs small model")
    create_table_artifact(summary_rows(report), key="federated-compare-summary",
                          description="per-arm summary of the comparison")
    return report


def _teacher(variant: Variant, models: dict[str, str]) -> tuple[str, str] | None:
    """Return (arm, model) that ``variant`` is distilled from, or None."""
    return (variant.teacher, models[variant.teacher]) if variant.teacher else None


def _references(config: CompareConfig, models: dict[str, str], nodes: list[dict[str, Any]],
                assignment: dict[str, list[int]], variants: list[Variant],
                spec: dict[str, Any] | None, run_key: str, store_uri: str) -> dict[str, dict[str, Any]]:
    """Train every arm's central reference on its nodes' pooled partitions; none when nodes hold their own data."""
    if any(n.get("data-source") == "node-file" for n in nodes):
        get_run_logger().info("no central references: nodes hold their own data files, which never leave them")
        return {}
    partitions = {n["node_id"]: n["partition-id"] for n in nodes}
    num_partitions = nodes[0]["num-partitions"]

    def reference(name: str, v: Variant, epsilon: float | None, model: str) -> dict[str, Any]:
        return train_reference(name, model, sorted(partitions[n] for n in assignment[v.kind]), num_partitions,
                               config, base=v.arm, epsilon=epsilon, preprocessing=spec,
                               teacher=_teacher(v, models), run_key=run_key, store_uri=store_uri)

    plain: dict[str, dict[str, Any]] = {}  # arm -> its reference without DP, trained once
    references = {}
    for v in variants:
        model = arm_model(models, v.arm, v.epsilon)
        if v.teacher:  # distilled centrally from the same teacher
            references[v.name] = reference(v.name, v, None, model)
        elif v.epsilon is not None and config.privacy.mode == "sample-level":
            references[v.name] = reference(v.name, v, v.epsilon, model)  # DP-SGD at the same ε, pooled
        elif model == models[v.arm]:
            if v.arm not in plain:
                plain[v.arm] = reference(v.arm, v, None, model)
            references[v.name] = plain[v.arm]
        else:  # client-level DP of the arm's private model: that model without DP (no central counterpart)
            references[v.name] = reference(v.name, v, None, model)
    return references


@contextmanager
def _engine(config: CompareConfig, superlink: str) -> Iterator[str]:
    """Yield the SuperLink the arms run on: ``superlink``, or a simulation SuperLink started for the block."""
    if config.engine != "simulation":
        yield superlink
        return
    with simulation_superlink(state_dir(), ray_address=config.simulation.ray_address) as address:
        get_run_logger().info("simulation SuperLink on %s (Ray: %s)", address,
                              config.simulation.ray_address or "a local instance per run")
        yield address


def _train_all(config: CompareConfig, groups: list[list[Variant]], models: dict[str, str],
               assignment: dict[str, list[int]], federation: dict[str, Any], run_key: str, store_uri: str,
               superlink: str, spec: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Train every arm, group after group: side by side within a group on real nodes, one by one in a simulation.

    With all-nodes each real node serves both Flower runs of a group; a simulated run starts
    its own Ray actors, which would take each other's cores.
    """
    retrying = train_arm.with_options(retries=config.arm_retries, retry_delay_seconds=5)
    simulated = config.engine == "simulation"
    arms: dict[str, dict[str, Any]] = {}
    for group in groups:
        futures = {}
        for v in group:
            tier = arm_tier(federation["nodes"], assignment[v.kind]) if simulated else None
            futures[v.name] = retrying.submit(v.name, arm_model(models, v.arm, v.epsilon), assignment[v.kind], config,
                                              run_key, store_uri, superlink, base=v.arm, epsilon=v.epsilon,
                                              preprocessing=spec, teacher=_teacher(v, models), tier=tier)
            if simulated:
                futures[v.name].wait()
        arms.update({v.name: {**futures[v.name].result(), "kind": v.kind, "base": v.arm,
                              **({"distilled_from": v.teacher} if v.teacher else {})} for v in group})
    return arms


@flow(name="federated-compare", log_prints=True)
def federated_compare(config: CompareConfig = CompareConfig()) -> dict[str, Any]:
    """Train a large and a small model federatedly, with centralized references, and report both."""
    logger = get_run_logger()
    run_key = config.resume_from or str(flow_run.get_id() or uuid.uuid4())
    store_uri = resolve_store_uri(config)
    superlink = resolve_superlink(config)
    logger.info("run key %s, store %s, SuperLink %s", run_key, store_uri, superlink)
    for note in config.unused_steps():
        logger.info(note)

    models = resolve_models(config)
    simulated = config.engine == "simulation"
    federation = virtual_federation(config) if simulated else discover_nodes(config, run_key, store_uri, superlink)
    spec = resolve_preprocessing(config, federation)
    federation = {**federation, "preprocessing": spec}  # the report describes it; checkpoints hold it in their config
    placed = assign_nodes(federation["nodes"], config.assignment,
                          large_need_bytes=large_need_bytes(config, models, spec),
                          small_on_gpu_nodes=config.small_on_gpu_nodes)
    assignment = placed.nodes
    logger.info("assignment (%s): %s", config.assignment, assignment)
    for node_id, reason in placed.left_out.items():
        logger.warning("node %s does not train the large arm: %s", node_id, reason)
    if simulated:
        create_table_artifact(virtual_table(federation["virtual"], placed, federation["nodes"]), key="federation-nodes",
                              description=f"The simulation's virtual nodes and the arms they train ({config.assignment})")
    else:
        create_table_artifact(node_table(federation["nodes"], placed), key="federation-nodes",
                              description=f"The nodes that answered and the arms each trains ({config.assignment})")
    groups = plan_variants(config)
    variants = [v for group in groups for v in group]
    for arm, plan in check_privacy(config, variants, federation["nodes"], assignment).items():
        logger.info("%s arm: %s DP, noise multiplier %s", arm, config.privacy.mode, plan["noise_multiplier"])

    with _engine(config, superlink) as address:
        arms = _train_all(config, groups, models, assignment, federation, run_key, store_uri, address, spec)

    references = _references(config, models, federation["nodes"], assignment, variants, spec, run_key, store_uri)
    deployments = _deploy_all(config, run_key, store_uri, federation["nodes"], assignment, variants, spec, models)
    if simulated:  # the report describes virtual nodes by their spread, not one row per node
        federation = {key: value for key, value in federation.items() if key != "nodes"}
    report = publish_report(config, run_key, store_uri, federation, assignment, arms, references, deployments)
    return {"run_key": run_key, "summary": summary_rows(report)}
