"""The run spec: every arm, privacy and data setting of fedcompare, with its type and bounds, defined once.

Pydantic only; no Flower, Prefect or minio import. Three layers read it:

- the flow's `CompareConfig` (flows/config.py) is built from these models (it adds only what
  the flow alone decides: sweeps, DP-only choices, the price table, ...);
- the flow resolves one :class:`RunSpec` per arm (model, optimizer and step at this ε, nodes,
  run key) and sends it as the Flower run config (:meth:`RunSpec.to_run_config`);
- the ServerApp and the ClientApp parse that run config with :meth:`RunSpec.from_run_config`:
  the same model and the same rules, so a combination the flow refuses is refused by the
  apps with the same one line.

The Flower run config is flat: a field's key is its name with dashes, the privacy settings'
prefixed ``privacy-`` (``learning-rate``, ``privacy-mode``). pyproject's ``[tool.flwr.app.config]``
holds :func:`run_config_defaults` (a test checks it). A new arm setting is one field of
:class:`ArmSpec` plus the code that uses it.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Annotated, Any, Literal, Mapping

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from clients._spec_rules import (  # noqa: F401 (the rules are the spec's: imported from here)
    DISTILL_UNDER_DP, ROUND_ATTEMPTS, aggregation_conflict, longest_round_s, privacy_conflict, sums_conflict,
)
from clients._run_config import PREFIX as _PREFIX, describe_errors, encode as _encode, flat as _flat, key as _key
from clients.models import MODEL_NAMES, has_weights

AGGREGATIONS = ("fedavg", "fedmedian", "trimmed-mean", "krum")  # server.strategy.AGGREGATIONS, without Flower
FEDERATED = "federated"  # the node query's preprocessing value: send the statistics of your table


def _image_size(value: object) -> object:
    """Accept "HEIGHTxWIDTH" (the run config's form) or "" besides [height, width] and None."""
    if isinstance(value, str):
        if not value:
            return None
        if not re.fullmatch(r"\d{1,5}x\d{1,5}", value):
            raise ValueError(f"expected '' or HEIGHTxWIDTH such as '32x32', got {value!r}")
        return tuple(int(side) for side in value.split("x"))
    return value


def _empty_is_none(value: object) -> object:
    """Read "" (an unset optional value in the flat run config) as None."""
    return None if value == "" else value


def _node_ids(value: object) -> object:
    """Accept "3,7" (the run config's form) or "" besides a list of node ids."""
    if isinstance(value, str):
        return [int(part) for part in value.split(",") if part.strip()]
    return value


ImageSize = Annotated[tuple[int, int] | None, BeforeValidator(_image_size)]
NodeIds = Annotated[list[int], BeforeValidator(_node_ids)]


def _optional(kind: type) -> Any:
    """Return ``kind | None`` that also reads "" as None."""
    return Annotated[kind | None, BeforeValidator(_empty_is_none)]


class Spec(BaseModel):
    """Base of every spec and config model: unknown keys fail loudly, values are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)


class ArmSpec(Spec):
    """How one arm trains: model, local training and aggregation (CompareConfig's ``large`` and ``small``)."""

    # model from the zoo: large = auto | cnn | cnn-dp | mlp; small = logreg | torch-logreg | gnb (Gaussian
    # naive Bayes, federated exactly by its sufficient statistics). "auto" (the flow only): cnn for
    # images, mlp for tables
    model: str = "auto"
    # local passes over each node's training split per round
    local_epochs: int = Field(1, ge=1, le=100)
    # examples per local training step
    batch_size: int = Field(32, ge=1, le=65536)
    # step size of the node's optimizer
    learning_rate: float = Field(1e-3, gt=0.0, le=10.0)
    # L2 penalty on the weights, added to every gradient as torch's weight_decay (and scikit-learn's alpha);
    # empty: the model's own default (1e-4 for logreg, as scikit-learn's SGDClassifier; 0 for the torch models)
    weight_decay: _optional(float) = Field(None, ge=0.0, le=1.0)
    # optimizer of the torch models: adam, or sgd (momentum 0.9; the usual choice under DP-SGD);
    # the scikit-learn logreg always runs its own SGD
    optimizer: Literal["adam", "sgd"] = "adam"
    # how the server combines the nodes' updates: fedavg (mean weighted by examples), or a rule robust to
    # bad nodes: fedmedian (coordinate-wise median), trimmed-mean (cuts trim_fraction of each tail per
    # coordinate) or krum (the one update closest to the others); privacy.mode client-level needs fedavg
    # (its noise and ε are calibrated to the mean)
    aggregation: Literal["fedavg", "fedmedian", "trimmed-mean", "krum"] = "fedavg"
    # trimmed-mean: share of the updates cut from each tail per coordinate (Flower's beta); with n nodes
    # it cuts floor(trim_fraction * n) from each side, nothing with fewer than 1 / trim_fraction nodes
    trim_fraction: float = Field(0.2, ge=0.0, lt=0.5)
    # krum: bad nodes it tolerates (Flower's num_malicious_nodes, f); each update is scored by its distance
    # to its n - f - 2 nearest others, so the arm needs more than f + 2 nodes
    krum_byzantine: int = Field(0, ge=0, le=1000)
    # valid training replies a round needs (at most the arm's nodes; the server checks); with fewer the
    # round is tried once more, then the arm fails
    min_replies: int = Field(1, ge=1)
    # largest L2 norm of a node's update (its model minus the global model) the server accepts (empty: no
    # bound); replies with wrong array names, shapes or dtypes, or NaN/Inf, are rejected regardless
    max_update_norm: _optional(float) = Field(None, gt=0.0, allow_inf_nan=False)
    # seconds one try of a round waits for the arm's nodes to connect and reply (evaluation as long);
    # a node that misses it is left out of the round
    round_timeout_s: float = Field(600.0, gt=0.0, le=86400.0)

    @field_validator("model")
    @classmethod
    def _zoo_name(cls, value: str) -> str:
        """Accept "auto" or a model of the zoo."""
        if value != "auto" and value not in MODEL_NAMES:
            raise ValueError(f"expected auto or one of {', '.join(MODEL_NAMES)}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _decay_has_weights(self) -> ArmSpec:
        """Refuse a weight decay for a model without weights to decay."""
        if self.weight_decay and self.model != "auto" and not has_weights(self.model):
            raise ValueError(f"weight_decay: the model {self.model!r} has no weights to decay (its parameters are "
                             "class statistics); leave weight_decay empty for it")
        return self


class PrivacySpec(Spec):
    """The differential privacy an arm trains with (CompareConfig's ``privacy`` adds the sweep and arm choice)."""

    # none; sample-level: DP-SGD with Opacus inside each node's training (PyTorch models);
    # client-level: the server clips each node's update and adds Gaussian noise to their mean (any model)
    mode: Literal["none", "sample-level", "client-level"] = "none"
    # ε each node (sample-level) or the arm (client-level) may spend over all rounds, at `delta`
    target_epsilon: float = Field(8.0, gt=0.0, le=100.0)
    # δ of the (ε, δ) guarantee; must stay below 1/examples of every node (1/nodes for client-level)
    delta: float = Field(1e-5, gt=0.0, lt=0.1)
    # clipping norm: of each example's gradient (sample-level) or each node's update (client-level)
    max_grad_norm: float = Field(1.0, gt=0.0, le=1e4)
    # Opacus accountant that calibrates the noise and reports ε: rdp or prv
    accountant: Literal["rdp", "prv"] = "rdp"
    # a fixed noise multiplier instead of calibrating it to target_epsilon (empty: calibrate);
    # a run whose fixed noise cannot meet the target fails before training
    noise_multiplier: _optional(float) = Field(None, gt=0.0, le=1000.0)

    def accounting_kwargs(self) -> dict[str, Any]:
        """Return the privacy arguments of `privacy.accounting.plan_*` (noise multiplier None: calibrate)."""
        return {"target_epsilon": self.target_epsilon, "delta": self.delta, "accountant": self.accountant,
                "noise_multiplier": self.noise_multiplier}


class DistillSpec(Spec):
    """How a distilled arm learns from its teacher's soft labels (clients/distill.py; CompareConfig's ``distill``)."""

    # softmax temperature of the teacher's soft labels: 1 keeps its probabilities, 2-5 show which wrong classes
    # it finds close
    temperature: float = Field(2.0, gt=0.0, le=100.0)
    # weight of the teacher's soft labels in the student's loss (1 - alpha: the hard labels'); 0 = plain training
    alpha: float = Field(0.5, ge=0.0, le=1.0)


class DataSpec(Spec):
    """What data the nodes train on and how it is split between them (CompareConfig's ``data`` adds preprocessing)."""

    # mnist (5,000 real MNIST images), fashion-mnist (70,000 images; Debian's dataset-fashion-mnist),
    # digits, breast-cancer, rotten-tomatoes (12,808 review snippets, fresh or rotten), a path to a .csv/.npz
    # file, or an image folder (one subfolder per class)
    dataset: str = Field("mnist", min_length=1)
    # name of the label column when `dataset` is a CSV file
    label_column: str = Field("label", min_length=1)
    # how the pool is split over nodes: iid, dirichlet (label skew by alpha), pathological, or by-column
    # (a natural partition: the rows of one partition_by value stay on one node)
    partitioning: Literal["iid", "dirichlet", "pathological", "by-column"] = "dirichlet"
    # a CSV column whose values say which node a row belongs to (a site, a hospital, a movie): one node per
    # value, or the values grouped onto the nodes by size; the column is not a feature. Needs
    # partitioning "by-column"
    partition_by: str = ""
    # Dirichlet concentration: small values give strongly skewed label mixes per node
    dirichlet_alpha: float = Field(0.5, gt=0.0, le=1000.0)
    # classes each node holds under pathological partitioning
    classes_per_node: int = Field(2, ge=1)
    # fewest examples a partition of the run's dataset holds; a node's local split keeps at least one to train
    # on. 10,000 virtual nodes of Fashion-MNIST's 56,000 pooled images need 5 or fewer
    min_partition_size: int = Field(10, ge=2, le=100_000)
    # share of the dataset held out as the central test set (reference evaluation only)
    central_test_fraction: float = Field(0.2, gt=0.0, lt=0.9)
    # share of each node's partition kept as that node's local test split
    local_test_fraction: float = Field(0.15, gt=0.0, lt=0.9)
    # [height, width] every image of an image folder is resized to (empty: the first image's size); colour
    # images keep their three channels
    image_size: ImageSize = None
    # a CSV column of free text: each row's text is the example (hashed word ids, as rotten-tomatoes; the
    # other columns, but label_column and partition_by, are not read), for the text models
    text_column: str = ""

    @field_validator("image_size")
    @classmethod
    def _pixels(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        """Accept no size or (height, width) of 4 to 4096 pixels each."""
        if value is not None and not all(4 <= side <= 4096 for side in value):
            raise ValueError(f"expected [height, width] of 4 to 4096 pixels each, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _partition_column(self) -> DataSpec:
        """Check that by-column partitioning and its column come together."""
        if (self.partitioning == "by-column") != bool(self.partition_by):
            raise ValueError("partitioning 'by-column' and partition_by go together: set partitioning to "
                             "'by-column' and partition_by to a column name, or neither")
        if self.text_column and not self.dataset.lower().endswith(".csv"):
            raise ValueError(f"text_column names a column of a CSV file, but the dataset is {self.dataset!r}")
        if self.text_column and self.text_column in (self.label_column, self.partition_by):
            raise ValueError(f"text_column {self.text_column!r} is also the label or partition_by column: name the "
                             "column that holds the text")
        return self

    def load_kwargs(self, *, own_data: bool = False) -> dict[str, Any]:
        """Return the arguments of `clients.data.load_dataset` besides the dataset (``own_data``: a node's own file
        stands in for the partitions, so the run's dataset is not partitioned by a column)."""
        return {"label_column": self.label_column, "image_size": self.image_size,
                "partition_by": "" if own_data else self.partition_by, "text_column": self.text_column}

    def partition_kwargs(self, seed: int) -> dict[str, Any]:
        """Return the partitioning arguments of `clients.data.node_data` (and the central reference)."""
        return {"scheme": self.partitioning, "seed": seed, "alpha": self.dirichlet_alpha,
                "classes_per_node": self.classes_per_node, "central_test_fraction": self.central_test_fraction,
                "local_test_fraction": self.local_test_fraction, "min_size": self.min_partition_size}


class SimulationSpec(Spec):
    """How a run of Flower's Simulation Engine samples its virtual nodes (no effect on real SuperNodes).

    Virtual node ``i`` holds partition ``i`` of ``num_nodes``; the first ``gpu_share`` of the
    partitions are tier ``gpu``, the rest ``cpu``. Each round trains a seeded sample of the
    arm's virtual nodes and evaluates another.
    """

    # virtual nodes of a simulated run (0: the run's nodes are real SuperNodes, the deployment engine)
    num_nodes: int = Field(0, ge=0, le=100_000)
    # share of the arm's virtual nodes that train each round, and the fewest that do
    fraction_train: float = Field(0.1, gt=0.0, le=1.0)
    min_train_nodes: int = Field(2, ge=1)
    # share of the arm's virtual nodes that evaluate when the nodes evaluate (node_evaluation), and the fewest
    fraction_evaluate: float = Field(0.1, gt=0.0, le=1.0)
    min_evaluate_nodes: int = Field(2, ge=1)
    # share of the virtual nodes in tier gpu (partitions 0 .. share * num_nodes - 1): what by-tier assigns
    gpu_share: float = Field(0.5, ge=0.0, le=1.0)
    # the tier of virtual nodes this arm trains on ("" = every virtual node)
    tier: Literal["", "gpu", "cpu"] = ""

    @property
    def gpu_nodes(self) -> int:
        """Return how many virtual nodes are of tier gpu (partitions 0 .. gpu_nodes - 1)."""
        return round(self.gpu_share * self.num_nodes)

    def tier_of(self, partition_id: int) -> str:
        """Return the tier of the virtual node holding ``partition_id``."""
        return "gpu" if partition_id < self.gpu_nodes else "cpu"

    def sample_size(self, available: int, fraction: float, minimum: int) -> int:
        """Return how many of ``available`` nodes a round samples: Flower's rule, max(fraction * n, minimum) <= n."""
        return min(available, max(int(available * fraction), minimum))


class CommonSpec(Spec):
    """Settings of a whole comparison that every one of its runs carries (CompareConfig and RunSpec)."""

    # federated rounds per arm
    rounds: int = Field(5, ge=1, le=1000)
    # seed of partitioning, initialisation, sampling and shuffling
    seed: int = Field(0, ge=0, le=2**31 - 1)
    # when nodes evaluate the global model on their local test split: after the final round
    # only (one message less per node and round) or after every round; the server evaluates
    # centrally after every round either way
    node_evaluation: Literal["final", "every-round"] = "final"
    # model checkpoints kept per arm: those of the last N rounds plus the best round (0: every round);
    # every round's metrics stay, so the report is whole either way
    keep_last_rounds: int = Field(0, ge=0, le=100_000)


class RunSpec(CommonSpec):
    """One Flower run of fedcompare: one arm of a comparison, or the node query; what the apps parse."""

    # what the ServerApp does: "train" one arm, or "query" the nodes and store their answers
    mode: Literal["train", "query"] = "train"
    # where rounds, manifests and node answers go; a path, file:// or s3:// URI
    store_uri: str = Field(".fedcompare/store", min_length=1)
    # store prefix of this comparison (the Prefect flow-run id when the flow submits it)
    run_key: str = Field("manual", pattern=r"^[A-Za-z0-9._-]+$")
    # commit (`git rev-parse HEAD`) of the checkout the app was submitted from, recorded in every checkpoint;
    # "" = not from a git checkout (the checkpoint then says why, with the FAB's hash). The flow sets both
    git_commit: str = ""
    # whether that checkout had uncommitted changes (`git status --porcelain`)
    git_dirty: Literal["yes", "no", "unknown"] = "unknown"
    # the arm's name: "large", "small", or a private run's "<kind>-eps<ε>"
    arm: str = Field("large", pattern=r"^[A-Za-z0-9._-]+$")
    # Flower node ids that train this arm (empty: every connected node)
    nodes: NodeIds = Field(default_factory=list)
    # how the tables become features: "" = as loaded (a table with text or empty cells is refused); the
    # JSON of a preprocessing spec (the flow sends the one it built); "federated" in the node query asks
    # every node for the statistics of its training split
    preprocessing: str = ""
    # the arm whose final global model teaches this one by its soft labels ("" = no distillation) and that
    # model's zoo name; the ServerApp sends the teacher's arrays with every training message
    teacher_arm: str = Field("", pattern=r"^[A-Za-z0-9._-]*$")
    teacher_model: str = ""
    # how the arm trains (its model resolved: not "auto"), its privacy, its data and its distillation
    training: ArmSpec = ArmSpec(model="cnn", local_epochs=3)
    privacy: PrivacySpec = PrivacySpec()
    data: DataSpec = DataSpec()
    distill: DistillSpec = DistillSpec()
    simulation: SimulationSpec = SimulationSpec()

    @model_validator(mode="after")
    def _rules(self) -> RunSpec:
        """Apply the rules that span groups, with the flow's words: a run the flow refuses is refused here too.

        Each message names the run-config key to change (``privacy-mode``), as `flwr run --run-config` users write it.
        """
        if self.training.model == "auto":
            raise ValueError("model: 'auto' is resolved by the flow (cnn for images, mlp for tables); "
                             "name the model of the run")
        conflict = aggregation_conflict(self.training.aggregation, self.privacy.mode)
        if conflict:
            raise ValueError(f"aggregation: {conflict}")
        conflict = privacy_conflict(self.training.model, self.privacy.mode) if self.mode == "train" else None
        if conflict:
            raise ValueError(f"privacy-mode: {conflict}")
        conflict = sums_conflict(self.training.model, privacy_mode=self.privacy.mode,
                                 max_update_norm=self.training.max_update_norm) if self.mode == "train" else None
        if conflict:
            raise ValueError(f"model: {conflict}")
        if bool(self.teacher_arm) != bool(self.teacher_model) or (self.teacher_model and
                                                                   self.teacher_model not in MODEL_NAMES):
            raise ValueError(f"teacher-arm and teacher-model go together, the model from the zoo ({', '.join(MODEL_NAMES)}); "
                             f"got {self.teacher_arm!r} and {self.teacher_model!r}")
        if self.teacher_arm and self.privacy.mode != "none":
            raise ValueError(f"privacy-mode: {DISTILL_UNDER_DP}")
        self.preprocessing_spec  # parse and check it once here: a bad spec fails before any node trains
        return self

    @functools.cached_property
    def preprocessing_spec(self) -> dict[str, Any] | None:
        """Return the preprocessing spec the nodes and the server apply (None: features as loaded)."""
        if self.preprocessing in ("", FEDERATED):
            return None
        from clients.preprocess import check_spec  # numpy: loaded only by runs with a spec

        try:
            spec = json.loads(self.preprocessing)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"preprocessing: expected '', {FEDERATED!r} or a spec's JSON, got text that is not JSON ({err.msg} "
                f"at character {err.pos}); pass the \"preprocessing\" object of a report.json"
            ) from None
        check_spec(spec)
        return spec

    @property
    def wants_statistics(self) -> bool:
        """Return whether the node query asks the nodes for the preprocessing statistics of their tables."""
        return self.preprocessing == FEDERATED

    @property
    def simulated(self) -> bool:
        """Return whether the run's nodes are virtual nodes of Flower's Simulation Engine."""
        return self.simulation.num_nodes > 0

    @property
    def private(self) -> bool:
        """Return whether the arm's nodes run DP-SGD (the model is built for Opacus)."""
        return self.privacy.mode == "sample-level"

    def data_kwargs(self) -> dict[str, Any]:
        """Return the partitioning arguments of `clients.data.node_data`."""
        return self.data.partition_kwargs(self.seed)

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Return the flat Flower run config of this spec (what `flwr run --run-config` takes)."""
        return {key: _encode(value) for key, value in _flat(self.model_dump()).items()}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunSpec:
        """Parse a Flower run config into the spec; unknown keys, missing keys and bad values fail in one line.

        Raises:
            ValueError: ``run config <key>: <problem>`` for every offending key, and what to do.
        """
        known = run_config_defaults()
        unknown = sorted(set(run_config) - set(known))
        missing = sorted(set(known) - set(run_config))
        if unknown or missing:
            raise ValueError(
                f"run config does not match fedcompare's [tool.flwr.app.config]: unknown keys {unknown}, missing "
                f"keys {missing}; submit the run from this repository's pyproject.toml"
            )
        nested: dict[str, Any] = {group: {} for group in _PREFIX}
        for field in cls.model_fields:
            if field not in _PREFIX:
                nested[field] = run_config[_key("", field)]
        for group, prefix in _PREFIX.items():
            for field in cls.model_fields[group].annotation.model_fields:
                nested[group][field] = run_config[_key(prefix, field)]
        try:
            return cls.model_validate(nested)
        except ValidationError as exc:
            raise ValueError(f"run config: {describe_errors(exc, keys=True)}") from None


@functools.cache
def run_config_defaults() -> dict[str, bool | int | float | str]:
    """Return the run config of the default RunSpec: the keys and values of pyproject's ``[tool.flwr.app.config]``."""
    return RunSpec().to_run_config()
