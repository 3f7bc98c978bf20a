"""Distillation task layer (clients.distill): soft labels and students trained on them, on digits with an mlp teacher."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clients.data import Dataset, load_dataset, split_central
from clients.distill import fit_distilled, soft_labels
from clients.models import Model, build_model

REPO = Path(__file__).resolve().parents[1]
LEARNING_RATE = {"torch-logreg": 3e-3, "mlp": 1e-3, "logreg": 1e-2, "gnb": 1e-2}
STUDENTS = ("torch-logreg", "mlp", "logreg", "gnb")
FIT = dict(epochs=3, batch_size=32, seed=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    """Return digits split into 1,257 training and 540 test examples."""
    return split_central(load_dataset("digits"), test_fraction=0.3, seed=0)


@pytest.fixture(scope="module")
def teacher(digits: tuple[Dataset, Dataset]) -> Model:
    """Return the torch mlp trained briefly on the digits training set (about 0.95 test accuracy)."""
    model = build("mlp", digits[0])
    model.fit(digits[0], epochs=4, batch_size=32, learning_rate=3e-3, seed=0)
    return model


def build(name: str, data: Dataset) -> Model:
    """Build zoo model ``name`` for ``data`` on the CPU, seed 0."""
    return build_model(name, input_shape=data.input_shape, num_classes=data.num_classes, seed=0, device="cpu")


def entropy(probabilities: np.ndarray) -> float:
    """Return the mean entropy of probability rows, in nats."""
    return float(-np.mean(np.sum(probabilities * np.log(np.maximum(probabilities, 1e-30)), axis=1)))


def test_soft_labels_are_probability_rows_that_flatten_as_temperature_rises_and_keep_the_argmax(digits, teacher):
    from clients.export import framework_probabilities

    train, _ = digits

    labels = {t: soft_labels(teacher, train.x, t) for t in (0.5, 1.0, 2.0, 4.0)}

    for probabilities in labels.values():
        assert probabilities.shape == (len(train), 10) and probabilities.dtype == np.float32
        assert probabilities.min() >= 0 and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        assert np.array_equal(probabilities.argmax(axis=1), teacher.predict(train.x))
    entropies = [entropy(labels[t]) for t in (0.5, 1.0, 2.0, 4.0)]
    assert entropies == sorted(entropies) and entropies[-1] > 4 * entropies[1] > 0, entropies
    np.testing.assert_allclose(labels[1.0], framework_probabilities(teacher, train.x), atol=1e-6)


@pytest.mark.parametrize("name", ["logreg", "gnb"])
def test_a_scikit_learn_teacher_gives_its_own_probabilities_at_temperature_one_and_flatter_ones_above(digits, name):
    train, _ = digits
    model = build(name, train)
    model.fit(train, epochs=2, batch_size=32, learning_rate=1e-2, seed=0)

    at_one, at_three = soft_labels(model, train.x, 1.0), soft_labels(model, train.x, 3.0)

    np.testing.assert_allclose(at_one, np.exp(model._log_proba(train.x)), atol=1e-6)
    assert entropy(at_three) > entropy(at_one)
    assert np.array_equal(at_three.argmax(axis=1), model.predict(train.x))


@pytest.mark.parametrize("name", STUDENTS)
def test_every_student_learns_from_soft_labels_beyond_the_majority_and_keeps_its_plain_arrays(digits, teacher, name):
    train, test = digits
    plain, student = build(name, train), build(name, train)
    plain_metrics = plain.fit(train, learning_rate=LEARNING_RATE[name], **FIT)
    probabilities = soft_labels(teacher, train.x, 2.0)

    metrics = fit_distilled(student, train, probabilities, temperature=2.0, alpha=0.7,
                            learning_rate=LEARNING_RATE[name], **FIT)

    majority = np.bincount(test.y).max() / len(test)
    assert student.evaluate(test, batch_size=256)["accuracy"] > max(0.7, majority + 0.5)
    assert set(metrics) == set(plain_metrics) and metrics["num_examples"] == len(train)
    assert np.isfinite(metrics["train_loss"]) and metrics["train_seconds"] > 0
    described = {k: (v.shape, v.dtype) for k, v in plain.get_arrays().items()}
    assert {k: (v.shape, v.dtype) for k, v in student.get_arrays().items()} == described
    assert list(student.get_arrays()) == list(described)
    assert any(not np.array_equal(v, plain.get_arrays()[k]) for k, v in student.get_arrays().items())


@pytest.mark.parametrize("name", STUDENTS)
@pytest.mark.parametrize("case", ["alpha 0, any teacher", "alpha 1, one-hot teacher at T=1"])
def test_hard_labels_by_either_term_train_exactly_like_plain_fit(digits, teacher, name, case):
    train, _ = digits
    plain, student = build(name, train), build(name, train)
    plain_metrics = plain.fit(train, learning_rate=LEARNING_RATE[name], **FIT)
    if case.startswith("alpha 0"):
        probabilities, temperature, alpha = soft_labels(teacher, train.x, 3.0), 3.0, 0.0
    else:  # KL(one-hot(y) ‖ q) is CE(q, y): a wrong direction, reduction or T² factor would differ
        probabilities, temperature, alpha = np.eye(10, dtype=np.float32)[train.y], 1.0, 1.0

    metrics = fit_distilled(student, train, probabilities, temperature=temperature, alpha=alpha,
                            learning_rate=LEARNING_RATE[name], **FIT)

    for key, value in plain.get_arrays().items():
        np.testing.assert_allclose(student.get_arrays()[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert metrics["train_loss"] == pytest.approx(plain_metrics["train_loss"], rel=1e-5)


@pytest.mark.parametrize("name", STUDENTS)
def test_the_soft_term_steers_the_student_a_teacher_with_shifted_classes_is_what_it_learns(digits, name):
    train, test = digits
    student = build(name, train)
    shifted = np.eye(10, dtype=np.float32)[(train.y + 1) % 10]  # a "teacher" that is sure of the next class
    mixed = 0.9 * shifted + 0.1 / 10  # not one-hot: every class keeps some mass

    fit_distilled(student, train, mixed, temperature=1.0, alpha=1.0, learning_rate=LEARNING_RATE[name], **FIT)

    predicted = student.predict(test.x)
    assert np.mean(predicted == (test.y + 1) % 10) > 0.7
    assert np.mean(predicted == test.y) < 0.1


@pytest.mark.parametrize("name", ["torch-logreg", "logreg"])
def test_weight_decay_shrinks_the_weights_it_is_given(digits, teacher, name):
    train, _ = digits
    probabilities = soft_labels(teacher, train.x, 2.0)
    norms = []
    for weight_decay in (0.0, 0.05):
        student = build(name, train)
        fit_distilled(student, train, probabilities, temperature=2.0, alpha=0.5, learning_rate=LEARNING_RATE[name],
                      weight_decay=weight_decay, **FIT)
        norms.append(float(np.linalg.norm(next(iter(student.get_arrays().values())))))

    assert norms[1] < 0.8 * norms[0], norms


def test_gnb_from_soft_labels_is_scikit_learns_gaussian_nb_fitted_with_the_same_weights(digits, teacher):
    from sklearn.naive_bayes import GaussianNB

    train, _ = digits
    probabilities = soft_labels(teacher, train.x, 2.0)
    alpha = 0.6
    weights = alpha * probabilities.astype(np.float64) + (1 - alpha) * np.eye(10)[train.y]
    student = build("gnb", train)

    fit_distilled(student, train, probabilities, temperature=2.0, alpha=alpha, learning_rate=0.01, **FIT)

    rows = np.repeat(np.arange(len(train)), 10)  # every example once per class, weighted by its target
    reference = GaussianNB().fit(train.x[rows].astype(np.float64), np.tile(np.arange(10), len(train)),
                                 sample_weight=weights.reshape(-1))
    ours = student.parameters()
    np.testing.assert_allclose(ours["class_prior_"], reference.class_prior_, rtol=1e-9)
    np.testing.assert_allclose(ours["theta_"], reference.theta_, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(ours["var_"], reference.var_, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(("change", "message"), [
    ({"temperature": 0.0}, "temperature must be a positive number"),
    ({"alpha": 1.5}, r"alpha \(the soft labels' weight\) must be in \[0, 1\]"),
    ({"teacher_probs": "short"}, r"teacher probabilities have shape \(1256, 10\), expected \(1257, 10\)"),
    ({"teacher_probs": "logits"}, "sum to 1 in every row: pass soft_labels' output, not logits"),
    ({"weight_decay": -1.0}, "weight_decay must be >= 0"),
])
def test_settings_out_of_range_are_refused_in_one_line_naming_the_fix(digits, change, message):
    train, _ = digits
    arguments = dict(temperature=2.0, alpha=0.5, learning_rate=0.01, teacher_probs=np.full((len(train), 10), 0.1),
                     **FIT)
    if change.get("teacher_probs") == "short":
        change = {"teacher_probs": arguments["teacher_probs"][1:]}
    elif change.get("teacher_probs") == "logits":
        change = {"teacher_probs": np.random.default_rng(0).normal(size=(len(train), 10))}
    arguments.update(change)

    with pytest.raises(ValueError, match=message) as raised:
        fit_distilled(build("logreg", train), train, **arguments)
    assert "\n" not in str(raised.value)
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        soft_labels(build("gnb", train), train.x, -1.0)


def test_distilling_a_scikit_learn_student_imports_no_torch_flower_prefect_or_minio():
    code = (
        "import sys\n"
        "from clients.data import load_dataset\n"
        "from clients.distill import fit_distilled, soft_labels\n"
        "from clients.models import build_model\n"
        "ds = load_dataset('digits')\n"
        "teacher = build_model('gnb', input_shape=ds.input_shape, num_classes=10, seed=0)\n"
        "teacher.fit(ds, epochs=1, batch_size=32, learning_rate=0.01, seed=0)\n"
        "student = build_model('logreg', input_shape=ds.input_shape, num_classes=10, seed=0)\n"
        "fit_distilled(student, ds, soft_labels(teacher, ds.x, 2.0), temperature=2.0, alpha=0.5, epochs=1,\n"
        "              batch_size=32, learning_rate=0.01, seed=0)\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'torch', 'flwr', 'prefect', 'minio'}))\n"
    )

    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "[]"
