"""`CompareConfig`: the one parameter of the `federated-compare` flow."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, ValidationError, field_validator, model_validator

from clients.spec import (
    DISTILL_UNDER_DP, FEDERATED, ArmSpec, CommonSpec, DataSpec, DistillSpec, RunSpec, SimulationSpec,
    aggregation_conflict,
    describe_errors, privacy_conflict, sums_conflict,
)
from clients import models as zoo
from flows.decision import CostModel
from flows.sections import (  # noqa: F401 (re-exported: the config's sections are imported from here)
    ARM_NAME, BUILTIN_DATASETS, DATA_SUFFIXES, DISTILLED_ARM, KINDS, RESERVED_ARMS, LARGE_MODELS, SMALL_MODELS,
    ArmConfig, DataConfig, DeploymentConfig, DistillConfig, ExtraArmConfig, PrivacyConfig, SimulationConfig,
)
from infra.state import state_dir

DEFAULT_SUPERLINK = "127.0.0.1:8000"
_ADDRESS = re.compile(r"^[A-Za-z0-9.\-]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$")


class CompareConfig(CommonSpec):
    """Everything a user chooses for one `federated-compare` run."""

    # dataset and partitioning
    data: DataConfig = DataConfig()
    # the large model: a CNN for 28x28 images (an MLP for tabular data), meant for gpu-tier nodes
    large: ArmConfig = ArmConfig(model="auto", local_epochs=3, batch_size=32, learning_rate=1e-3)
    # the small model: logistic regression, meant for cpu-tier nodes
    small: ArmConfig = ArmConfig(model="logreg", local_epochs=5, batch_size=32, learning_rate=1e-2)
    # more arms compared side by side with large and small: name -> the arm's settings and its kind ("large":
    # trains on the large arm's nodes, "small": on the small arm's), e.g. {"nb": {"kind": "small", "model": "gnb"}};
    # a field not given comes from the arm of that kind (large or small) as configured, so the arms differ only
    # in what is given. Privacy covers an extra arm as it covers its kind
    extra_arms: dict[Annotated[str, StringConstraints(pattern=ARM_NAME, max_length=40)], ExtraArmConfig] = Field(
        default_factory=dict, max_length=8)
    # all-nodes: both arms train on every node (same data: a like-for-like comparison);
    # by-tier: large on gpu-tier nodes, small on cpu-tier nodes (each arm sees only its nodes' data)
    assignment: Literal["all-nodes", "by-tier"] = "all-nodes"
    # by-tier only: gpu-tier nodes train the small model too (they still train the large one)
    small_on_gpu_nodes: bool = False
    # central-test accuracy an arm must reach to count as good enough
    target_accuracy: float = Field(0.9, gt=0.0, le=1.0)
    # checkpoint store: a path, file:// or s3://bucket/prefix URI (empty: $FEDCOMPARE_STORE or <state dir>/store)
    store_uri: str = ""
    # Flower SuperLink address host:port (empty: $FEDCOMPARE_SUPERLINK or 127.0.0.1:8000)
    superlink: str = ""
    # the price table that turns measured seconds and bytes into dollars, energy and CO2
    cost: CostModel = CostModel()
    # run key (flow-run id) of an earlier comparison to continue after its last complete
    # round of each arm, with the same config (empty: a new comparison)
    resume_from: str = ""
    # times Prefect retries an arm that failed; a retry resumes after the last stored round
    arm_retries: int = Field(1, ge=0, le=10)
    # differential privacy (off by default; the federated-compare/private deployment sweeps ε)
    privacy: PrivacyConfig = PrivacyConfig()
    # serving each arm's final model: export, compression, inference measurements and their price
    deployment: DeploymentConfig = DeploymentConfig()
    # knowledge distillation: the arm "small-distilled", the small model taught by the large one (off by default)
    distill: DistillConfig = DistillConfig()
    # where the nodes run: "deployment" (the SuperLink's real SuperNodes: the local stack's or your sites') or
    # "simulation" (Flower's Simulation Engine: `simulation.num_nodes` virtual nodes on Ray, one partition each)
    engine: Literal["deployment", "simulation"] = "deployment"
    # the Simulation Engine's virtual nodes, their sampling and Ray (engine "simulation" only)
    simulation: SimulationConfig = SimulationConfig()

    @model_validator(mode="before")
    @classmethod
    def _arms_over_their_defaults(cls, data: object) -> object:
        """Fill an arm given in part (``{"large": {"local_epochs": 2}}``) from that arm's defaults.

        The two arms have different default models and steps, so an arm's missing fields come from
        its own default, not from ArmConfig's; a user changes one field without restating the rest.
        An extra arm's missing fields come from the arm of its kind, as given.
        """
        if not isinstance(data, dict):
            return data
        filled = dict(data)
        for kind in KINDS:
            if isinstance(filled.get(kind), dict):
                default = cls.model_fields[kind].default.model_dump()
                filled[kind] = {**default, **filled[kind]}
        extra = filled.get("extra_arms")
        if isinstance(extra, dict):  # an extra arm's missing fields come from its kind's arm as configured
            filled["extra_arms"] = {name: _over_kind(filled, arm) for name, arm in extra.items()}
        return filled

    @field_validator("extra_arms")
    @classmethod
    def _extra_names(cls, value: dict[str, ExtraArmConfig]) -> dict[str, ExtraArmConfig]:
        """Refuse extra arm names that the comparison's own arms use (large, small, <arm>-eps<ε>, ...)."""
        for name in value:
            if name in KINDS or name in RESERVED_ARMS or re.search(r"-eps[0-9]", name):
                raise ValueError(f"the arm name {name!r} is taken (large, small, {', '.join(RESERVED_ARMS)} and the "
                                 "private runs' <arm>-eps<ε>): name the extra arm otherwise, e.g. 'nb'")
        return value

    @field_validator("resume_from")
    @classmethod
    def _run_key(cls, value: str) -> str:
        """Accept an empty value or a run key (one path part)."""
        if value and not re.fullmatch(r"[A-Za-z0-9._-]+", value) or value in (".", ".."):
            raise ValueError(f"expected the flow-run id of an earlier run, got {value!r}")
        return value

    @field_validator("superlink")
    @classmethod
    def _address(cls, value: str) -> str:
        """Accept an empty value or host:port."""
        if value and not _ADDRESS.match(value):
            raise ValueError(f"expected host:port such as 127.0.0.1:8000, got {value!r}")
        return value

    @field_validator("store_uri")
    @classmethod
    def _store_uri(cls, value: str) -> str:
        """Accept an empty value, a path, a file:// URI or an s3://bucket URI."""
        if "://" in value and not value.startswith(("file://", "s3://")):
            raise ValueError(f"expected a path, file:///abs/path or s3://bucket/prefix, got {value!r}")
        if value.startswith("s3://") and not value[len("s3://"):].strip("/"):
            raise ValueError("an s3:// store URI needs a bucket name, e.g. s3://fedcompare")
        return value

    @model_validator(mode="after")
    def _models_fit_arms(self) -> CompareConfig:
        """Check that each arm names a model of its kind that can train under the run's privacy."""
        for name, kind in self.arm_kinds().items():
            where, arm = self.where(name), self.arm(name)
            for field in ("model", "dp_model"):
                model = getattr(arm, field)
                names = LARGE_MODELS if kind == "large" else SMALL_MODELS
                if model is not None and model not in names:
                    raise ValueError(f"{where}.{field}: expected one of {', '.join(names)}, got {model!r} ({kind} models)")
            mode = self.privacy.mode if self.privacy.covers(kind) else "none"
            conflict = sums_conflict(arm.model, privacy_mode=mode, max_update_norm=arm.max_update_norm)
            if conflict:
                raise ValueError(f"{where}.model: {conflict}")
            conflict = privacy_conflict(arm.dp_model or arm.model, self.privacy.mode) if self.privacy.covers(kind) \
                else None
            if conflict:
                field = "dp_model" if arm.dp_model else "model"
                other = "large" if kind == "small" else "small"
                raise ValueError(f"privacy.mode ({where}.{field}): {conflict} (privacy.arms {other!r})")
        if self.privacy.mode != "none" and self.data.preprocessing == "federated":
            raise ValueError(
                f"data.preprocessing: {self.data.preprocessing!r} would compute the nodes' feature means, ranges and "
                f"category counts outside the privacy budget of privacy.mode {self.privacy.mode!r}; give "
                "data.preprocessing a fixed spec (the \"preprocessing\" object of the report.json of a run without "
                "privacy, or your own) or 'none'"
            )
        if self.distill.enabled and self.privacy.mode != "none":
            raise ValueError(f"distill.enabled: {DISTILL_UNDER_DP}")
        if self.engine == "simulation" and self.data.dataset not in BUILTIN_DATASETS and \
                not Path(self.data.dataset).exists():
            raise ValueError(f"data.dataset: the simulation partitions the run's dataset over its virtual nodes, and "
                             f"{self.data.dataset!r} does not exist: name a built-in dataset or an existing file")
        for name, kind in self.arm_kinds().items():
            conflict = aggregation_conflict(self.arm(name).aggregation, self.privacy.mode)
            if conflict and self.privacy.covers(kind):
                raise ValueError(f"{self.where(name)}.aggregation: {conflict}")
        return self

    def arm_kinds(self) -> dict[str, str]:
        """Return every arm's name and kind: large, small, then the extra arms in their order."""
        return {"large": "large", "small": "small", **{name: arm.kind for name, arm in self.extra_arms.items()}}

    def arm(self, name: str) -> ArmConfig:
        """Return the settings of arm ``name`` (large, small or an extra arm)."""
        return getattr(self, name) if name in KINDS else self.extra_arms[name]

    @staticmethod
    def where(name: str) -> str:
        """Return where arm ``name`` lives in the config, for error messages: large, small or extra_arms.<name>."""
        return name if name in KINDS else f"extra_arms.{name}"

    def run_spec(self, base: str, *, arm: str, model: str, run_key: str, store_uri: str, nodes: list[int],
                 epsilon: float | None = None, preprocessing: dict[str, Any] | None = None,
                 teacher: tuple[str, str] | None = None, tier: str = "") -> RunSpec:
        """Return the run spec of one arm's Flower run: arm ``base``'s settings at ``epsilon`` (None: without DP).

        ``model``: the arm's model resolved (not "auto"); ``preprocessing``: the spec the arm's
        nodes apply (None: features as loaded); ``teacher``: (arm, model) whose final global model
        the arm is distilled from (None: no distillation); ``tier``: a simulated arm's virtual
        nodes ("" every one; ``nodes`` is empty then: Flower names virtual nodes anew in every run).
        """
        teacher_arm, teacher_model = teacher or ("", "")
        distill = DistillSpec(**{name: getattr(self.distill, name) for name in DistillSpec.model_fields})
        return RunSpec(
            mode="train", store_uri=store_uri, run_key=run_key, arm=arm, nodes=nodes,
            rounds=self.rounds, seed=self.seed, node_evaluation=self.node_evaluation,
            keep_last_rounds=self.keep_last_rounds,
            preprocessing=json.dumps(preprocessing, separators=(",", ":")) if preprocessing else "",
            training=self.arm(base).resolved(model, epsilon), privacy=self.privacy.at(epsilon), data=self._data(),
            teacher_arm=teacher_arm, teacher_model=teacher_model, distill=distill if teacher else DistillSpec(),
            simulation=self.simulation.spec(tier) if self.engine == "simulation" else SimulationSpec(),
        )

    def query_spec(self, *, run_key: str, store_uri: str, federated_statistics: bool) -> RunSpec:
        """Return the run spec of the node query: every node answers, as patient as the most patient arm."""
        timeout = max(self.arm(name).round_timeout_s for name in self.arm_kinds())
        return RunSpec(
            mode="query", store_uri=store_uri, run_key=run_key, rounds=self.rounds, seed=self.seed,
            preprocessing=FEDERATED if federated_statistics else "",
            training=ArmSpec(model=self.small.model, round_timeout_s=timeout), data=self._data(),
        )

    def _data(self) -> DataSpec:
        """Return the run spec's data settings, a dataset file's path made absolute (nodes run elsewhere)."""
        own = {name: getattr(self.data, name) for name in DataSpec.model_fields}
        if self.data.dataset not in BUILTIN_DATASETS:
            own["dataset"] = str(Path(self.data.dataset).resolve())
        return DataSpec(**own)

    def unused_steps(self) -> list[str]:
        """Return one note per arm whose learning_rate_by_epsilon names an ε that no private run of it uses.

        Such steps are ignored, not refused: a preset (the private deployment's {1, 3, 8}) can then be
        narrowed with a shorter privacy.epsilon_sweep, which merging cannot remove map keys for.
        """
        notes = []
        for name, kind in self.arm_kinds().items():
            unused = sorted(set(self.arm(name).learning_rate_by_epsilon) - set(self.privacy.epsilons))
            if unused and self.privacy.covers(kind):
                notes.append(
                    f"{self.where(name)}.learning_rate_by_epsilon: the steps for ε={', '.join(f'{e:g}' for e in unused)} are "
                    f"unused (the private runs of this arm train at ε={', '.join(f'{e:g}' for e in self.privacy.epsilons)}); "
                    "add an ε to privacy.epsilon_sweep to train at it"
                )
        return notes


def _over_kind(config: dict, arm: object) -> object:
    """Return an extra arm given as a dict over the settings of the arm of its kind in ``config`` (kept otherwise)."""
    if not isinstance(arm, dict) or arm.get("kind") not in KINDS:
        return arm  # validation names what is wrong
    base = config.get(arm["kind"], CompareConfig.model_fields[arm["kind"]].default)
    base = base.model_dump() if isinstance(base, ArmConfig) else dict(base)
    if arm.get("model") in zoo.STATISTICS_MODELS:  # naive Bayes has no weights: a decay of its kind's arm is not its
        base.pop("weight_decay", None)
    return {**base, **arm}


def resolve_store_uri(config: CompareConfig) -> str:
    """Return the absolute store URI a run uses: config, then environment, then the state dir."""
    uri = config.store_uri or os.environ.get("FEDCOMPARE_STORE", "")
    if uri.startswith("s3://"):
        return uri
    path = uri.removeprefix("file://") if uri else str(state_dir() / "store")
    return "file://" + str(Path(path).resolve())


def resolve_superlink(config: CompareConfig) -> str:
    """Return the SuperLink address a run uses: config, then environment, then the default."""
    return config.superlink or os.environ.get("FEDCOMPARE_SUPERLINK") or DEFAULT_SUPERLINK


def parse_overrides(text: str, base: dict | None = None) -> dict:
    """Parse ``text`` (a JSON object of CompareConfig fields), merge it over ``base`` and validate; return the dict.

    Raises:
        ValueError: one line naming the offending field(s) and what was expected.
    """
    try:
        overrides = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"--config is not JSON ({exc.msg} at column {exc.colno}): pass e.g. "
                         "'{\"rounds\": 8, \"assignment\": \"by-tier\"}'") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"--config must be a JSON object of CompareConfig fields, got {type(overrides).__name__}")
    overrides = merge(base or {}, overrides)
    try:
        CompareConfig.model_validate(overrides)
    except ValidationError as exc:
        raise ValueError(f"--config: {describe_errors(exc)}") from None
    return overrides


def deployment_config(name: str, root: Path | None = None) -> dict:
    """Return the CompareConfig fields that deployment ``name`` of prefect.yaml sets (``parameters.config``).

    Raises:
        ValueError: prefect.yaml declares no such deployment.
    """
    import yaml

    path = (root or Path(__file__).resolve().parents[1]) / "prefect.yaml"
    deployments = {d["name"]: d for d in yaml.safe_load(path.read_text()).get("deployments", [])}
    if name not in deployments:
        raise ValueError(f"no deployment {name!r} in {path}: expected one of {', '.join(deployments)}")
    return dict((deployments[name].get("parameters") or {}).get("config") or {})


def merge(base: dict, overrides: dict) -> dict:
    """Return ``base`` with ``overrides`` applied, nested objects merged key by key."""
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged
