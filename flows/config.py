"""`CompareConfig`: the one parameter of the `federated-compare` flow."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from clients import models as zoo
from clients.preprocess import PreprocessingError, check_spec
from clients.spec import (
    FEDERATED, ArmSpec, CommonSpec, DataSpec, PrivacySpec, RunSpec, Spec, aggregation_conflict, describe_errors,
    privacy_conflict,
)
from flows.decision import CostModel
from infra.state import state_dir

BUILTIN_DATASETS = ("mnist", "fashion-mnist", "digits", "breast-cancer")
DATA_SUFFIXES = (".csv", ".npz")
DEFAULT_SUPERLINK = "127.0.0.1:8000"
_ADDRESS = re.compile(r"^[A-Za-z0-9.\-]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$")


class DataConfig(DataSpec):
    """What data the nodes train on, how it is split between them, and how tables become features."""

    # how a table becomes features: "federated" standardizes numbers, one-hot encodes text (categorical)
    # columns and fills empty cells, with statistics the nodes compute on their training splits and the
    # server adds up (clients/preprocess.py); "none" uses the features as loaded (text or empty cells are
    # refused); or a fixed spec object (the "preprocessing" object of an earlier report.json, or your own).
    # "auto": federated for a .csv/.npz file, none for the built-in sets (scaled at load by known constants)
    # and image folders. Under privacy the statistics are not covered by ε, so a private run refuses
    # "federated" and "auto" means none: give a fixed spec to scale a private run's table
    preprocessing: Literal["auto", "federated", "none"] | dict[str, Any] = "auto"
    # one-hot columns per categorical column, the shared "other" column included
    max_categories: int = Field(32, ge=2, le=1024)
    # a category seen in fewer than this share of its column's values goes to the "other" column
    rare_category_fraction: float = Field(0.01, ge=0.0, lt=0.5)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        """Accept a built-in dataset name, a path to a CSV/NPZ file or an image folder that exists here."""
        if value in BUILTIN_DATASETS or value.lower().endswith(DATA_SUFFIXES) or Path(value).is_dir():
            return value
        raise ValueError(
            f"expected one of {', '.join(BUILTIN_DATASETS)}, a path ending in .csv or .npz, or an image "
            f"folder (one subfolder per class) that exists here, got {value!r}"
        )

    @field_validator("preprocessing")
    @classmethod
    def _spec(cls, value: str | dict[str, Any]) -> str | dict[str, Any]:
        """Accept a mode, or a fixed spec that clients.preprocess can apply."""
        if isinstance(value, dict):
            try:
                check_spec(value)
            except PreprocessingError as err:
                raise ValueError(str(err)) from None
        return value

    @model_validator(mode="after")
    def _partition_column_of_a_csv(self) -> DataConfig:
        """Check that a partition_by column belongs to a CSV file."""
        if self.partition_by and not self.dataset.lower().endswith(".csv"):
            raise ValueError(f"partition_by names a column of a CSV file, but the dataset is {self.dataset!r}")
        return self

    def preprocessing_mode(self, *, private: bool) -> Literal["federated", "none", "fixed"]:
        """Return how this run's tables become features, "auto" resolved ("none" for a ``private`` run)."""
        if isinstance(self.preprocessing, dict):
            return "fixed"
        if self.preprocessing == "auto":
            builtin_or_images = self.dataset in BUILTIN_DATASETS or not self.dataset.lower().endswith(DATA_SUFFIXES)
            return "none" if builtin_or_images or private else "federated"
        return self.preprocessing


class ArmConfig(ArmSpec):
    """How one arm (the large or the small model) trains: the run spec's arm settings and its private runs' own."""

    # model of this arm's private runs and their central DP references (empty: model). DP-SGD adds
    # noise of the same size to every parameter, so a compact network (cnn-dp: 26k parameters, tanh)
    # often learns far more under DP than the arm's large one (cnn: 1.3M parameters)
    dp_model: str | None = None
    # step size of this arm's private runs at each ε, e.g. {1: 0.02, 3: 0.05} (an ε not listed: learning_rate);
    # DP-SGD's noise grows as ε shrinks, and a step that suits ε=8 can drown a model in noise at ε=1.
    # The central DP reference at that ε uses the same step, so the comparison stays like for like
    learning_rate_by_epsilon: dict[float, float] = Field(default_factory=dict, max_length=8)
    # optimizer of this arm's private runs and their central DP references (empty: optimizer);
    # under DP-SGD each node's Adam step follows the noise at full size, so sgd is the usual choice,
    # while the same arm without DP may train best with adam
    dp_optimizer: Literal["adam", "sgd"] | None = None

    @field_validator("learning_rate_by_epsilon")
    @classmethod
    def _steps(cls, value: dict[float, float]) -> dict[float, float]:
        """Accept positive ε keys and step sizes in (0, 10]."""
        for eps, rate in value.items():
            if not 0 < eps <= 100 or not 0 < rate <= 10:
                raise ValueError(f"expected ε in (0, 100] mapped to a learning rate in (0, 10], got {eps:g}: {rate:g}")
        return dict(sorted(value.items()))

    def model_at(self, epsilon: float | None) -> str:
        """Return the zoo model of this arm's run private at ``epsilon`` (None: without DP), as configured."""
        return self.model if epsilon is None else self.dp_model or self.model

    def optimizer_at(self, epsilon: float | None) -> str:
        """Return the optimizer of this arm's run private at ``epsilon`` (None: without DP)."""
        return self.optimizer if epsilon is None else self.dp_optimizer or self.optimizer

    def learning_rate_at(self, epsilon: float | None) -> float:
        """Return the step size of this arm's run private at ``epsilon`` (None: without DP)."""
        return self.learning_rate if epsilon is None else self.learning_rate_by_epsilon.get(epsilon, self.learning_rate)

    def resolved(self, model: str, epsilon: float | None) -> ArmSpec:
        """Return the run spec's arm settings of this arm's run private at ``epsilon``, its model resolved."""
        own = {name: getattr(self, name) for name in ArmSpec.model_fields}
        return ArmSpec(**{**own, "model": model, "learning_rate": self.learning_rate_at(epsilon),
                          "optimizer": self.optimizer_at(epsilon)})


class PrivacyConfig(PrivacySpec):
    """Differential privacy for the arms: none, DP-SGD on every node, or noise on the aggregate; and which runs."""

    # run the private arms once per ε in this list, a privacy-accuracy sweep (empty: only target_epsilon)
    epsilon_sweep: list[float] = Field(default_factory=list, max_length=8)
    # which arms train privately: both, large or small (the other trains without DP)
    arms: Literal["both", "large", "small"] = "both"
    # also train the private arms without DP, for the accuracy that privacy costs
    compare_without_dp: bool = False

    @field_validator("epsilon_sweep")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        """Accept distinct positive ε values, sorted."""
        if any(not 0 < eps <= 100 for eps in value):
            raise ValueError(f"every ε must be in (0, 100], got {value}")
        if len(set(value)) != len(value):
            raise ValueError(f"ε values must be distinct, got {value}")
        return sorted(value)

    @property
    def epsilons(self) -> list[float]:
        """Return the ε of every private run of an arm: the sweep, or target_epsilon alone."""
        return list(self.epsilon_sweep) or [self.target_epsilon]

    def covers(self, kind: str) -> bool:
        """Return whether the arm ``kind`` ("large" or "small") trains privately."""
        return self.mode != "none" and self.arms in ("both", kind)

    def at(self, epsilon: float | None) -> PrivacySpec:
        """Return the run spec's privacy of a run private at ``epsilon`` (None: a run without DP)."""
        if epsilon is None:
            return PrivacySpec()
        own = {name: getattr(self, name) for name in PrivacySpec.model_fields}
        return PrivacySpec(**{**own, "target_epsilon": epsilon})


class DeploymentConfig(Spec):
    """What serving each arm's final model looks like: the volume to price and how inference is measured."""

    # export, compress (fp32, int8, fp16) and measure each arm's final model after training
    enabled: bool = True
    # predictions served per month, to price serving (the default: about 4 a second around the clock)
    predictions_per_month: float = Field(10_000_000.0, ge=0.0, le=1e15)
    # months of service the serving cost covers; total cost = training + serving over these months
    months: float = Field(12.0, gt=0.0, le=120.0)
    # replicas billed around the clock however few predictions come (0: bill only the busy time, as on a
    # shared or serverless pool)
    min_replicas: int = Field(0, ge=0, le=1000)
    # largest accuracy drop from fp32 that a compressed variant may have and still be what an arm is priced at
    max_accuracy_drop: float = Field(0.005, ge=0.0, le=1.0)
    # onnxruntime threads of a serving replica: the vCPUs its price counts
    threads: int = Field(2, ge=1, le=256)
    # timed batch-1 queries of the latency measurement, after warmup_queries untimed ones
    latency_queries: int = Field(300, ge=10, le=100_000)
    warmup_queries: int = Field(30, ge=0, le=10_000)
    # timed batches of 64 of the throughput measurement
    throughput_batches: int = Field(30, ge=1, le=10_000)
    # examples of static int8 calibration (from the arms' pooled training data, see README: Deployment)
    calibration_examples: int = Field(256, ge=1, le=10_000)


LARGE_MODELS = ("auto", *zoo.LARGE_MODELS)  # the zoo's names: one registry for the config, the zoo and the report
SMALL_MODELS = zoo.SMALL_MODELS


class CompareConfig(CommonSpec):
    """Everything a user chooses for one `federated-compare` run."""

    # dataset and partitioning
    data: DataConfig = DataConfig()
    # the large model: a CNN for 28x28 images (an MLP for tabular data), meant for gpu-tier nodes
    large: ArmConfig = ArmConfig(model="auto", local_epochs=3, batch_size=32, learning_rate=1e-3)
    # the small model: logistic regression, meant for cpu-tier nodes
    small: ArmConfig = ArmConfig(model="logreg", local_epochs=5, batch_size=32, learning_rate=1e-2)
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

    @model_validator(mode="before")
    @classmethod
    def _arms_over_their_defaults(cls, data: object) -> object:
        """Fill an arm given in part (``{"large": {"local_epochs": 2}}``) from that arm's defaults.

        The two arms have different default models and steps, so an arm's missing fields come from
        its own default, not from ArmConfig's; a user changes one field without restating the rest.
        """
        if not isinstance(data, dict):
            return data
        filled = dict(data)
        for kind in ("large", "small"):
            if isinstance(filled.get(kind), dict):
                default = cls.model_fields[kind].default.model_dump()
                filled[kind] = {**default, **filled[kind]}
        return filled

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
        """Check that each arm names a model of its kind."""
        for kind, names in (("large", LARGE_MODELS), ("small", SMALL_MODELS)):
            for field in ("model", "dp_model"):
                name = getattr(getattr(self, kind), field)
                if name is not None and name not in names:
                    raise ValueError(f"{kind}.{field}: expected one of {', '.join(names)}, got {name!r}")
        small_private = self.small.dp_model or self.small.model
        conflict = privacy_conflict(small_private, self.privacy.mode) if self.privacy.covers("small") else None
        if conflict:
            field = "dp_model" if self.small.dp_model else "model"
            raise ValueError(f"privacy.mode (small.{field}): {conflict} (privacy.arms 'large')")
        if self.privacy.mode != "none" and self.data.preprocessing == "federated":
            raise ValueError(
                f"data.preprocessing: {self.data.preprocessing!r} would compute the nodes' feature means, ranges and "
                f"category counts outside the privacy budget of privacy.mode {self.privacy.mode!r}; give "
                "data.preprocessing a fixed spec (the \"preprocessing\" object of the report.json of a run without "
                "privacy, or your own) or 'none'"
            )
        for kind in ("large", "small"):
            conflict = aggregation_conflict(getattr(self, kind).aggregation, self.privacy.mode)
            if conflict and self.privacy.covers(kind):
                raise ValueError(f"{kind}.aggregation: {conflict}")
        return self

    def run_spec(self, kind: str, *, arm: str, model: str, run_key: str, store_uri: str, nodes: list[int],
                 epsilon: float | None = None, preprocessing: dict[str, Any] | None = None) -> RunSpec:
        """Return the run spec of one arm's Flower run: arm ``kind``'s settings at ``epsilon`` (None: without DP).

        ``model``: the arm's model resolved (not "auto"); ``preprocessing``: the spec the arm's
        nodes apply (None: features as loaded).
        """
        return RunSpec(
            mode="train", store_uri=store_uri, run_key=run_key, arm=arm, nodes=nodes,
            rounds=self.rounds, seed=self.seed, node_evaluation=self.node_evaluation,
            keep_last_rounds=self.keep_last_rounds,
            preprocessing=json.dumps(preprocessing, separators=(",", ":")) if preprocessing else "",
            training=getattr(self, kind).resolved(model, epsilon), privacy=self.privacy.at(epsilon), data=self._data(),
        )

    def query_spec(self, *, run_key: str, store_uri: str, federated_statistics: bool) -> RunSpec:
        """Return the run spec of the node query: every node answers, as patient as the most patient arm."""
        timeout = max(getattr(self, kind).round_timeout_s for kind in ("large", "small"))
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
        for kind in ("large", "small"):
            unused = sorted(set(getattr(self, kind).learning_rate_by_epsilon) - set(self.privacy.epsilons))
            if unused and self.privacy.covers(kind):
                notes.append(
                    f"{kind}.learning_rate_by_epsilon: the steps for ε={', '.join(f'{e:g}' for e in unused)} are "
                    f"unused (the private runs of this arm train at ε={', '.join(f'{e:g}' for e in self.privacy.epsilons)}); "
                    "add an ε to privacy.epsilon_sweep to train at it"
                )
        return notes


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
