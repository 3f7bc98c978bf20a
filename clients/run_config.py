"""Typed view of the Flower run config that the ClientApp and the ServerApp share."""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, fields
from typing import Any, Mapping

AGGREGATIONS = ("fedavg", "fedmedian", "trimmed-mean", "krum")  # server.strategy.AGGREGATIONS, without Flower
FEDERATED = "federated"  # the node query's preprocessing value: send the statistics of your table
ROUND_ATTEMPTS = 2  # tries of a round that gets too few valid training replies (server.rounds.RoundPolicy)


def privacy_conflict(model: str, privacy_mode: str) -> str | None:
    """Return why ``model`` cannot train under ``privacy_mode`` (None: it can); the flow and the apps say the same."""
    from clients.models import SKLEARN_MODELS

    if privacy_mode == "sample-level" and model in SKLEARN_MODELS:
        return (f"sample-level DP-SGD (Opacus) trains PyTorch models, but the model is the scikit-learn {model!r}: "
                "use the model 'torch-logreg', client-level privacy, or train this arm without DP")
    return None


def aggregation_conflict(aggregation: str, privacy_mode: str) -> str | None:
    """Return why ``aggregation`` cannot combine updates under ``privacy_mode`` (None: it can)."""
    if privacy_mode == "client-level" and aggregation != "fedavg":
        return (f"client-level DP calibrates its noise and ε to the mean of the clipped updates, but the arm "
                f"aggregates with {aggregation!r} (a median or Krum can move further with one node): use aggregation "
                "'fedavg', or sample-level privacy")
    return None


def longest_round_s(round_timeout_s: float, attempts: int = ROUND_ATTEMPTS) -> float:
    """Return the longest one round may take: every training attempt and the evaluation, each up to the timeout."""
    return (attempts + 1) * round_timeout_s


@dataclass(frozen=True)
class ArmRunConfig:
    """One Flower run of fedcompare: one arm, or a query of the federation.

    Field names are the run-config keys of `[tool.flwr.app.config]` in
    pyproject.toml with dashes turned into underscores; that table documents them.
    """

    mode: str
    store_uri: str
    run_key: str
    git_commit: str
    git_dirty: str
    arm: str
    nodes: str
    model: str
    dataset: str
    label_column: str
    partitioning: str
    partition_by: str
    dirichlet_alpha: float
    classes_per_node: int
    central_test_fraction: float
    local_test_fraction: float
    num_rounds: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    seed: int
    round_timeout: float
    aggregation: str
    min_replies: int
    max_update_norm: float
    keep_last_rounds: int
    node_evaluation: str
    privacy_mode: str
    target_epsilon: float
    delta: float
    max_grad_norm: float
    accountant: str
    noise_multiplier: float
    preprocessing: str
    image_size: str

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ArmRunConfig:
        """Read the run config once into typed fields; unknown or missing keys fail loudly."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(known))
        missing = sorted(set(known) - set(run_config))
        if unknown or missing:
            raise ValueError(
                f"run config does not match fedcompare's [tool.flwr.app.config]: "
                f"unknown keys {unknown}, missing keys {missing}; "
                "submit the run from this repository's pyproject.toml"
            )
        types = {"int": int, "float": float, "str": str}
        values = {f.name: types[f.type](run_config[key]) for key, f in known.items()}
        config = cls(**values)
        if config.mode not in ("train", "query"):
            raise ValueError(f"run config mode: expected 'train' or 'query', got {config.mode!r}")
        if config.node_evaluation not in ("final", "every-round"):
            raise ValueError(
                f"run config node-evaluation: expected 'final' or 'every-round', got {config.node_evaluation!r}"
            )
        if config.privacy_mode not in ("none", "sample-level", "client-level"):
            raise ValueError(
                f"run config privacy-mode: expected 'none', 'sample-level' or 'client-level', got {config.privacy_mode!r}"
            )
        if config.optimizer not in ("adam", "sgd"):
            raise ValueError(f"run config optimizer: expected 'adam' or 'sgd', got {config.optimizer!r}")
        if config.git_dirty not in ("yes", "no", "unknown"):
            raise ValueError(f"run config git-dirty: expected 'yes', 'no' or 'unknown', got {config.git_dirty!r}")
        if config.accountant not in ("rdp", "prv"):
            raise ValueError(f"run config accountant: expected 'rdp' or 'prv', got {config.accountant!r}")
        config._check_rounds()
        if (config.partitioning == "by-column") != bool(config.partition_by):
            raise ValueError("run config partitioning 'by-column' and partition-by go together: set both (a column "
                             f"name) or neither; got partitioning {config.partitioning!r}, partition-by {config.partition_by!r}")
        config.preprocessing_spec  # parse and check it once here: a bad spec fails before any node trains
        if config.image_size and not re.fullmatch(r"[1-9]\d{0,4}x[1-9]\d{0,4}", config.image_size):
            raise ValueError(f"run config image-size: expected '' or HEIGHTxWIDTH such as '32x32', got {config.image_size!r}")
        return config

    def _check_rounds(self) -> None:
        """Check the round rules: aggregation, minimum replies, update norm bound and timeout."""
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"run config aggregation: expected one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}"
            )
        conflict = aggregation_conflict(self.aggregation, self.privacy_mode)
        if conflict:
            raise ValueError(f"run config aggregation: {conflict}")
        conflict = privacy_conflict(self.model, self.privacy_mode) if self.mode == "train" else None
        if conflict:
            raise ValueError(f"run config privacy-mode: {conflict}")
        if self.min_replies < 1:
            raise ValueError(f"run config min-replies: expected 1 or more, got {self.min_replies}")
        if not (math.isfinite(self.max_update_norm) and self.max_update_norm >= 0):
            raise ValueError(
                f"run config max-update-norm: expected a finite number >= 0 (0: no bound), got {self.max_update_norm}"
            )
        if self.keep_last_rounds < 0:
            raise ValueError(f"run config keep-last-rounds: expected 0 (every round) or more, got {self.keep_last_rounds}")
        if not (math.isfinite(self.round_timeout) and self.round_timeout > 0):
            raise ValueError(f"run config round-timeout: expected seconds > 0, got {self.round_timeout}")

    @property
    def image_shape(self) -> tuple[int, int] | None:
        """Return the (H, W) every image of an image folder is resized to (None: the first image's size)."""
        if not self.image_size:
            return None
        height, width = (int(side) for side in self.image_size.split("x"))
        return height, width

    @property
    def wants_statistics(self) -> bool:
        """Return whether the node query asks the nodes for the preprocessing statistics of their tables."""
        return self.preprocessing == FEDERATED

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
                f"run config preprocessing: expected '', {FEDERATED!r} or a spec's JSON, got text that is not "
                f"JSON ({err.msg} at character {err.pos}); pass the \"preprocessing\" object of a report.json"
            ) from None
        check_spec(spec)
        return spec

    @property
    def update_norm_bound(self) -> float | None:
        """Return the largest update norm the server accepts, or None for no bound (max-update-norm 0)."""
        return self.max_update_norm or None

    def privacy_kwargs(self) -> dict[str, Any]:
        """Return the privacy arguments of `privacy.accounting.plan_*` (noise multiplier 0: calibrate)."""
        return {
            "target_epsilon": self.target_epsilon, "delta": self.delta, "accountant": self.accountant,
            "noise_multiplier": self.noise_multiplier or None,
        }

    @property
    def node_ids(self) -> list[int]:
        """Return the node ids this arm trains on (empty: every connected node)."""
        return [int(part) for part in self.nodes.split(",") if part.strip()]

    def data_kwargs(self) -> dict[str, Any]:
        """Return the partitioning arguments of `clients.data.node_data`."""
        return {
            "scheme": self.partitioning,
            "seed": self.seed,
            "alpha": self.dirichlet_alpha,
            "classes_per_node": self.classes_per_node,
            "central_test_fraction": self.central_test_fraction,
            "local_test_fraction": self.local_test_fraction,
        }
