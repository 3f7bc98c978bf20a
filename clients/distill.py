"""Knowledge distillation for the small arm: a large model's soft labels teach a small one (no Flower, Prefect or minio).

The task layer of the ``small-distilled`` arm. After the large arm finishes, every node
computes the large global model's *soft labels* on its own training data
(``soft_labels``: the teacher's class probabilities at temperature T) and trains the
small model on them (``fit_distilled``), federatedly like the plain small arm: the
student's arrays are those of its plain training, so FedAvg, checkpoints and export work
unchanged. Neither data nor soft labels leave the node.

How each kind of student learns from the targets (``alpha`` weighs the teacher, 1 − alpha
the hard label):

- torch models (``torch-logreg``, and any other torch model of the zoo): Hinton et al.
  (2015), loss = alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · CE(student, y),
  student_T the student's softmax of logits / T; the T² keeps the soft term's gradients
  the size of the hard term's as T changes. Same seeded loader, optimizer and precision as
  ``Model.fit``, so alpha = 0 is plain training, step for step.
- ``logreg`` (scikit-learn's ``SGDClassifier``, one-vs-rest log loss): sample weights.
  Each example is repeated once per class c with label c and weight
  w_c = alpha · p_teacher(c) + (1 − alpha) · 1[c = y] (rows of weight 0 dropped), so every
  one-vs-rest classifier c minimizes the binary cross-entropy against the soft target w_c —
  exactly soft-label training of each classifier, with the SGD scikit-learn runs for the
  plain arm. The weights of an example sum to 1, and the L2 penalty (applied once per
  row) is divided by the rows per example, so an epoch shrinks the weights as much as a
  plain one; alpha = 0 is plain training, update for update. The student is matched to
  the teacher's softened probabilities at its own temperature 1 (SGDClassifier has no
  temperature); the factor T² has no meaning here.
- ``gnb`` (Gaussian naive Bayes): the same weights as soft class memberships in its
  sufficient statistics (class share Σ w_c / n, feature sums Σ w_c x / n, squares
  Σ w_c x² / n), as in the M-step of EM with the teacher's responsibilities. Still shares
  of the node's examples, so FedAvg still gives the pooled (weighted) model exactly.

The soft labels depend only on the teacher and the node's data: compute them once per
node and pass them to every round's ``fit_distilled``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from clients._model_checks import check_data, check_fit_args
from clients.data import Dataset
from clients.models import SKLEARN_MODELS, Model

_ROW_SUM_TOLERANCE = 1e-3  # teacher probabilities come in float32: rows sum to 1 within rounding
_PROBABILITY_FLOOR = 1e-15  # clip for log(0), as the models' own log losses do


def soft_labels(teacher_model: Model, x: np.ndarray, temperature: float, *, batch_size: int = 512) -> np.ndarray:
    """Return the teacher's class probabilities at ``temperature`` for model inputs ``x``: float32 (N, classes).

    softmax(logits / T): T = 1 is the teacher's own prediction, T > 1 flattens it (shows
    which wrong classes it finds close), T < 1 sharpens it; the argmax never changes. Torch
    teachers give their logits; the scikit-learn ones their log-probabilities, which are
    logits up to a per-example constant that the softmax removes.

    Raises:
        ValueError: temperature not positive, or ``x`` not the teacher's input shape.
    """
    _check_temperature(temperature)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[1:] != tuple(teacher_model.input_shape):
        raise ValueError(f"teacher {teacher_model.name!r} takes examples of shape {tuple(teacher_model.input_shape)}, "
                         f"got {x.shape[1:]}: pass the node's inputs as clients.data loads them for this dataset")
    if teacher_model.name in SKLEARN_MODELS:
        logits = teacher_model._log_proba(x.reshape(len(x), -1))  # the models' own probabilities, as export uses
    else:
        from clients._torch_models import predict_logits

        logits = predict_logits(teacher_model.network, x, batch_size=batch_size, device=teacher_model.device)
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    probabilities = np.exp(scaled)
    return (probabilities / probabilities.sum(axis=1, keepdims=True)).astype(np.float32)


def fit_distilled(
    student: Model, train: Dataset, teacher_probs: np.ndarray, *, temperature: float, alpha: float, epochs: int,
    batch_size: int, learning_rate: float, seed: int, optimizer: str = "adam", weight_decay: float | None = None,
) -> dict[str, float]:
    """Train ``student`` in place on ``train`` and the teacher's soft labels; return Model.fit's metrics.

    Args:
        student: a zoo model (torch, ``logreg`` or ``gnb``); its arrays keep their names and shapes.
        train: the node's training data, in the order of ``teacher_probs``' rows.
        teacher_probs: ``soft_labels(teacher, train.x, temperature)``: (len(train), classes), rows summing to 1.
        temperature: the T the soft labels were made at (the torch students' softmax and T² use it).
        alpha: weight of the teacher's soft labels, 0..1 (0: plain hard-label training; 1: soft labels only).
        epochs, batch_size, learning_rate, seed, optimizer: as ``Model.fit`` takes them (``gnb`` uses none,
            ``logreg`` no batch size nor optimizer).
        weight_decay: L2 strength added to each step, as ``Model.fit`` takes it: the torch optimizer's
            ``weight_decay`` (None: 0); ``logreg``'s L2 penalty alpha (None: its own default, 1e-4); ``gnb`` has
            no weights (closed form).
    Returns:
        train_loss (the distillation objective, mean over the last pass for torch students; the cross-entropy
        against the mixed targets w for the scikit-learn ones), train_seconds, train_cpu_seconds, num_examples.
    Raises:
        ValueError: a setting out of range, or teacher probabilities that do not match ``train``.
    """
    check_fit_args(student.name, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                   optimizer=optimizer)
    check_data(student.name, train, input_shape=tuple(student.input_shape), num_classes=student.num_classes,
               purpose="fit")
    _check_temperature(temperature)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation alpha (the soft labels' weight) must be in [0, 1], got {alpha}: "
                         f"0 trains on the hard labels only, 1 on the teacher's only")
    if weight_decay is not None and not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    probs = _checked_probs(teacher_probs, len(train), student.num_classes)
    wall, cpu = time.perf_counter(), time.process_time()
    if student.name == "gnb":
        train_loss = _fit_gnb(student, train, _targets(probs, train.y, alpha))
    elif student.name == "logreg":
        train_loss = _fit_logreg(student, train, _targets(probs, train.y, alpha), epochs=epochs,
                                 learning_rate=learning_rate, seed=seed, weight_decay=weight_decay)
    elif hasattr(student, "network"):
        train_loss = _fit_torch(student, train, probs, temperature=temperature, alpha=alpha, epochs=epochs,
                                batch_size=batch_size, learning_rate=learning_rate, seed=seed, optimizer=optimizer,
                                weight_decay=weight_decay)
    else:
        raise ValueError(f"cannot distill into model {student.name!r}: expected a zoo model built with build_model")
    return {
        "train_loss": float(train_loss),
        "train_seconds": time.perf_counter() - wall,
        "train_cpu_seconds": time.process_time() - cpu,
        "num_examples": len(train),
    }


def _check_temperature(temperature: float) -> None:
    """Raise ValueError unless ``temperature`` is a positive finite number."""
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"distillation temperature must be a positive number, got {temperature}: "
                         f"1 keeps the teacher's probabilities, 2-5 is the usual softening")


def _checked_probs(teacher_probs: np.ndarray, num_examples: int, num_classes: int) -> np.ndarray:
    """Return ``teacher_probs`` as float64 after checking its shape and that its rows are probabilities."""
    probs = np.asarray(teacher_probs, dtype=np.float64)
    if probs.shape != (num_examples, num_classes):
        raise ValueError(f"teacher probabilities have shape {probs.shape}, expected ({num_examples}, {num_classes}): "
                         f"compute them with soft_labels on this node's training inputs, in the same order")
    if not np.all(np.isfinite(probs)) or probs.min(initial=0.0) < 0 or \
            np.max(np.abs(probs.sum(axis=1) - 1.0), initial=0.0) > _ROW_SUM_TOLERANCE:
        raise ValueError("teacher probabilities must be finite, non-negative and sum to 1 in every row: "
                         "pass soft_labels' output, not logits")
    return probs


def _targets(probs: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """Return the mixed targets w = alpha · p_teacher + (1 − alpha) · one-hot(y), (N, classes) float64."""
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(y)), y] = 1.0
    return alpha * probs + (1.0 - alpha) * onehot


def _soft_log_loss(log_proba: np.ndarray, targets: np.ndarray) -> float:
    """Return the mean cross-entropy of log-probabilities against soft targets."""
    return float(-np.mean(np.sum(targets * np.maximum(log_proba, np.log(_PROBABILITY_FLOOR)), axis=1)))


def _fit_gnb(student: Any, train: Dataset, targets: np.ndarray) -> float:
    """Set the Gaussian naive Bayes' statistic shares from soft class memberships ``targets``; return the soft loss."""
    x = np.asarray(train.x, dtype=np.float64).reshape(len(train), -1)
    n = len(train)
    student.set_arrays({"class_share": targets.sum(axis=0) / n, "sum_share": targets.T @ x / n,
                        "square_share": targets.T @ np.square(x) / n})
    return _soft_log_loss(student._log_proba(x), targets)


def _fit_logreg(student: Any, train: Dataset, targets: np.ndarray, *, epochs: int, learning_rate: float, seed: int,
                weight_decay: float | None) -> float:
    """Run ``epochs`` seeded SGD passes over the example-per-class rows weighted by ``targets``; return the soft loss.

    The estimator is the one ``SgdLogisticRegression.fit`` builds (a test holds alpha = 0 equal to it).
    """
    from sklearn.linear_model import SGDClassifier

    x = np.ascontiguousarray(np.asarray(train.x, dtype=np.float32).reshape(len(train), -1))
    example, label = np.nonzero(targets > 0)  # row-major: each example's classes in order; weight-0 rows dropped
    weight = targets[example, label]
    rows_per_example = len(example) / len(train)
    arrays = student.get_arrays()
    l2 = student.l2 if weight_decay is None else weight_decay  # as SgdLogisticRegression.fit takes it
    estimator = SGDClassifier(loss="log_loss", penalty="l2", alpha=l2 / rows_per_example,
                              learning_rate="constant", eta0=learning_rate, shuffle=False, random_state=seed)
    estimator.coef_ = arrays["coef"].copy()  # warm start, as the plain fit does
    estimator.intercept_ = arrays["intercept"].copy()
    rng = np.random.default_rng(seed)
    classes = np.arange(student.num_classes)
    for _ in range(epochs):
        order = rng.permutation(len(example))
        estimator.partial_fit(x[example[order]], label[order], classes=classes, sample_weight=weight[order])
    student.set_arrays({"coef": np.asarray(estimator.coef_, dtype=np.float32),
                        "intercept": np.asarray(estimator.intercept_, dtype=np.float32).reshape(-1)})
    return _soft_log_loss(student._log_proba(x), targets)


def _fit_torch(student: Any, train: Dataset, probs: np.ndarray, *, temperature: float, alpha: float, epochs: int,
               batch_size: int, learning_rate: float, seed: int, optimizer: str, weight_decay: float | None) -> float:
    """Train a torch student on alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · CE; return the last pass's loss."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from clients._torch_models import (
        cuda_numerics, make_optimizer, seeded, train_epochs, training_precision,
    )

    device = student.device
    student.precision = training_precision(device, private=False)
    labels = torch.from_numpy(np.asarray(train.y, dtype=np.int64)).to(device)
    teacher = torch.from_numpy(probs.astype(np.float32)).to(device)

    def criterion(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Return the distillation loss of a batch; the loader's targets are the examples' positions."""
        hard = F.cross_entropy(logits, labels[index])
        soft = F.kl_div(F.log_softmax(logits / temperature, dim=1), teacher[index], reduction="batchmean")
        return alpha * temperature ** 2 * soft + (1.0 - alpha) * hard

    with seeded(seed, device), cuda_numerics(device, student.precision):
        step = make_optimizer(student.network, learning_rate=learning_rate, name=optimizer,
                              weight_decay=weight_decay or 0.0)
        # make_loader's sampler over the positions instead of the labels: the same seeded order of examples
        positions = TensorDataset(torch.from_numpy(train.x), torch.arange(len(train)))
        loader = DataLoader(positions, batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed), pin_memory=device.startswith("cuda"))
        loss = train_epochs(student.network, loader, step, epochs=epochs, device=device, criterion=criterion,
                            precision=student.precision)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return loss
