"""The sections of `CompareConfig`: data, an arm, privacy and deployment, each the run spec's model plus what
only the flow decides."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from clients import models as zoo
from clients.preprocess import PreprocessingError, check_spec
from clients.spec import ArmSpec, DataSpec, DistillSpec, PrivacySpec, SimulationSpec, Spec

BUILTIN_DATASETS = ("mnist", "fashion-mnist", "digits", "breast-cancer", "rotten-tomatoes")
BUILTIN_GROUPS = {"rotten-tomatoes": ("movie_name",)}  # columns of a built-in set that partition_by may name
DATA_SUFFIXES = (".csv", ".npz")
ARM_NAME = r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$"  # an extra arm's name: lower case words joined by dashes
KINDS = ("large", "small")  # the two kinds of arm: which nodes train it (by-tier) and what privacy covers
DISTILLED_ARM = "small-distilled"  # the arm `distill` adds
RESERVED_ARMS = (DISTILLED_ARM,)  # arm names the flow gives arms of its own


class DataConfig(DataSpec):
    """What data the nodes train on, how it is split between them, and how tables become features."""

    # how a table becomes features: "federated" standardizes numbers, one-hot encodes text (categorical)
    # columns and fills empty cells, with statistics the nodes compute on their training splits and the
    # server adds up (clients/preprocess.py); "none" uses the features as loaded (text or empty cells are
    # refused); or a fixed spec object (the "preprocessing" object of an earlier report.json, or your own).
    # "auto": federated for a .csv/.npz file, none for the built-in sets (scaled at load by known constants),
    # image folders and text (a text_column). Under privacy the statistics are not covered by ε, so a private run refuses
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
        """Check that a partition_by column belongs to a CSV file, or is one a built-in set has."""
        groups = BUILTIN_GROUPS.get(self.dataset)
        if groups is not None:
            if self.partition_by and self.partition_by not in groups:
                raise ValueError(f"partition_by: {self.dataset!r} can be partitioned by {', '.join(groups)}, got "
                                 f"{self.partition_by!r}")
        elif self.partition_by and not self.dataset.lower().endswith(".csv"):
            raise ValueError(f"partition_by names a column of a CSV file, but the dataset is {self.dataset!r}")
        return self

    def preprocessing_mode(self, *, private: bool) -> Literal["federated", "none", "fixed"]:
        """Return how this run's tables become features, "auto" resolved ("none" for a ``private`` run)."""
        if isinstance(self.preprocessing, dict):
            return "fixed"
        if self.preprocessing == "auto":
            builtin_or_images = self.dataset in BUILTIN_DATASETS or not self.dataset.lower().endswith(DATA_SUFFIXES)
            return "none" if builtin_or_images or private or self.text_column else "federated"
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


class ExtraArmConfig(ArmConfig):
    """An arm beyond large and small: its kind says which nodes train it and whether privacy covers it."""

    # "large": trains on the large arm's nodes (gpu tier with by-tier), "small": on the small arm's
    kind: Literal["large", "small"]


class DistillConfig(DistillSpec):
    """Knowledge distillation: a third arm, the small model taught by the large one's soft labels."""

    # add the arm "small-distilled": after the large arm finishes, the small arm's nodes train the small
    # model (its settings) federatedly on their own data with the large global model's soft labels; it is
    # referenced (distilled centrally from the same teacher), priced and recommended like any arm
    enabled: bool = False


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


class SimulationConfig(SimulationSpec):
    """Flower's Simulation Engine (engine "simulation"): virtual nodes run by Ray actors that import the app once.

    Each virtual node holds one partition of the run's dataset; each round trains a seeded
    sample of them. ``tier`` is the flow's: by-tier gives each arm the virtual nodes of its tier.
    """

    # virtual nodes (partitions of the run's dataset)
    num_nodes: int = Field(100, ge=2, le=100_000)
    # CPUs and GPU share Ray reserves for each virtual node in flight: the actors = the cluster's CPUs /
    # client_cpus (2 cores, 1 CPU each: 2 actors); a GPU share of 0.25 puts four virtual nodes on a GPU
    client_cpus: int = Field(1, ge=1, le=256)
    client_gpus: float = Field(0.0, ge=0.0, le=8.0)
    # a Ray cluster to run the virtual nodes on, as `ray.init(address=...)` takes it ("ray://host:10001", or
    # "auto" for the cluster this host belongs to); empty: a local Ray instance started for each run
    ray_address: str = Field("", pattern=r"^(|auto|local|ray://[A-Za-z0-9.\-\[\]:]+|[A-Za-z0-9.\-]+:\d{1,5})$")

    @field_validator("tier")
    @classmethod
    def _flow_sets_tier(cls, value: str) -> str:
        """Refuse a tier: the flow sets each arm's from the assignment."""
        if value:
            raise ValueError("set by the flow for each arm from assignment (by-tier: large on the gpu share, "
                             "small on the rest); leave it out")
        return value

    def spec(self, tier: str) -> SimulationSpec:
        """Return the run spec's simulation settings of an arm that trains on the virtual nodes of ``tier``."""
        own = {name: getattr(self, name) for name in SimulationSpec.model_fields}
        return SimulationSpec(**{**own, "tier": tier})


LARGE_MODELS = ("auto", *zoo.LARGE_MODELS)  # the zoo's names: one registry for the config, the zoo and the report
SMALL_MODELS = zoo.SMALL_MODELS
