"""Model zoo: names, one uniform model interface, and the builder.

Importing this module never imports torch: a scikit-learn node must stay light
(every Flower message starts a fresh ClientApp process). Torch is imported only
when ``build_model`` builds a torch model.

Every model exchanges its parameters as an ordered ``dict[str, np.ndarray]`` and
reports metrics as flat ``dict[str, float]`` with the same keys for every model.
A model whose arrays are sums over its examples (``summed_arrays``: the naive Bayes
counts of "mnb") is averaged exactly by FedAvg only as shares: the node sends
``to_shares(arrays, its examples)``, the server applies ``restore_sums(mean, the round's
examples)`` to the aggregate.

Text models ("transformer", "bilstm", "mnb", "tfidf-logreg") read text datasets: hashed
word ids (``clients.text``), ``Dataset.kind == "text"``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from clients._model_checks import OPTIMIZERS
from clients.data import Dataset

LARGE_MODELS = ("cnn", "cnn-dp", "mlp", "transformer", "bilstm")
SMALL_MODELS = ("logreg", "torch-logreg", "gnb", "mnb", "tfidf-logreg")
SKLEARN_MODELS = ("logreg", "gnb", "mnb", "tfidf-logreg")  # numpy/scikit-learn models: CPU only, no DP-SGD
MODEL_NAMES = LARGE_MODELS + SMALL_MODELS
TORCH_MODELS = ("cnn", "cnn-dp", "mlp", "torch-logreg", "transformer", "bilstm")
TEXT_MODELS = ("transformer", "bilstm", "mnb", "tfidf-logreg")  # read text datasets (hashed word ids) only
STATISTICS_MODELS = ("gnb", "mnb")  # parameters are class statistics, not weights: no learning rate or weight decay
# arrays that are sums over a node's examples: FedAvg averages them exactly as shares (to_shares, restore_sums)
SUMMED_ARRAYS = {"mnb": ("class_count", "feature_count")}
DEVICES = ("auto", "cpu", "cuda")


@runtime_checkable
class Model(Protocol):
    """What every model of the zoo offers, torch or scikit-learn."""

    name: str  # zoo name: "cnn", "cnn-dp", "mlp", "logreg", "torch-logreg"
    device: str  # where it computes: "cpu" or "cuda" (or "cuda:N")

    def get_arrays(self) -> dict[str, np.ndarray]:
        """Return the parameters as ordered, named float arrays (copies; float32, gnb's statistics float64)."""
        ...

    def set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace the parameters; raise ValueError naming the first mismatched array."""
        ...

    def fit(
        self, train: Dataset, *, epochs: int, batch_size: int, learning_rate: float, seed: int,
        optimizer: str = "adam", weight_decay: float | None = None,
    ) -> dict[str, float]:
        """Train in place; return train_loss, train_seconds, train_cpu_seconds, num_examples.

        ``optimizer`` (one of OPTIMIZERS) applies to the torch models; the scikit-learn
        logistic regression always runs its own SGD. ``weight_decay``: the L2 penalty added to
        every gradient (None: the model's default; a model without weights refuses a positive one).
        """
        ...

    def evaluate(self, test: Dataset, *, batch_size: int) -> dict[str, float]:
        """Return loss, accuracy, macro_f1 and num_examples on ``test``."""
        ...

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Return the predicted class (int64) of every example in ``x``."""
        ...

    def num_parameters(self) -> int:
        """Return the number of trainable scalars."""
        ...


def has_weights(name: str) -> bool:
    """Return whether zoo model ``name`` trains weights (a weight decay applies to it)."""
    return name not in STATISTICS_MODELS


def build_model(
    name: str, *, input_shape: tuple[int, ...], num_classes: int, seed: int, device: str = "auto",
    private: bool = False,
) -> Model:
    """Build zoo model ``name`` for inputs of ``input_shape``, initialized from ``seed``.

    ``private=True`` builds a torch network that Opacus can train with DP-SGD (layers it
    rejects, such as BatchNorm, replaced); server and nodes must agree on it.
    """
    input_shape = tuple(int(d) for d in input_shape)
    if name not in MODEL_NAMES:
        raise ValueError(
            f"unknown model {name!r}: expected one of {', '.join(MODEL_NAMES)} "
            f"(large: {', '.join(LARGE_MODELS)}; small: {', '.join(SMALL_MODELS)})"
        )
    if num_classes < 2:
        raise ValueError(f"model {name!r} needs at least 2 classes, got num_classes={num_classes}")
    if len(input_shape) not in (1, 3) or min(input_shape) < 1:
        raise ValueError(
            f"model {name!r}: expected input_shape (F,) for tabular or (C, H, W) for images, "
            f"got {input_shape}"
        )
    if device != "auto" and device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {device!r}")
    if name in SKLEARN_MODELS:
        if device not in ("auto", "cpu"):
            raise ValueError(
                f"model {name!r} (numpy/scikit-learn) runs on the CPU only, got device={device!r}; "
                f"use device='cpu' or the model 'torch-logreg' for a GPU"
            )
        if name in ("mnb", "tfidf-logreg"):
            from clients._text_small import MultinomialNaiveBayes, TfidfLogisticRegression

            small = MultinomialNaiveBayes if name == "mnb" else TfidfLogisticRegression
            return small(input_shape=input_shape, num_classes=num_classes, seed=seed)
        if name == "gnb":
            from clients._naive_bayes import GaussianNaiveBayes

            return GaussianNaiveBayes(input_shape=input_shape, num_classes=num_classes, seed=seed)
        from clients._sklearn_models import SgdLogisticRegression

        return SgdLogisticRegression(input_shape=input_shape, num_classes=num_classes, seed=seed)
    if name in TEXT_MODELS:
        from clients._text_models import build_text_model  # imports torch

        return build_text_model(name, input_shape=input_shape, num_classes=num_classes, seed=seed, device=device,
                                private=private)
    from clients._torch_models import build_torch_model  # the only torch import path

    return build_torch_model(name, input_shape=input_shape, num_classes=num_classes, seed=seed, device=device,
                             private=private)


def estimate_training_memory_bytes(
    model_name: str, *, input_shape: tuple[int, ...], num_classes: int, batch_size: int, private: bool,
    optimizer: str = "adam", grad_sample_mode: str = "ghost",
) -> int:
    """Estimate the bytes of tensors that training torch model ``model_name`` on one batch holds at its peak.

    Parameters, gradients, optimizer state, the activations saved for backward, the
    backward workspace and, with ``private``, DP-SGD's per-sample terms for Opacus's
    ``grad_sample_mode`` (fedcompare trains with "ghost"); float32, so an upper bound under
    autocast; a CUDA context and allocator slack come on top. Formula: ``clients/_memory.py``.
    Raises ValueError for a model that is not a torch model or an unknown optimizer or mode.
    """
    if model_name not in TORCH_MODELS:
        raise ValueError(
            f"no memory estimate for model {model_name!r}: expected a torch model ({', '.join(TORCH_MODELS)}); "
            f"the scikit-learn 'logreg' runs on the CPU only"
        )
    if optimizer not in OPTIMIZERS or grad_sample_mode not in ("ghost", "hooks", "functorch", "ew") or batch_size < 1:
        raise ValueError(
            f"model {model_name!r}: expected optimizer in {', '.join(OPTIMIZERS)}, grad_sample_mode ghost, hooks, "
            f"functorch or ew and batch_size >= 1, got {optimizer!r}, {grad_sample_mode!r}, {batch_size}"
        )
    from clients._memory import training_memory_breakdown  # imports torch

    parts = training_memory_breakdown(
        model_name, input_shape=tuple(int(d) for d in input_shape), num_classes=num_classes, batch_size=batch_size,
        private=private, optimizer=optimizer, grad_sample_mode=grad_sample_mode,
    )
    return sum(parts.values())


def resolve_large_model(name: str, kind: str) -> str:
    """Return the large model for a dataset kind: "auto": "cnn" for images, "mlp" for tables, "transformer" for text."""
    if kind not in ("image", "tabular", "text"):
        raise ValueError(f"dataset kind must be 'image', 'tabular' or 'text', got {kind!r}")
    if name == "auto":
        return {"image": "cnn", "tabular": "mlp", "text": "transformer"}[kind]
    if name not in LARGE_MODELS:
        raise ValueError(f"unknown large model {name!r}: expected 'auto' or one of {', '.join(LARGE_MODELS)}")
    if (name in TEXT_MODELS) != (kind == "text"):
        fit = "transformer, bilstm" if kind == "text" else "cnn, cnn-dp, mlp" if kind == "image" else "mlp"
        raise ValueError(f"large model {name!r} does not read {kind} data; use {fit} or 'auto'")
    if name in ("cnn", "cnn-dp") and kind == "tabular":
        raise ValueError(f"large model {name!r} needs image data but the dataset is tabular; use 'mlp' or 'auto'")
    return name


def summed_arrays(model_name: str) -> tuple[str, ...]:
    """Return the names of model ``model_name``'s arrays that are sums over examples (() for most models)."""
    return SUMMED_ARRAYS.get(model_name, ())


def to_shares(arrays: dict[str, np.ndarray], num_examples: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Return ``arrays`` with the summed arrays ``names`` divided by the node's ``num_examples`` (its reply to FedAvg).

    FedAvg weighs every node by its examples, so the weighted mean of the shares is the
    federation's sums divided by the round's total examples; ``restore_sums`` multiplies back.
    """
    if num_examples < 1:
        raise ValueError(f"to_shares needs the node's number of training examples (>= 1), got {num_examples}")
    return {key: np.asarray(value, dtype=np.float64) / num_examples if key in names else value
            for key, value in arrays.items()}


def restore_sums(arrays: dict[str, np.ndarray], total_examples: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Return FedAvg's mean ``arrays`` with the shared arrays ``names`` multiplied by the round's ``total_examples``.

    ``total_examples`` is the sum of the num-examples weights of the replies that were
    averaged; the result holds the federation's exact sums (up to float rounding).
    Raises ValueError when a name is not among the arrays (the wrong model's names).
    """
    missing = [name for name in names if name not in arrays]
    if missing:
        raise ValueError(f"restore_sums: no array {', '.join(map(repr, missing))} among {', '.join(arrays)}; "
                         "pass summed_arrays() of the model that made these arrays")
    if total_examples < 1:
        raise ValueError(f"restore_sums needs the round's total examples (>= 1), got {total_examples}")
    return {key: np.asarray(value, dtype=np.float64) * total_examples if key in names else value
            for key, value in arrays.items()}
