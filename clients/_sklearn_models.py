"""The scikit-learn logistic regression of the zoo ("logreg"); never imports torch.

Private to ``clients``: build it through ``clients.models.build_model``.

It is ``SGDClassifier(loss="log_loss")``: L2-regularized logistic regression fitted by
per-example SGD at a constant learning rate, one binary classifier per class
(one-vs-rest), exactly as scikit-learn does it. ``partial_fit(classes=...)`` keeps the
parameters full-shape on a node that lacks some classes, and ``fit`` continues from
the current arrays (warm start): they are installed as ``coef_``/``intercept_`` before
the first ``partial_fit``, which scikit-learn then updates instead of re-initializing.
"""

from __future__ import annotations

import time
from math import prod

import numpy as np

from clients.data import Dataset
from clients._model_checks import check_arrays, check_data, check_fit_args, classification_metrics

_PROBABILITY_FLOOR = 1e-15  # clip for log(0) in the log loss, as sklearn.metrics.log_loss does
_ROWS_PER_CALL = 65_536  # most examples (epochs of them, concatenated) one SGD partial_fit call takes


class SgdLogisticRegression:
    """Logistic regression with the uniform model interface; arrays "coef" and "intercept".

    "coef" is (K, F) and "intercept" (K,) for K > 2 classes; for K == 2 they are (1, F)
    and (1,), scikit-learn's binary form (one score for the positive class).
    """

    name = "logreg"
    device = "cpu"

    def __init__(self, *, input_shape: tuple[int, ...], num_classes: int, seed: int, l2: float = 1e-4) -> None:
        """Start from zero arrays, so get_arrays works before any fit."""
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.seed = seed  # kept for reproducibility records; zero init needs no randomness
        self.l2 = l2  # SGDClassifier's alpha: strength of the L2 penalty
        rows = 1 if num_classes == 2 else num_classes
        self._coef = np.zeros((rows, prod(input_shape)), dtype=np.float32)
        self._intercept = np.zeros(rows, dtype=np.float32)

    def get_arrays(self) -> dict[str, np.ndarray]:
        """Return copies of "coef" and "intercept"."""
        return {"coef": self._coef.copy(), "intercept": self._intercept.copy()}

    def set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace "coef" and "intercept" after checking names and shapes."""
        checked = check_arrays(self.name, self.get_arrays(), arrays)
        self._coef = np.array(checked["coef"], dtype=np.float32, order="C")
        self._intercept = np.array(checked["intercept"], dtype=np.float32)

    def fit(
        self, train: Dataset, *, epochs: int, batch_size: int, learning_rate: float, seed: int,
        optimizer: str = "adam", weight_decay: float | None = None,
    ) -> dict[str, float]:
        """Run ``epochs`` seeded-shuffled SGD passes from the current arrays.

        ``batch_size`` is checked but unused: SGDClassifier updates after every example.
        ``weight_decay`` is SGDClassifier's alpha (``alpha * w`` added to every gradient, as torch's
        weight_decay); None: the model's ``l2`` (scikit-learn's default, 1e-4).
        """
        from sklearn.linear_model import SGDClassifier

        check_fit_args(self.name, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, optimizer=optimizer,
                       weight_decay=weight_decay)
        check_data(self.name, train, input_shape=self.input_shape, num_classes=self.num_classes, purpose="fit")
        wall, cpu = time.perf_counter(), time.process_time()
        x = _flat(train.x)
        estimator = SGDClassifier(
            loss="log_loss",
            penalty="l2",
            alpha=self.l2 if weight_decay is None else weight_decay,
            learning_rate="constant",
            eta0=learning_rate,
            shuffle=False,  # we shuffle per epoch: sklearn would reuse one order for every call
            random_state=seed,
        )
        estimator.coef_ = self._coef.copy()  # warm start: partial_fit updates these in place
        estimator.intercept_ = self._intercept.copy()
        rng = np.random.default_rng(seed)
        classes = np.arange(self.num_classes)
        orders = [rng.permutation(len(train)) for _ in range(epochs)]
        # epochs in as few partial_fit calls as _ROWS_PER_CALL allows: each call costs scikit-learn's checks and
        # a one-vs-rest dispatch per class (7 ms for 10 classes; a small node's whole epoch is less), and SGD
        # with a constant step goes on from one example to the next the same way within a call or across calls
        per_call = max(1, _ROWS_PER_CALL // max(1, len(train)))
        for first in range(0, epochs, per_call):
            order = np.concatenate(orders[first:first + per_call])
            estimator.partial_fit(x[order], train.y[order], classes=classes)
        self._coef = np.asarray(estimator.coef_, dtype=np.float32, order="C")
        self._intercept = np.asarray(estimator.intercept_, dtype=np.float32).reshape(-1)
        train_loss = _log_loss(self._log_proba(x), train.y)
        return {
            "train_loss": train_loss,
            "train_seconds": time.perf_counter() - wall,
            "train_cpu_seconds": time.process_time() - cpu,
            "num_examples": len(train),
        }

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Return the predicted class of every example in ``x``."""
        return self._log_proba(_flat(x)).argmax(axis=1).astype(np.int64)

    def evaluate(self, test: Dataset, *, batch_size: int) -> dict[str, float]:
        """Return log loss, accuracy, macro F1 and num_examples on ``test`` (batch_size unused)."""
        check_data(self.name, test, input_shape=self.input_shape, num_classes=self.num_classes, purpose="evaluate")
        log_proba = self._log_proba(_flat(test.x))
        return classification_metrics(
            test.y, log_proba.argmax(axis=1), loss=_log_loss(log_proba, test.y), num_classes=self.num_classes
        )

    def num_parameters(self) -> int:
        """Return the number of coefficients and intercepts."""
        return int(self._coef.size + self._intercept.size)

    def _log_proba(self, x: np.ndarray) -> np.ndarray:
        """Return log class probabilities the way SGDClassifier.predict_proba defines them."""
        scores = x.astype(np.float64) @ self._coef.T.astype(np.float64) + self._intercept.astype(np.float64)
        if self.num_classes == 2:  # binary: sigmoid of the one score
            return np.column_stack([-np.logaddexp(0.0, scores[:, 0]), -np.logaddexp(0.0, -scores[:, 0])])
        log_sigmoid = -np.logaddexp(0.0, -scores)  # one-vs-rest: normalized sigmoids
        return log_sigmoid - np.logaddexp.reduce(log_sigmoid, axis=1, keepdims=True)


def _flat(x: np.ndarray) -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 (N, F) matrix (images are flattened)."""
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(len(x), -1))


def _log_loss(log_proba: np.ndarray, y: np.ndarray) -> float:
    """Return the mean negative log-likelihood of labels ``y``."""
    picked = log_proba[np.arange(len(y)), y]
    return float(-np.mean(np.maximum(picked, np.log(_PROBABILITY_FLOOR))))
