"""The small text models of the zoo: multinomial naive Bayes ("mnb") and logistic regression on TF-IDF ("tfidf-logreg").

Private to ``clients``: build them through ``clients.models.build_model``. numpy and
scipy.sparse only (no torch, no scikit-learn import). Both read a text dataset's hashed
word ids and count hashed word and word-pair buckets with ``clients.text.ngram_counts``
(a sparse matrix per call; the counts are never stored), so every node builds the same
features from its own texts, with no shared vocabulary.

**mnb** is federated exactly. Its arrays are absolute counts: per class the number of
examples ("class_count") and of every n-gram bucket ("feature_count"), scikit-learn's
``MultinomialNB`` attributes of the same names; additive (Laplace/Lidstone) smoothing
``alpha`` needs the absolute counts, so shares of them are not enough. A node divides these
summed arrays by its number of examples before sending them
(``clients.models.to_shares``), FedAvg's example-weighted mean of the shares is the
federation's sums over its examples, and the server multiplies them by the round's total
examples (``clients.models.restore_sums``): the global model is the naive Bayes of the
pooled training data, in one round (a test holds it equal to ``MultinomialNB`` fitted on
the pooled counts). Median or Krum aggregation or client-level DP noise make it approximate.

**tfidf-logreg** is a softmax regression on l2-normalised TF-IDF of the same buckets,
trained by mini-batch Adam (or SGD with momentum 0.9), warm-started from its arrays. The
IDF must be the same on every node, and a node's own document frequencies differ from the
federation's, so they travel as a model array: "df_share", the share of examples that
contain each bucket. FedAvg's example-weighted mean of the nodes' shares is exactly the
share in the pooled data of the round's nodes. A fit weighs with the df_share it was given
(its own when it was given none: all zeros, the first round) and then holds its own share
for the server to average. From the second round on every node weighs with the same IDF,
``1 + ln((1 + s) / (df_share + s))`` with a fixed ``s = IDF_SMOOTHING`` (it stands in for
scikit-learn's ``1 / N``, which a node cannot know for the federation). The alternative,
plain l2-normalised term frequencies, would need no shared statistic but gives up IDF's
down-weighting of words that every review has.
"""

from __future__ import annotations

import time

import numpy as np

from clients._model_checks import (
    check_arrays, check_data, check_fit_args, check_text_data, classification_metrics,
)
from clients.data import Dataset
from clients.text import NGRAM_FEATURES, ngram_counts

NGRAM_RANGE = (1, 2)  # words and word pairs
ALPHA = 1.0  # MultinomialNB's additive smoothing (Laplace), its default
IDF_SMOOTHING = 1e-4  # the s of the IDF 1 + ln((1 + s) / (df_share + s)): a bucket in no example weighs 1 + ln(10,001)
_ADAM = (0.9, 0.999, 1e-8)  # beta1, beta2, epsilon: torch's defaults
_SGD_MOMENTUM = 0.9  # as the torch models' SGD
_PROBABILITY_FLOOR = 1e-15


class _HashedTextModel:
    """What both small text models share: hashed n-gram counts of the word ids, prediction and evaluation."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    num_features: int

    def predict_log_proba(self, x: np.ndarray) -> np.ndarray:
        """Return log class probabilities of the texts ``x`` (each model's own)."""
        raise NotImplementedError

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Return the predicted class of every text (hashed word ids) in ``x``."""
        return self.predict_log_proba(x).argmax(axis=1).astype(np.int64)

    def evaluate(self, test: Dataset, *, batch_size: int) -> dict[str, float]:
        """Return log loss, accuracy, macro F1 and num_examples on ``test`` (batch_size unused)."""
        check_text_data(self.name, test)
        check_data(self.name, test, input_shape=self.input_shape, num_classes=self.num_classes, purpose="evaluate")
        log_proba = self.predict_log_proba(test.x)
        return classification_metrics(test.y, log_proba.argmax(axis=1), loss=_log_loss(log_proba, test.y),
                                      num_classes=self.num_classes)

    def _counts(self, x: np.ndarray):
        """Return the hashed n-gram counts (sparse) of the texts ``x``."""
        return ngram_counts(x, num_features=self.num_features, ngram_range=NGRAM_RANGE)


class MultinomialNaiveBayes(_HashedTextModel):
    """Multinomial naive Bayes on hashed n-gram counts; arrays "class_count" (K,) and "feature_count" (K, F)."""

    name = "mnb"
    device = "cpu"

    def __init__(self, *, input_shape: tuple[int, ...], num_classes: int, seed: int, alpha: float = ALPHA,
                 num_features: int = NGRAM_FEATURES) -> None:
        """Start from zero counts (uniform prior, uniform buckets), so get_arrays and predict work before any fit."""
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.seed = seed  # kept for reproducibility records; counting needs no randomness
        self.alpha = alpha
        self.num_features = num_features
        self._class = np.zeros(num_classes, dtype=np.float64)
        self._feature = np.zeros((num_classes, num_features), dtype=np.float64)

    def get_arrays(self) -> dict[str, np.ndarray]:
        """Return copies of the counts (float64; absolute, not shares: see the module docstring)."""
        return {"class_count": self._class.copy(), "feature_count": self._feature.copy()}

    def set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace the counts after checking names and shapes."""
        checked = check_arrays(self.name, self.get_arrays(), arrays)
        self._class, self._feature = (np.array(checked[k], dtype=np.float64) for k in ("class_count", "feature_count"))

    def fit(
        self, train: Dataset, *, epochs: int, batch_size: int, learning_rate: float, seed: int,
        optimizer: str = "adam", weight_decay: float | None = None,
    ) -> dict[str, float]:
        """Replace the counts with this node's (closed form: epochs, batch and step are unused; no weights to decay)."""
        check_fit_args(self.name, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                       optimizer=optimizer, weight_decay=weight_decay, has_weights=False)
        check_text_data(self.name, train)
        check_data(self.name, train, input_shape=self.input_shape, num_classes=self.num_classes, purpose="fit")
        wall, cpu = time.perf_counter(), time.process_time()
        counts = self._counts(train.x)
        onehot = np.zeros((len(train), self.num_classes))
        onehot[np.arange(len(train)), train.y] = 1.0
        self._class = onehot.sum(axis=0)
        self._feature = np.asarray(counts.T @ onehot).T.copy()  # (K, F): every class's bucket counts
        return {
            "train_loss": _log_loss(self._joint_to_log_proba(counts), train.y),
            "train_seconds": time.perf_counter() - wall,
            "train_cpu_seconds": time.process_time() - cpu,
            "num_examples": len(train),
        }

    def parameters(self) -> dict[str, np.ndarray]:
        """Return MultinomialNB's fitted attributes: class_log_prior_ and feature_log_prob_ (smoothed with alpha)."""
        total = self._class.sum()
        prior = np.full(self.num_classes, -np.log(self.num_classes))  # before any count: uniform
        if total > 0:
            with np.errstate(divide="ignore"):  # a class no node has: log 0 = -inf, as MultinomialNB has it
                prior = np.log(self._class) - np.log(total)
        smoothed = self._feature + self.alpha
        return {"class_log_prior_": prior,
                "feature_log_prob_": np.log(smoothed) - np.log(smoothed.sum(axis=1, keepdims=True))}

    def predict_log_proba(self, x: np.ndarray) -> np.ndarray:
        """Return log class probabilities as MultinomialNB.predict_log_proba computes them."""
        return self._joint_to_log_proba(self._counts(x))

    def num_parameters(self) -> int:
        """Return the number of counts (one per class, one per class and bucket)."""
        return int(self._class.size + self._feature.size)

    def _joint_to_log_proba(self, counts) -> np.ndarray:
        """Return normalised log probabilities from the joint log-likelihood of sparse ``counts``."""
        p = self.parameters()
        joint = np.asarray(counts @ p["feature_log_prob_"].T) + p["class_log_prior_"]
        return joint - np.logaddexp.reduce(joint, axis=1, keepdims=True)


class TfidfLogisticRegression(_HashedTextModel):
    """Softmax regression on hashed TF-IDF n-grams; arrays "coef" (K, F), "intercept" (K,), "df_share" (F,)."""

    name = "tfidf-logreg"
    device = "cpu"

    def __init__(self, *, input_shape: tuple[int, ...], num_classes: int, seed: int,
                 num_features: int = NGRAM_FEATURES) -> None:
        """Start from zero weights and no document frequencies yet (all zero: the first fit uses its own)."""
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.seed = seed  # kept for reproducibility records; zero init needs no randomness
        self.num_features = num_features
        self._coef = np.zeros((num_classes, num_features), dtype=np.float32)
        self._intercept = np.zeros(num_classes, dtype=np.float32)
        self._df = np.zeros(num_features, dtype=np.float32)

    def get_arrays(self) -> dict[str, np.ndarray]:
        """Return copies of "coef", "intercept" and "df_share" (float32)."""
        return {"coef": self._coef.copy(), "intercept": self._intercept.copy(), "df_share": self._df.copy()}

    def set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace the three arrays after checking names and shapes."""
        checked = check_arrays(self.name, self.get_arrays(), arrays)
        self._coef, self._intercept, self._df = (np.array(checked[k], dtype=np.float32)
                                                 for k in ("coef", "intercept", "df_share"))

    def fit(
        self, train: Dataset, *, epochs: int, batch_size: int, learning_rate: float, seed: int,
        optimizer: str = "adam", weight_decay: float | None = None,
    ) -> dict[str, float]:
        """Run ``epochs`` seeded-shuffled mini-batch passes from the current arrays; then hold this node's df_share.

        ``weight_decay`` (None: 0) adds ``weight_decay * coef`` to every gradient, as torch's does.
        """
        check_fit_args(self.name, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                       optimizer=optimizer, weight_decay=weight_decay)
        decay = float(weight_decay or 0.0)
        check_text_data(self.name, train)
        check_data(self.name, train, input_shape=self.input_shape, num_classes=self.num_classes, purpose="fit")
        wall, cpu = time.perf_counter(), time.process_time()
        counts = self._counts(train.x)
        own_df = (np.bincount(counts.indices, minlength=self.num_features) / len(train)).astype(np.float32)
        x = _tfidf(counts, self._df if self._df.any() else own_df)
        weights = np.concatenate([self._coef, self._intercept[:, None]], axis=1).astype(np.float64).T  # (F + 1, K)
        step = _Optimizer(optimizer, weights.shape, learning_rate=learning_rate)
        penalty = np.ones((len(weights), 1))
        penalty[-1] = 0.0  # the intercept is not decayed
        onehot = np.eye(self.num_classes)[train.y]
        rng = np.random.default_rng(seed)
        loss_sum = 0.0
        for _ in range(epochs):
            loss_sum = 0.0
            for batch in np.array_split(rng.permutation(len(train)), max(1, -(-len(train) // batch_size))):
                rows = x[batch]
                log_proba = _log_softmax(rows @ weights[:-1] + weights[-1])
                loss_sum -= float((log_proba * onehot[batch]).sum())
                residual = (np.exp(log_proba) - onehot[batch]) / len(batch)
                gradient = np.vstack([np.asarray(rows.T @ residual), residual.sum(axis=0)])
                step.apply(weights, gradient + decay * penalty * weights)
        self._coef = np.ascontiguousarray(weights[:-1].T, dtype=np.float32)
        self._intercept = weights[-1].astype(np.float32)
        self._df = own_df  # what this node adds to the federation's document frequencies
        return {
            "train_loss": loss_sum / len(train),
            "train_seconds": time.perf_counter() - wall,
            "train_cpu_seconds": time.process_time() - cpu,
            "num_examples": len(train),
        }

    def predict_log_proba(self, x: np.ndarray) -> np.ndarray:
        """Return log softmax probabilities, weighing the n-grams with the IDF of the model's df_share."""
        features = _tfidf(self._counts(x), self._df)
        return _log_softmax(np.asarray(features @ self._coef.T.astype(np.float64)) + self._intercept)

    def num_parameters(self) -> int:
        """Return the number of trained scalars (coefficients and intercepts; df_share is a statistic)."""
        return int(self._coef.size + self._intercept.size)

class _Optimizer:
    """Adam (torch's defaults) or SGD with momentum over one dense float64 array, updated in place."""

    def __init__(self, name: str, shape: tuple[int, ...], *, learning_rate: float) -> None:
        """Start with zero moments."""
        self.name, self.learning_rate, self.steps = name, learning_rate, 0
        self.first = np.zeros(shape)
        self.second = np.zeros(shape) if name == "adam" else None

    def apply(self, weights: np.ndarray, gradient: np.ndarray) -> None:
        """Take one step down ``gradient``."""
        self.steps += 1
        if self.second is None:  # SGD with momentum, as torch.optim.SGD
            self.first = _SGD_MOMENTUM * self.first + gradient if self.steps > 1 else gradient.copy()
            weights -= self.learning_rate * self.first
            return
        beta1, beta2, epsilon = _ADAM
        self.first = beta1 * self.first + (1 - beta1) * gradient
        self.second = beta2 * self.second + (1 - beta2) * np.square(gradient)
        first = self.first / (1 - beta1**self.steps)
        second = self.second / (1 - beta2**self.steps)
        weights -= self.learning_rate * first / (np.sqrt(second) + epsilon)


def _tfidf(counts, df_share: np.ndarray):
    """Return sparse ``counts`` weighed by the IDF of ``df_share`` and l2-normalised per row (a new CSR matrix)."""
    idf = 1.0 + np.log((1.0 + IDF_SMOOTHING) / (df_share.astype(np.float64) + IDF_SMOOTHING))
    weighed = counts.copy()
    weighed.data *= idf[weighed.indices]
    rows = np.repeat(np.arange(weighed.shape[0]), np.diff(weighed.indptr))  # the row of every stored value
    norms = np.sqrt(np.bincount(rows, weights=np.square(weighed.data), minlength=weighed.shape[0]))
    weighed.data /= norms[rows]  # an empty row (no word) stores nothing and stays zero
    return weighed


def _log_softmax(scores: np.ndarray) -> np.ndarray:
    """Return the log softmax of every row of ``scores``."""
    return scores - np.logaddexp.reduce(scores, axis=1, keepdims=True)


def _log_loss(log_proba: np.ndarray, y: np.ndarray) -> float:
    """Return the mean negative log-likelihood of labels ``y``."""
    picked = log_proba[np.arange(len(y)), y]
    return float(-np.mean(np.maximum(picked, np.log(_PROBABILITY_FLOOR))))
