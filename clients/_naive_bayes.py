"""Gaussian naive Bayes of the zoo ("gnb"), federated exactly through its sufficient statistics; never imports torch.

Private to ``clients``: build it through ``clients.models.build_model``.

Its arrays are the node's sufficient statistics divided by its number of examples: per
class the share of examples, the sum of the features and the sum of their squares. FedAvg
weights every node by its examples, so the weighted mean of the shares is the federation's
sums over the federation's examples: the global model is the Gaussian naive Bayes of the
pooled training data, in one round, with no row leaving a node (a test holds it equal to
scikit-learn's ``GaussianNB`` fitted on the pooled data). Later rounds recompute the same
statistics. Median or Krum aggregation, or client-level DP noise, make it approximate.
"""

from __future__ import annotations

import time
from math import prod

import numpy as np

from clients._model_checks import check_arrays, check_data, check_fit_args, classification_metrics
from clients.data import Dataset

VAR_SMOOTHING = 1e-9  # share of the largest feature variance added to every variance, as GaussianNB does
_PROBABILITY_FLOOR = 1e-15


class GaussianNaiveBayes:
    """Gaussian naive Bayes with the uniform model interface; arrays "class_share", "sum_share", "square_share"."""

    name = "gnb"
    device = "cpu"

    def __init__(self, *, input_shape: tuple[int, ...], num_classes: int, seed: int) -> None:
        """Start from uniform class shares and unit variances, so get_arrays and predict work before any fit."""
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.seed = seed  # kept for reproducibility records; fitting is deterministic
        features = prod(input_shape)
        self._class = np.full(num_classes, 1.0 / num_classes, dtype=np.float64)
        self._sum = np.zeros((num_classes, features), dtype=np.float64)
        self._square = np.tile(self._class[:, None], (1, features))  # variance 1 around mean 0

    def get_arrays(self) -> dict[str, np.ndarray]:
        """Return copies of the three statistic shares (float64: sums of squares need the precision)."""
        return {"class_share": self._class.copy(), "sum_share": self._sum.copy(), "square_share": self._square.copy()}

    def set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace the statistic shares after checking names and shapes."""
        checked = check_arrays(self.name, self.get_arrays(), arrays)
        self._class, self._sum, self._square = (np.array(checked[k], dtype=np.float64)
                                                for k in ("class_share", "sum_share", "square_share"))

    def fit(
        self, train: Dataset, *, epochs: int, batch_size: int, learning_rate: float, seed: int,
        optimizer: str = "adam", weight_decay: float | None = None,
    ) -> dict[str, float]:
        """Replace the arrays with this node's statistic shares (closed form: epochs, batch and step are unused).

        A positive ``weight_decay`` is refused: the statistics are not weights.
        """
        check_fit_args(self.name, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, optimizer=optimizer,
                       weight_decay=weight_decay, has_weights=False)
        check_data(self.name, train, input_shape=self.input_shape, num_classes=self.num_classes, purpose="fit")
        wall, cpu = time.perf_counter(), time.process_time()
        x, n = _flat(train.x), len(train)
        onehot = np.zeros((n, self.num_classes))
        onehot[np.arange(n), train.y] = 1.0
        self._class = onehot.sum(axis=0) / n
        self._sum = onehot.T @ x / n
        self._square = onehot.T @ np.square(x) / n
        return {
            "train_loss": _log_loss(self._log_proba(x), train.y),
            "train_seconds": time.perf_counter() - wall,
            "train_cpu_seconds": time.process_time() - cpu,
            "num_examples": n,
        }

    def parameters(self) -> dict[str, np.ndarray]:
        """Return GaussianNB's fitted attributes: class_prior_, theta_ (means), var_ (smoothed) and epsilon_."""
        seen = self._class > 0
        count = np.where(seen, self._class, 1.0)[:, None]
        theta = np.where(seen[:, None], self._sum / count, 0.0)
        raw_var = np.where(seen[:, None], self._square / count - np.square(theta), 1.0)
        pooled = self._square.sum(axis=0) - np.square(self._sum.sum(axis=0))  # every feature's variance, all classes
        epsilon = VAR_SMOOTHING * max(float(np.max(pooled, initial=0.0)), 1e-12)
        var = np.maximum(raw_var, 0.0) + epsilon
        prior = np.maximum(self._class, 0.0)
        prior = prior / prior.sum() if prior.sum() > 0 else np.full(self.num_classes, 1.0 / self.num_classes)
        return {"class_prior_": prior, "theta_": theta, "var_": var, "epsilon_": epsilon}

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Return the predicted class of every example in ``x``."""
        return self._log_proba(_flat(x)).argmax(axis=1).astype(np.int64)

    def evaluate(self, test: Dataset, *, batch_size: int) -> dict[str, float]:
        """Return log loss, accuracy, macro F1 and num_examples on ``test`` (batch_size unused)."""
        check_data(self.name, test, input_shape=self.input_shape, num_classes=self.num_classes, purpose="evaluate")
        log_proba = self._log_proba(_flat(test.x))
        return classification_metrics(test.y, log_proba.argmax(axis=1), loss=_log_loss(log_proba, test.y),
                                      num_classes=self.num_classes)

    def num_parameters(self) -> int:
        """Return the number of statistics (one share per class, two per class and feature)."""
        return int(self._class.size + self._sum.size + self._square.size)

    def _log_proba(self, x: np.ndarray) -> np.ndarray:
        """Return log class probabilities as GaussianNB.predict_log_proba computes them."""
        p = self.parameters()
        with np.errstate(divide="ignore"):
            log_prior = np.log(p["class_prior_"])
        inverse = 1.0 / p["var_"]  # sum over features of (x - θ)² / v, as matrix products: no (N, K, F) array
        distance = np.square(x) @ inverse.T - 2.0 * x @ (p["theta_"] * inverse).T + (np.square(p["theta_"]) * inverse).sum(axis=1)
        joint = log_prior[None, :] - 0.5 * np.sum(np.log(2.0 * np.pi * p["var_"]), axis=1)[None, :] - 0.5 * distance
        return joint - np.logaddexp.reduce(joint, axis=1, keepdims=True)


def _flat(x: np.ndarray) -> np.ndarray:
    """Return ``x`` as a float64 (N, F) matrix (images are flattened)."""
    return np.asarray(x, dtype=np.float64).reshape(len(x), -1)


def _log_loss(log_proba: np.ndarray, y: np.ndarray) -> float:
    """Return the mean negative log-likelihood of labels ``y``."""
    picked = log_proba[np.arange(len(y)), y]
    return float(-np.mean(np.maximum(picked, np.log(_PROBABILITY_FLOOR))))
