"""`CompareConfig`: the one parameter of the `federated-compare` flow."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flows.decision import CostModel

BUILTIN_DATASETS = ("mnist", "digits", "breast-cancer")
DATA_SUFFIXES = (".csv", ".npz")
DEFAULT_SUPERLINK = "127.0.0.1:8000"
_ADDRESS = re.compile(r"^[A-Za-z0-9.\-]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$")


class _Strict(BaseModel):
    """Base of every config model: unknown keys fail loudly, values are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)


class DataConfig(_Strict):
    """What data the nodes train on and how it is split between them."""

    # mnist (5,000 real MNIST images), digits, breast-cancer, or a path to a .csv/.npz file
    dataset: str = "mnist"
    # name of the label column when `dataset` is a CSV file
    label_column: str = "label"
    # how the pool is split over nodes: iid, dirichlet (label skew by alpha) or pathological
    partitioning: Literal["iid", "dirichlet", "pathological"] = "dirichlet"
    # Dirichlet concentration: small values give strongly skewed label mixes per node
    dirichlet_alpha: float = Field(0.5, gt=0.0, le=1000.0)
    # classes each node holds under pathological partitioning
    classes_per_node: int = Field(2, ge=1)
    # share of the dataset held out as the central test set (reference evaluation only)
    central_test_fraction: float = Field(0.2, gt=0.0, lt=0.9)
    # share of each node's partition kept as that node's local test split
    local_test_fraction: float = Field(0.15, gt=0.0, lt=0.9)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        """Accept a built-in dataset name or a path to a CSV/NPZ file."""
        if value in BUILTIN_DATASETS or value.lower().endswith(DATA_SUFFIXES):
            return value
        raise ValueError(
            f"expected one of {', '.join(BUILTIN_DATASETS)} or a path ending in "
            f".csv or .npz, got {value!r}"
        )


class ArmConfig(_Strict):
    """How one arm (the large or the small model) trains."""

    # model from the zoo: large = auto | cnn | mlp; small = logreg | torch-logreg
    model: str
    # local passes over each node's training split per round
    local_epochs: int = Field(1, ge=1, le=100)
    # examples per local training step
    batch_size: int = Field(32, ge=1, le=65536)
    # step size of the node's optimizer
    learning_rate: float = Field(gt=0.0, le=10.0)


LARGE_MODELS = ("auto", "cnn", "mlp")
SMALL_MODELS = ("logreg", "torch-logreg")


class CompareConfig(_Strict):
    """Everything a user chooses for one `federated-compare` run."""

    # dataset and partitioning
    data: DataConfig = DataConfig()
    # federated rounds per arm
    rounds: int = Field(5, ge=1, le=1000)
    # the large model: a CNN for 28x28 images (an MLP for tabular data), meant for gpu-tier nodes
    large: ArmConfig = ArmConfig(model="auto", local_epochs=3, batch_size=32, learning_rate=1e-3)
    # the small model: logistic regression, meant for cpu-tier nodes
    small: ArmConfig = ArmConfig(model="logreg", local_epochs=5, batch_size=32, learning_rate=1e-2)
    # all-nodes: both arms train on every node (same data: a like-for-like comparison);
    # by-tier: large on gpu-tier nodes, small on cpu-tier nodes (each arm sees only its nodes' data)
    assignment: Literal["all-nodes", "by-tier"] = "all-nodes"
    # seed of partitioning, initialisation, sampling and shuffling
    seed: int = Field(0, ge=0, le=2**31 - 1)
    # central-test accuracy an arm must reach to count as good enough
    target_accuracy: float = Field(0.9, gt=0.0, le=1.0)
    # checkpoint store: a path, file:// or s3://bucket/prefix URI (empty: $FEDCOMPARE_STORE or <state dir>/store)
    store_uri: str = ""
    # Flower SuperLink address host:port (empty: $FEDCOMPARE_SUPERLINK or 127.0.0.1:8000)
    superlink: str = ""
    # seconds the server waits for the replies of one round
    round_timeout_s: float = Field(600.0, gt=0.0, le=86400.0)
    # when nodes evaluate the global model on their local test split: after the final round
    # only (one message less per node and round) or after every round; the server evaluates
    # centrally after every round either way
    node_evaluation: Literal["final", "every-round"] = "final"
    # the price table that turns measured seconds and bytes into dollars, energy and CO2
    cost: CostModel = CostModel()
    # run key (flow-run id) of an earlier comparison to continue after its last complete
    # round of each arm, with the same config (empty: a new comparison)
    resume_from: str = ""
    # times Prefect retries an arm that failed; a retry resumes after the last stored round
    arm_retries: int = Field(1, ge=0, le=10)

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
        if self.large.model not in LARGE_MODELS:
            raise ValueError(
                f"large.model: expected one of {', '.join(LARGE_MODELS)}, got {self.large.model!r}"
            )
        if self.small.model not in SMALL_MODELS:
            raise ValueError(
                f"small.model: expected one of {', '.join(SMALL_MODELS)}, got {self.small.model!r}"
            )
        return self


def state_dir() -> Path:
    """Return the local stack's state directory ($FEDCOMPARE_STATE_DIR or ./.fedcompare)."""
    return Path(os.environ.get("FEDCOMPARE_STATE_DIR") or ".fedcompare").resolve()


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


def parse_overrides(text: str) -> dict:
    """Parse ``text`` (a JSON object of CompareConfig fields) and validate it; return the dict.

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
    try:
        CompareConfig.model_validate(overrides)
    except ValidationError as exc:
        raise ValueError(f"--config: {describe_errors(exc)}") from None
    return overrides


def describe_errors(exc: ValidationError) -> str:
    """Return a pydantic validation error as one line: ``field: problem; field: problem``."""
    parts = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "config"
        parts.append(f"{field}: {error['msg']}")
    return "; ".join(parts)
