"""Checks and metrics that every model of the zoo shares (numpy only; no torch, so scikit-learn nodes stay light).

Kept apart from `clients/models.py` (the zoo's names and builder), which imports the model
modules that use these helpers: one module both would make an import cycle.
"""

from __future__ import annotations

import numpy as np

from clients.data import Dataset

# optimizers of the torch models: Adam, or SGD with momentum 0.9 (the usual choice under DP-SGD,
# where Adam's per-coordinate scaling turns the noise of a fresh optimizer into large steps)
OPTIMIZERS = ("adam", "sgd")


def check_arrays(
    model_name: str, expected: dict[str, np.ndarray], got: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Return ``got`` in ``expected``'s order and dtypes; raise ValueError on the first mismatch."""
    for key in expected:
        if key not in got:
            raise ValueError(
                f"model {model_name!r}: array {key!r} is missing (expected arrays: "
                f"{', '.join(expected)}); send the arrays of the same model architecture"
            )
    for key in got:
        if key not in expected:
            raise ValueError(
                f"model {model_name!r}: unexpected array {key!r} (expected arrays: "
                f"{', '.join(expected)}); send the arrays of the same model architecture"
            )
    checked = {}
    for key, reference in expected.items():
        value = np.asarray(got[key])
        if value.shape != reference.shape:
            raise ValueError(
                f"model {model_name!r}: array {key!r} has shape {value.shape}, expected "
                f"{reference.shape}; the arrays come from a model built for other inputs or classes"
            )
        if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
            raise ValueError(f"model {model_name!r}: array {key!r} has dtype {value.dtype}, expected numbers")
        checked[key] = value.astype(reference.dtype, copy=False)
    return checked


def check_data(
    model_name: str, data: Dataset, *, input_shape: tuple[int, ...], num_classes: int, purpose: str
) -> None:
    """Raise ValueError when ``data`` is empty or does not match the model's inputs and classes."""
    if len(data) == 0:
        fix = "raise local_test_fraction" if purpose == "evaluate" else "give the node more data"
        raise ValueError(f"model {model_name!r}: cannot {purpose} on 0 examples; {fix}")
    if data.input_shape != input_shape or data.num_classes != num_classes:
        raise ValueError(
            f"model {model_name!r} was built for inputs {input_shape} and {num_classes} classes, "
            f"got dataset {data.name!r} with inputs {data.input_shape} and {data.num_classes} "
            f"classes; build the model from this dataset's input_shape and num_classes"
        )


def check_fit_args(
    model_name: str, *, epochs: int, batch_size: int, learning_rate: float, optimizer: str = "adam",
    weight_decay: float | None = None, has_weights: bool = True,
) -> None:
    """Raise ValueError for a non-positive number of epochs, batch size or learning rate, an unknown optimizer,
    a weight decay outside [0, 1], or a positive one for a model without weights (``has_weights`` False)."""
    if weight_decay is not None and not 0 <= weight_decay <= 1:
        raise ValueError(f"model {model_name!r}: weight_decay must be in [0, 1], got {weight_decay}")
    if weight_decay and not has_weights:
        raise ValueError(f"model {model_name!r} has no weights to decay (its parameters are class statistics), got "
                         f"weight_decay={weight_decay}; leave weight_decay empty for it")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"model {model_name!r}: optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if epochs < 1 or batch_size < 1 or not learning_rate > 0:
        raise ValueError(
            f"model {model_name!r}: epochs, batch_size and learning_rate must be positive, got "
            f"epochs={epochs}, batch_size={batch_size}, learning_rate={learning_rate}"
        )


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, *, loss: float, num_classes: int
) -> dict[str, float]:
    """Return loss, accuracy, macro F1 (over all classes) and num_examples.

    Macro F1 is scikit-learn's ``f1_score(average="macro", labels=range(num_classes),
    zero_division=0)`` (a test holds them equal), computed from a confusion count in
    numpy: importing ``sklearn.metrics`` costs about 1.5 s of CPU, and every Flower
    message starts a fresh ClientApp process that would pay it again.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    true_positive = np.bincount(y_true[y_true == y_pred], minlength=num_classes)[:num_classes]
    predicted = np.bincount(y_pred, minlength=num_classes)[:num_classes]
    actual = np.bincount(y_true, minlength=num_classes)[:num_classes]
    denominator = predicted + actual  # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (predicted + actual)
    f1 = np.divide(2.0 * true_positive, denominator, out=np.zeros(num_classes), where=denominator > 0)
    return {
        "loss": float(loss),
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else 0.0,
        "macro_f1": float(f1.mean()),
        "num_examples": int(len(y_true)),
    }


def check_text_data(model_name: str, data: Dataset) -> None:
    """Raise ValueError when ``data`` is not text (hashed token ids), which the text models read."""
    if data.kind != "text":
        raise ValueError(
            f"model {model_name!r} reads hashed word ids (a text dataset such as 'rotten-tomatoes'), got dataset "
            f"{data.name!r} of kind {data.kind!r}; pick an image or tabular model for it"
        )
