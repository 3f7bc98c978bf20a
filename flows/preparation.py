"""The flow's steps before training: check the data, resolve the models, ask the nodes, build the preprocessing,
plan the arms and their privacy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger, task

from clients.data import Dataset, load_dataset
from clients.preprocess import PreprocessingError, build_spec, describe, prepare
from clients.models import TEXT_MODELS, TORCH_MODELS, estimate_training_memory_bytes, resolve_large_model
from flows.config import DISTILLED_ARM, CompareConfig
from flows.following import exists, run_failed, submit, wait_for
from infra.checkpoints import federation_key
from infra.store import open_store

@dataclass(frozen=True)
class Variant:
    """One run of the comparison: arm ``base``'s settings (large, small or an extra arm) of kind ``kind``
    (large or small: which nodes train it), private at ``epsilon`` or not (None)."""

    name: str
    kind: str
    epsilon: float | None = None
    base: str = ""  # the arm whose settings it trains with (empty: ``kind``, the large or the small arm)
    teacher: str = ""  # the arm whose final global model it is distilled from (empty: none)

    def __post_init__(self) -> None:
        """Name the arm of a large or small run given without ``base``."""
        if not self.base:
            object.__setattr__(self, "base", self.kind)

    @property
    def arm(self) -> str:
        """Return the name of the arm whose settings this run trains with."""
        return self.base


def plan_variants(config: CompareConfig) -> list[list[Variant]]:
    """Return the arms to train, in groups: the arms of one group train side by side, groups one after another.

    Without privacy: one group, ``large``, ``small`` and the extra arms. With privacy: the arms
    without DP (those of kinds privacy does not cover, and every arm when ``compare_without_dp``)
    first, then one group per ε of the sweep with the private arms, named ``<arm>-eps<ε>``.
    """
    privacy = config.privacy
    arms = config.arm_kinds()
    plain = [Variant(name, kind, None, name) for name, kind in arms.items()
             if not privacy.covers(kind) or privacy.compare_without_dp]
    groups = [plain] if plain else []
    if config.distill.enabled:  # after the large arm: its final global model teaches
        groups.append([Variant(DISTILLED_ARM, "small", None, "small", teacher="large")])
    for eps in privacy.epsilons if privacy.mode != "none" else []:
        groups.append([Variant(f"{name}-eps{eps:g}", kind, eps, name) for name, kind in arms.items()
                       if privacy.covers(kind)])
    return groups


def data_kwargs(config: CompareConfig) -> dict[str, Any]:
    """Return the partitioning arguments that `clients.data` takes for this config."""
    return config.data.partition_kwargs(config.seed)


_ANY_EPSILON = 1.0  # ArmConfig.model_at(ε) is the same model for every ε


@task(name="resolve-models")
def resolve_models(config: CompareConfig) -> dict[str, str]:
    """Load the dataset once to check it and resolve each arm's model, and its private runs' model ("large-dp")."""
    try:
        dataset = raw_dataset(config)
    except (OSError, ValueError) as exc:
        raise ValueError(f"data.dataset: {exc}") from None
    models = {}
    for base, kind in config.arm_kinds().items():
        arm = config.arm(base)
        for key, name in ((base, arm.model), (f"{base}-dp", arm.model_at(_ANY_EPSILON))):
            try:
                models[key] = resolve_large_model(name, dataset.kind) if kind == "large" else name
            except ValueError as exc:
                raise ValueError(f"{config.where(base)}.model: {exc}") from None
            if (models[key] in TEXT_MODELS) != (dataset.kind == "text"):
                reads = "text (hashed word ids)" if models[key] in TEXT_MODELS else "images or tables"
                raise ValueError(f"{config.where(base)}.model: {models[key]!r} reads {reads}, but "
                                 f"{config.data.dataset!r} is a {dataset.kind} dataset: pick one of "
                                 f"{', '.join(m for m in TEXT_MODELS if dataset.kind == 'text') or 'the other models'}")
    return models


def arm_model(models: dict[str, str], base: str, epsilon: float | None) -> str:
    """Return the resolved model of arm ``base``'s run (private at ``epsilon``, or without DP for None)."""
    return models[base if epsilon is None else f"{base}-dp"]


@task(name="discover-nodes")
def discover_nodes(config: CompareConfig, run_key: str, store_uri: str, superlink: str) -> dict[str, Any]:
    """Ask every node of the federation for its tier, device and number of examples."""
    logger = get_run_logger()
    spec = config.query_spec(run_key=run_key, store_uri=store_uri,
                             federated_statistics=preprocessing_mode(config) == "federated")
    run_id = submit(spec, superlink)
    store = open_store(store_uri)
    status = wait_for(run_id, superlink, spec.training.round_timeout_s + 120,
                       looks_done=lambda: exists(store, federation_key(run_key)))
    if not status.completed:
        raise run_failed("the node query", run_id, status.status, superlink)
    answer = store.get_json(federation_key(run_key))
    if "preprocessing_error" in answer:
        raise ValueError(f"data.preprocessing: {answer['preprocessing_error']}")
    for node in answer["nodes"]:
        logger.info("node %s: tier %s, device %s, partition %s, %s train / %s test examples",
                    node["node_id"], node["tier"], node["device"], node["partition-id"],
                    node["num-train"], node["num-test"])
    if not answer["nodes"]:
        raise RuntimeError(f"no SuperNode answered at {superlink}: start nodes with `fedcompare up`")
    return answer


@task(name="preprocessing")
def resolve_preprocessing(config: CompareConfig, federation: dict[str, Any]) -> dict[str, Any] | None:
    """Return the spec every node, the server and the references apply: built from the nodes' statistics, or fixed."""
    data = config.data
    mode = preprocessing_mode(config)
    if mode == "none":
        if raw_dataset(config).raw:
            raise ValueError(f"data.preprocessing: {mode!r} (features as loaded) cannot train on {data.dataset!r}, "
                             "which has text or empty cells: give data.preprocessing a fixed spec"
                             + ("" if config.privacy.mode != "none" else " or 'federated'"))
        if data.preprocessing == "auto" and config.privacy.mode != "none" and data.dataset.lower().endswith(".csv"):
            get_run_logger().warning("data.preprocessing 'auto' under privacy: the table trains as loaded, unscaled "
                                     "(federated statistics would not be covered by ε); give a fixed spec to scale it")
        return None
    if mode == "fixed":
        spec = {**data.preprocessing, "source": "fixed"}
    elif "preprocessing_stats" not in federation:  # images: scaled at load, no statistics
        return None
    else:
        spec = build_spec(federation["preprocessing_stats"], max_categories=data.max_categories,
                          rare_fraction=data.rare_category_fraction)
    try:
        prepare(raw_dataset(config), spec)  # the server's data must fit it too
    except PreprocessingError as err:
        raise ValueError(f"data.preprocessing: {err}") from None
    get_run_logger().info("preprocessing (%s): %s", spec["source"], "; ".join(
        f"{row['column']}: {row['transform']}" for row in describe(spec)))
    return spec


def preprocessing_mode(config: CompareConfig) -> str:
    """Return how the run's tables become features: federated, none or fixed ("auto" resolved)."""
    return config.data.preprocessing_mode(private=config.privacy.mode != "none")


def raw_dataset(config: CompareConfig) -> Dataset:
    """Load the run's dataset as the nodes do, before preprocessing."""
    return load_dataset(config.data.dataset, **config.data.load_kwargs())


def prepared_dataset(config: CompareConfig, spec: dict[str, Any] | None) -> Dataset:
    """Return the run's dataset as the models see it: the preprocessing spec applied."""
    return prepare(raw_dataset(config), spec)


def check_privacy(config: CompareConfig, variants: list[Variant], nodes: list[dict[str, Any]],
                  assignment: dict[str, list[int]]) -> dict[str, dict[str, Any]]:
    """Plan every private arm on the nodes' real example counts; fail before training if a target cannot be met.

    Returns arm name -> {"noise_multiplier": per node id (sample-level) or for the arm}.

    Raises:
        ValueError: one line naming the arm, the node and the value to change.
    """
    from privacy.accounting import PrivacyInfeasible, plan_client_level, plan_sample_level

    privacy = config.privacy
    by_id = {n["node_id"]: n for n in nodes}
    plans: dict[str, dict[str, Any]] = {}
    for variant in (v for v in variants if v.epsilon is not None):
        arm_config = config.arm(variant.arm)
        common = {"target_epsilon": variant.epsilon, "delta": privacy.delta, "accountant": privacy.accountant,
                  "noise_multiplier": privacy.noise_multiplier}
        try:
            if privacy.mode == "sample-level":
                plans[variant.name] = {"noise_multiplier": {
                    node: plan_sample_level(
                        num_examples=int(by_id[node]["num-train"]), batch_size=arm_config.batch_size,
                        local_epochs=arm_config.local_epochs, rounds=config.rounds,
                        max_grad_norm=privacy.max_grad_norm, who=f"node {node}", **common,
                    ).noise_multiplier
                    for node in assignment[variant.kind]
                }}
            else:
                nodes_of_arm = len(assignment[variant.kind])
                plans[variant.name] = {"noise_multiplier": plan_client_level(
                    num_nodes=nodes_of_arm, sampled_nodes=nodes_of_arm, rounds=config.rounds,
                    clipping_norm=privacy.max_grad_norm, **common,
                ).noise_multiplier}
        except PrivacyInfeasible as exc:
            raise ValueError(f"privacy ({variant.name} arm, ε={variant.epsilon:g}): {exc}") from None
    return plans


def large_need_bytes(config: CompareConfig, models: dict[str, str], spec: dict[str, Any] | None) -> int:
    """Estimate the tensor bytes one training step of the large arms holds (0: no estimate needed or possible).

    The largest need of every arm of kind large (the large arm and the extra ones), with and without DP.
    """
    if config.assignment != "by-tier":
        return 0
    privacy = config.privacy
    runs = [None] if not privacy.covers("large") or privacy.compare_without_dp else []
    runs += [_ANY_EPSILON] if privacy.covers("large") else []
    need = 0
    dataset = None
    for base in (name for name, kind in config.arm_kinds().items() if kind == "large"):
        arm = config.arm(base)
        for epsilon in runs:  # the larger need of the arm's runs without and with DP
            model = arm_model(models, base, epsilon)
            if model not in TORCH_MODELS:
                continue
            dataset = dataset or prepared_dataset(config, spec)
            need = max(need, estimate_training_memory_bytes(
                model, input_shape=dataset.input_shape, num_classes=dataset.num_classes,
                batch_size=arm.batch_size, private=epsilon is not None and privacy.mode == "sample-level",
                optimizer=arm.optimizer_at(epsilon),
            ))
    return need
