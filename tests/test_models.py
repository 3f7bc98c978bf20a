"""Tests for clients.models: the uniform interface, warm starts and import hygiene."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clients.data import Dataset, load_dataset, split_central
from clients.models import LARGE_MODELS, SMALL_MODELS, TEXT_MODELS, Model, build_model, resolve_large_model

REPO = Path(__file__).resolve().parents[1]
FIT = dict(batch_size=32, seed=0)
LEARNING_RATE = {"cnn": 1e-3, "cnn-dp": 3e-3, "mlp": 1e-3, "logreg": 1e-2, "torch-logreg": 3e-3, "gnb": 1e-2}


@pytest.fixture(scope="module")
def mnist() -> tuple[Dataset, Dataset]:
    """Return 400 stratified MNIST training images and 300 test images."""
    ds = load_dataset("mnist")
    rest, test = split_central(ds, test_fraction=0.06, seed=0)
    _, train = split_central(rest, test_fraction=0.085, seed=0)
    return train, test


def build(name: str, data: Dataset, seed: int = 0) -> Model:
    """Build zoo model ``name`` for ``data`` on the CPU."""
    return build_model(name, input_shape=data.input_shape, num_classes=data.num_classes, seed=seed, device="cpu")


def test_cnn_has_at_least_a_million_parameters(mnist: tuple[Dataset, Dataset]) -> None:
    assert build("cnn", mnist[0]).num_parameters() >= 1_000_000


def test_cnn_dp_is_compact_and_opacus_trains_it_as_it_is(mnist: tuple[Dataset, Dataset]) -> None:
    from privacy.sample_level import make_compatible

    model = build("cnn-dp", mnist[0])
    assert 20_000 < model.num_parameters() < 30_000  # Papernot et al.'s MNIST network: 26,010
    assert build("cnn", mnist[0]).num_parameters() > 40 * model.num_parameters()
    assert make_compatible(model.network)[1] == [], "no layer needs replacing for DP-SGD"
    private = build_model("cnn-dp", input_shape=(1, 28, 28), num_classes=10, seed=0, device="cpu", private=True)
    assert private.dp_fixes == []
    with pytest.raises(ValueError, match="at least 10x10 pixels.*'mlp'"):
        build_model("cnn-dp", input_shape=(1, 8, 8), num_classes=10, seed=0, device="cpu")
    with pytest.raises(ValueError, match="'cnn-dp' needs image data.*use 'mlp' or 'auto'"):
        resolve_large_model("cnn-dp", "tabular")


@pytest.mark.parametrize("name", [m for m in LARGE_MODELS + SMALL_MODELS if m not in TEXT_MODELS])  # text: test_text
def test_array_round_trip_preserves_names_shapes_dtypes_and_predictions(
    name: str, mnist: tuple[Dataset, Dataset]
) -> None:
    train, test = mnist
    source = build(name, train, seed=0)
    source.fit(train, epochs=1, learning_rate=LEARNING_RATE[name], **FIT)  # logreg starts at zeros
    target = build(name, train, seed=1)

    target.set_arrays(source.get_arrays())

    sent, received = source.get_arrays(), target.get_arrays()
    assert list(sent) == list(received)
    assert all(sent[k].shape == received[k].shape and sent[k].dtype == received[k].dtype for k in sent)
    assert all(np.array_equal(sent[k], received[k]) for k in sent)
    assert np.array_equal(source.predict(test.x), target.predict(test.x))


@pytest.mark.parametrize("name", ["cnn", "logreg"])
def test_set_arrays_names_the_first_mismatch(name: str, mnist: tuple[Dataset, Dataset]) -> None:
    model = build(name, mnist[0])
    arrays = model.get_arrays()
    first = next(iter(arrays))

    wrong_shape = {**arrays, first: np.zeros((3, 3), np.float32)}
    with pytest.raises(ValueError, match=rf"array '{first}' has shape \(3, 3\), expected"):
        model.set_arrays(wrong_shape)
    with pytest.raises(ValueError, match=rf"array '{first}' is missing"):
        model.set_arrays({k: v for k, v in arrays.items() if k != first})
    with pytest.raises(ValueError, match="unexpected array 'extra'"):
        model.set_arrays({**arrays, "extra": np.zeros(1)})


def test_torch_arrays_use_state_dict_names(mnist: tuple[Dataset, Dataset]) -> None:
    assert list(build("cnn", mnist[0]).get_arrays())[:2] == ["conv1.weight", "conv1.bias"]
    assert list(build("logreg", mnist[0]).get_arrays()) == ["coef", "intercept"]


@pytest.mark.parametrize(
    ("name", "epochs", "threshold"),
    # measured: 0.85, 0.89, 0.80, 0.82, 0.80
    [("cnn", 4, 0.75), ("cnn-dp", 4, 0.75), ("logreg", 3, 0.7), ("torch-logreg", 3, 0.7), ("mlp", 3, 0.7)],
)
def test_fit_on_a_few_hundred_images_beats_untrained(
    name: str, epochs: int, threshold: float, mnist: tuple[Dataset, Dataset]
) -> None:
    train, test = mnist
    model = build(name, train)
    before = model.evaluate(test, batch_size=128)

    fitted = model.fit(train, epochs=epochs, learning_rate=LEARNING_RATE[name], **FIT)
    after = model.evaluate(test, batch_size=128)

    assert before["accuracy"] < 0.3 and after["accuracy"] >= threshold
    assert after["loss"] < before["loss"]
    assert set(fitted) == {"train_loss", "train_seconds", "train_cpu_seconds", "num_examples"}
    assert fitted["num_examples"] == len(train) and fitted["train_seconds"] > 0
    assert set(after) == {"loss", "accuracy", "macro_f1", "num_examples"} and after["num_examples"] == len(test)


def test_torch_fit_is_deterministic_and_leaves_the_global_rng_alone(mnist: tuple[Dataset, Dataset]) -> None:
    import torch

    train = mnist[0]
    state = torch.random.get_rng_state()
    first, second = build("mlp", train), build("mlp", train)

    first.fit(train, epochs=1, learning_rate=1e-3, **FIT)
    second.fit(train, epochs=1, learning_rate=1e-3, **FIT)

    assert all(np.array_equal(a, b) for a, b in zip(first.get_arrays().values(), second.get_arrays().values()))
    assert torch.equal(state, torch.random.get_rng_state())


def test_logreg_fit_continues_from_the_arrays_it_was_given(mnist: tuple[Dataset, Dataset]) -> None:
    train, test = mnist
    trained = build("logreg", train)
    trained.fit(train, epochs=3, learning_rate=1e-2, **FIT)
    resumed, fresh = build("logreg", train), build("logreg", train)
    resumed.set_arrays(trained.get_arrays())

    resumed.fit(train, epochs=1, learning_rate=1e-6, **FIT)  # a tiny step: stays where it started
    fresh.fit(train, epochs=1, learning_rate=1e-6, **FIT)

    start = trained.get_arrays()["coef"]
    assert np.allclose(resumed.get_arrays()["coef"], start, atol=1e-3)
    assert np.abs(start).max() > 0.05 and np.abs(fresh.get_arrays()["coef"]).max() < 1e-3
    assert resumed.evaluate(test, batch_size=128)["accuracy"] == pytest.approx(
        trained.evaluate(test, batch_size=128)["accuracy"], abs=0.02
    )


def test_logreg_fit_from_the_same_arrays_and_seed_is_identical(mnist: tuple[Dataset, Dataset]) -> None:
    """What a resumed arm relies on: the round after a checkpoint replays to the same bytes."""
    train = mnist[0]
    checkpoint = build("logreg", train)
    checkpoint.fit(train, epochs=1, learning_rate=1e-2, **FIT)
    replayed = []
    for _ in range(2):
        model = build("logreg", train)
        model.set_arrays(checkpoint.get_arrays())
        model.fit(train, epochs=1, learning_rate=1e-2, **FIT)
        replayed.append(model.get_arrays())

    assert all(np.array_equal(replayed[0][k], replayed[1][k]) for k in replayed[0])
    assert not np.array_equal(replayed[0]["coef"], checkpoint.get_arrays()["coef"])


def test_logreg_on_a_node_missing_classes_keeps_full_shape(mnist: tuple[Dataset, Dataset]) -> None:
    train = mnist[0]
    three_classes = train.subset(np.flatnonzero(train.y < 3))
    model = build("logreg", train)

    model.fit(three_classes, epochs=1, learning_rate=1e-2, **FIT)

    arrays = model.get_arrays()
    assert arrays["coef"].shape == (10, 784) and arrays["intercept"].shape == (10,)
    assert set(np.unique(model.predict(three_classes.x))) <= {0, 1, 2}


def test_logreg_binary_uses_sklearn_binary_shape() -> None:
    pool, test = split_central(load_dataset("breast-cancer"), test_fraction=0.2, seed=0)
    model = build("logreg", pool)

    model.fit(pool, epochs=3, learning_rate=1e-2, **FIT)

    assert model.get_arrays()["coef"].shape == (1, 30)
    assert model.evaluate(test, batch_size=64)["accuracy"] > 0.9


def test_sgd_optimizer_trains_differently_from_adam_and_unknown_names_fail(mnist: tuple[Dataset, Dataset]) -> None:
    train, test = mnist
    adam, sgd = build("mlp", train), build("mlp", train)

    adam.fit(train, epochs=2, learning_rate=1e-3, **FIT)
    sgd.fit(train, epochs=2, learning_rate=0.05, optimizer="sgd", **FIT)

    assert not np.array_equal(adam.get_arrays()["fc1.weight"], sgd.get_arrays()["fc1.weight"])
    assert sgd.evaluate(test, batch_size=128)["accuracy"] > 0.6
    for name in ("mlp", "logreg"):
        with pytest.raises(ValueError, match="optimizer must be one of adam, sgd, got 'rmsprop'"):
            build(name, train).fit(train, epochs=1, learning_rate=0.01, optimizer="rmsprop", **FIT)


def test_macro_f1_counts_every_class(mnist: tuple[Dataset, Dataset]) -> None:
    test = mnist[1]
    only_zeros = test.subset(np.flatnonzero(test.y == 0))

    metrics = build("logreg", test).evaluate(only_zeros, batch_size=64)  # zero arrays predict class 0

    assert metrics["accuracy"] == 1.0 and metrics["macro_f1"] == pytest.approx(0.1)


def test_builder_errors_teach_the_fix(mnist: tuple[Dataset, Dataset]) -> None:
    with pytest.raises(ValueError, match="use the model 'mlp' for tabular data"):
        build_model("cnn", input_shape=(64,), num_classes=10, seed=0, device="cpu")
    with pytest.raises(ValueError, match="unknown model 'resnet'.*cnn, cnn-dp, mlp, transformer, bilstm, logreg, "
                                         "torch-logreg"):
        build_model("resnet", input_shape=(64,), num_classes=10, seed=0)
    with pytest.raises(ValueError, match="CPU only"):
        build_model("logreg", input_shape=(64,), num_classes=10, seed=0, device="cuda")
    with pytest.raises(ValueError, match="cannot evaluate on 0 examples"):
        build("logreg", mnist[0]).evaluate(mnist[0].subset(np.array([], np.int64)), batch_size=8)


def test_resolve_large_model_picks_by_data_kind() -> None:
    assert resolve_large_model("auto", "image") == "cnn"
    assert resolve_large_model("auto", "tabular") == "mlp"
    assert resolve_large_model("mlp", "image") == "mlp"
    with pytest.raises(ValueError, match="use 'mlp' or 'auto'"):
        resolve_large_model("cnn", "tabular")


def test_data_and_models_import_no_torch_flower_prefect_or_minio() -> None:
    code = (
        "import sys, clients.data, clients.models\n"
        "from clients.data import load_dataset\n"
        "ds = load_dataset('digits')\n"
        "m = clients.models.build_model('logreg', input_shape=ds.input_shape, num_classes=10, seed=0)\n"
        "m.fit(ds, epochs=1, batch_size=32, learning_rate=0.01, seed=0); m.evaluate(ds, batch_size=32)\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'torch', 'flwr', 'prefect', 'minio'}))\n"
    )

    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "[]"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU: the mixed-precision path runs only on CUDA")
def test_cuda_training_runs_under_bfloat16_autocast(mnist: tuple[Dataset, Dataset]) -> None:
    train, test = mnist
    model = build_model("cnn", input_shape=train.input_shape, num_classes=10, seed=0, device="auto")

    model.fit(train, epochs=4, learning_rate=1e-3, **FIT)

    assert model.device.startswith("cuda")
    assert all(a.dtype == np.float32 for a in model.get_arrays().values())
    assert model.evaluate(test, batch_size=128)["accuracy"] >= 0.75


def test_cuda_request_without_a_gpu_fails_clearly() -> None:
    if _cuda_available():
        model = build_model("torch-logreg", input_shape=(4,), num_classes=2, seed=0, device="cuda")
        assert model.device.startswith("cuda")
    else:
        with pytest.raises(ValueError, match="no CUDA GPU.*device='auto' or 'cpu'"):
            build_model("cnn", input_shape=(1, 28, 28), num_classes=10, seed=0, device="cuda")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_macro_f1_equals_scikit_learn(seed: int) -> None:
    from sklearn.metrics import f1_score

    from clients._model_checks import classification_metrics

    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 7, size=200)  # classes 7..9 absent, some predicted anyway
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 10, size=200))
    metrics = classification_metrics(y_true, y_pred, loss=0.5, num_classes=10)
    expected = f1_score(y_true, y_pred, average="macro", labels=list(range(10)), zero_division=0)
    assert metrics["macro_f1"] == pytest.approx(expected, abs=1e-12)
    assert metrics["accuracy"] == pytest.approx(float(np.mean(y_true == y_pred)))


def test_federated_gaussian_naive_bayes_is_the_pooled_one_after_flowers_fedavg() -> None:
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
    from sklearn.naive_bayes import GaussianNB

    from clients.data import central_test, node_data, pooled_train
    from clients.export import export_fp32, onnx_probabilities

    # Arrange: 4 dirichlet nodes of digits, each fits its own statistics
    digits = load_dataset("digits")
    split = {"num_partitions": 4, "scheme": "dirichlet", "seed": 1, "alpha": 0.5, "classes_per_node": 2,
             "central_test_fraction": 0.2, "local_test_fraction": 0.15}
    replies = []
    for node in range(4):
        train, _ = node_data(digits, partition_id=node, **split)
        model = build_model("gnb", input_shape=(64,), num_classes=10, seed=0)
        model.fit(train, epochs=1, batch_size=32, learning_rate=0.01, seed=0)
        arrays = ArrayRecord({k: Array(v) for k, v in model.get_arrays().items()})
        replies.append(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": len(train)})}))
    # Act: Flower's own FedAvg weighting, then the global model
    merged = aggregate_arrayrecords(replies, "num-examples")
    federated = build_model("gnb", input_shape=(64,), num_classes=10, seed=0)
    federated.set_arrays({k: v.numpy() for k, v in merged.items()})
    pooled = pooled_train(digits, **split)
    central = GaussianNB().fit(pooled.x.astype(np.float64), pooled.y)
    test = central_test(digits, central_test_fraction=0.2, seed=1)

    # Assert: the same counts give the same model as scikit-learn on the pooled data
    params = federated.parameters()
    assert np.allclose(params["theta_"], central.theta_) and np.allclose(params["var_"], central.var_, rtol=1e-6)
    assert np.allclose(params["class_prior_"], central.class_prior_)
    assert (federated.predict(test.x) == central.predict(test.x.astype(np.float64))).all()
    assert federated.evaluate(test, batch_size=64)["accuracy"] > 0.75
    onnx = export_fp32(federated, dataset_name="digits")
    raw = (test.x * 16.0).astype(np.float32)
    assert (onnx_probabilities(onnx.onnx, raw).argmax(axis=1) == central.predict(test.x.astype(np.float64))).mean() > 0.99
