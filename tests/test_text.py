"""Tests for the text task layer: the rotten-tomatoes loader, word hashing and the four text models.

The dataset file comes from `make setup` (clients/_rotten_tomatoes.py); without it these
tests fail with the one line that says how to install it, they do not skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from clients.data import Dataset, central_test, load_dataset, node_data, pooled_train, split_central
from clients.models import (
    LARGE_MODELS, SMALL_MODELS, TEXT_MODELS, Model, build_model, resolve_large_model, restore_sums, summed_arrays,
    to_shares,
)
from clients.text import TOKEN_SPACE, fold_ids, ngram_counts, token_ids, tokenize, word_id

REPO = Path(__file__).resolve().parents[1]
# per-model settings of one epoch on 2,050 reviews; measured held-out accuracy 0.68, 0.69, 0.67, 0.71 (majority: 0.58)
LEARNING_RATE = {"transformer": 1e-3, "bilstm": 1e-2, "mnb": 1e-2, "tfidf-logreg": 5e-2}
BY_MOVIE = {"num_partitions": 4, "scheme": "by-column", "seed": 0, "alpha": 0.5, "classes_per_node": 2,
            "central_test_fraction": 0.2, "local_test_fraction": 0.1}


@pytest.fixture(scope="module")
def reviews() -> Dataset:
    """Return the whole rotten-tomatoes dataset (fails with the install hint when its file is missing)."""
    return load_dataset("rotten-tomatoes")


@pytest.fixture(scope="module")
def small(reviews: Dataset) -> tuple[Dataset, Dataset]:
    """Return 2,050 stratified training reviews and 2,562 held-out ones."""
    rest, test = split_central(reviews, test_fraction=0.2, seed=0)
    _, train = split_central(rest, test_fraction=0.2, seed=0)
    return train, test


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(name: str, data: Dataset, seed: int = 0) -> Model:
    """Build zoo model ``name`` for ``data`` on the CPU."""
    return build_model(name, input_shape=data.input_shape, num_classes=data.num_classes, seed=seed, device="cpu")


def test_rotten_tomatoes_holds_12808_labelled_reviews_of_508_movies(reviews: Dataset) -> None:
    assert reviews.name == "rotten-tomatoes" and reviews.kind == "text" and reviews.num_classes == 2
    assert reviews.x.shape == (12_808, 64) and reviews.x.dtype == np.int64 and reviews.input_shape == (64,)
    assert np.bincount(reviews.y).tolist() == [5_405, 7_403]  # rotten 0, fresh 1; the 1,097 plot rows dropped
    assert reviews.groups is not None and len(np.unique(reviews.groups)) == 508
    assert 0 <= reviews.x.min() and reviews.x.max() < TOKEN_SPACE
    words = (reviews.x > 0).sum(axis=1)
    assert words.min() >= 1 and words.max() <= 53  # no review is cut: the longest has 53 words
    assert all((row[n:] == 0).all() for row, n in zip(reviews.x, words))  # left-aligned, padding after


def test_missing_file_names_the_command_that_installs_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDCOMPARE_DATA_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=r"rotten_tomatoes_corpus_full\.csv\.bz2.*missing.*make setup"):
        load_dataset("rotten-tomatoes")
    with pytest.raises(ValueError, match="partitioned by 'movie_name' only"):
        load_dataset("rotten-tomatoes", partition_by="critic")


def test_partition_by_movie_keeps_every_movie_on_one_of_4_nodes(reviews: Dataset) -> None:
    assert load_dataset("rotten-tomatoes", partition_by="movie_name").groups is not None
    nodes = [node_data(reviews, partition_id=i, **BY_MOVIE)[0] for i in range(4)]
    movies, sizes = [set(node.groups) for node in nodes], [len(node) for node in nodes]
    assert all(not movies[i] & movies[j] for i in range(4) for j in range(i + 1, 4))
    assert min(sizes) > 0.9 * max(sizes)  # largest movies first, each onto the smallest node


def test_word_ids_are_crc32_in_every_process_and_never_padding() -> None:
    assert tokenize("Don't MISS it -- a 10/10 café!") == ["don't", "miss", "it", "a", "10", "10", "café"]
    assert word_id("fresh") == 1 + 0x1801D773 % (TOKEN_SPACE - 1) == 1 + zlib.crc32(b"fresh") % (TOKEN_SPACE - 1)
    texts = ["A three-hour cinema master class.", "", "rotten rotten rotten"]
    here = token_ids(texts, max_length=8)
    code = ("import sys; from clients.text import token_ids; "
            f"sys.stdout.write(token_ids({texts!r}, max_length=8).tobytes().hex())")
    for seed in ("1", "2"):  # Python's str hash differs per seed; CRC-32 does not
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                             check=True)
        assert out.stdout == here.tobytes().hex()
    assert (here[0, :6] > 0).all() and (here[0, 6:] == 0).all() and (here[1] == 0).all()
    ids = np.arange(1, 200_000, dtype=np.int64)
    folded = fold_ids(ids, 2**15)
    assert (folded > 0).all() and (folded < 2**15).all() and fold_ids(np.zeros(1), 8)[0] == 0


def test_ngram_counts_count_words_and_pairs_and_ignore_padding() -> None:
    ids = token_ids(["good good movie", "movie good"], max_length=5)
    counts = ngram_counts(ids)
    assert counts.shape == (2, 2**18) and counts[0].sum() == 3 + 2 and counts[1].sum() == 2 + 1
    assert counts[0].max() == 2  # "good" twice
    longer = ngram_counts(token_ids(["good good movie", "movie good"], max_length=40))
    assert (counts != longer).nnz == 0  # more padding, the same counts
    assert (ngram_counts(ids, ngram_range=(1, 1))[0] != ngram_counts(ids, ngram_range=(1, 1))[1]).nnz > 0


def test_dataset_holds_text_as_int64_token_ids() -> None:
    ds = Dataset(x=token_ids(["a b", "c"], max_length=4), y=np.array([0, 1]), num_classes=2, name="t")
    assert ds.kind == "text" and ds.input_shape == (4,) and not ds.raw and ds.subset(np.array([1])).kind == "text"
    with pytest.raises(ValueError, match="hashed token ids"):
        Dataset(x=np.zeros((2, 2, 2), np.int64), y=np.array([0, 1]), num_classes=2, name="t")


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_one_epoch_on_2000_reviews_beats_the_majority_class(name: str, small: tuple[Dataset, Dataset]) -> None:
    train, test = small
    majority = np.bincount(test.y).max() / len(test)
    model = build(name, train)

    fitted = model.fit(train, epochs=1, batch_size=32, learning_rate=LEARNING_RATE[name], seed=0)
    after = model.evaluate(test, batch_size=256)

    assert after["accuracy"] >= majority + 0.04, (name, after["accuracy"], majority)
    assert set(fitted) == {"train_loss", "train_seconds", "train_cpu_seconds", "num_examples"}
    assert np.isfinite(after["loss"]) and fitted["num_examples"] == len(train)
    assert (model.predict(test.x[:300]) == model.predict(test.x)[:300]).all()


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_array_round_trip_gives_the_same_predictions(name: str, small: tuple[Dataset, Dataset]) -> None:
    train, test = small
    source = build(name, train, seed=0)
    source.fit(train.subset(np.arange(300)), epochs=1, batch_size=32, learning_rate=LEARNING_RATE[name], seed=0)
    target = build(name, train, seed=1)

    target.set_arrays(source.get_arrays())

    sent, received = source.get_arrays(), target.get_arrays()
    assert list(sent) == list(received) and all(np.array_equal(sent[k], received[k]) for k in sent)
    assert all(sent[k].dtype == received[k].dtype for k in sent)
    assert np.array_equal(source.predict(test.x), target.predict(test.x))


def test_federated_naive_bayes_by_movie_is_the_pooled_one(reviews: Dataset) -> None:
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
    from sklearn.naive_bayes import MultinomialNB

    # Arrange: 4 nodes of whole movies; each counts its own reviews and sends the counts as shares
    names = summed_arrays("mnb")
    replies, total = [], 0
    for node in range(4):
        train, _ = node_data(reviews, partition_id=node, **BY_MOVIE)
        model = build("mnb", train)
        model.fit(train, epochs=1, batch_size=32, learning_rate=0.01, seed=0)
        shares = to_shares(model.get_arrays(), len(train), names)
        arrays = ArrayRecord({k: Array(v) for k, v in shares.items()})
        replies.append(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": len(train)})}))
        total += len(train)
    # Act: Flower's FedAvg weighting, the sums restored, the global model
    merged = aggregate_arrayrecords(replies, "num-examples")
    federated = build("mnb", reviews)
    federated.set_arrays(restore_sums({k: v.numpy() for k, v in merged.items()}, total, names))
    pooled = pooled_train(reviews, **BY_MOVIE)
    central = MultinomialNB(alpha=1.0).fit(ngram_counts(pooled.x), pooled.y)
    test = central_test(reviews, central_test_fraction=0.2, seed=0)

    # Assert: the same counts give scikit-learn's model of the pooled data
    assert names == ("class_count", "feature_count") and summed_arrays("logreg") == ()
    assert np.allclose(federated.get_arrays()["feature_count"], central.feature_count_)
    assert np.allclose(federated.get_arrays()["class_count"], central.class_count_)
    assert np.array_equal(federated.predict(test.x), central.predict(ngram_counts(test.x)))
    assert np.allclose(federated.predict_log_proba(test.x), central.predict_log_proba(ngram_counts(test.x)))
    assert federated.evaluate(test, batch_size=256)["accuracy"] > 0.7
    with pytest.raises(ValueError, match="no array 'class_count'"):
        restore_sums({"coef": np.zeros(2)}, total, names)


def test_tfidf_document_frequencies_average_to_the_pooled_ones(reviews: Dataset) -> None:
    nodes = [node_data(reviews, partition_id=i, **BY_MOVIE)[0] for i in range(4)]
    shares = []
    for train in nodes:
        model = build("tfidf-logreg", train)
        model.fit(train, epochs=1, batch_size=64, learning_rate=0.05, seed=0)
        shares.append(model.get_arrays()["df_share"])

    mean = sum(len(t) * s.astype(np.float64) for t, s in zip(nodes, shares)) / sum(len(t) for t in nodes)

    pooled = pooled_train(reviews, **BY_MOVIE)
    assert np.allclose(mean, (ngram_counts(pooled.x) > 0).sum(axis=0).A1 / len(pooled), atol=1e-7)


def test_text_models_refuse_other_data_and_weights_they_lack(small: tuple[Dataset, Dataset]) -> None:
    digits = load_dataset("digits")
    assert set(TEXT_MODELS) <= set(LARGE_MODELS + SMALL_MODELS)
    assert resolve_large_model("auto", "text") == "transformer" and resolve_large_model("bilstm", "text") == "bilstm"
    with pytest.raises(ValueError, match="'mlp' does not read text data; use transformer, bilstm"):
        resolve_large_model("mlp", "text")
    model = build_model("mnb", input_shape=(64,), num_classes=10, seed=0)
    with pytest.raises(ValueError, match="reads hashed word ids.*'digits' of kind 'tabular'"):
        model.fit(digits, epochs=1, batch_size=32, learning_rate=0.01, seed=0)
    with pytest.raises(ValueError, match="no weights to decay"):
        build("mnb", small[0]).fit(small[0], epochs=1, batch_size=32, learning_rate=0.01, seed=0, weight_decay=0.1)
    plain, decayed = build("tfidf-logreg", small[0]), build("tfidf-logreg", small[0])
    plain.fit(small[0], epochs=1, batch_size=32, learning_rate=0.05, seed=0)
    decayed.fit(small[0], epochs=1, batch_size=32, learning_rate=0.05, seed=0, weight_decay=0.1)
    assert np.linalg.norm(decayed.get_arrays()["coef"]) < 0.8 * np.linalg.norm(plain.get_arrays()["coef"])


def test_small_text_models_import_neither_torch_nor_scikit_learn_flower_prefect_or_minio() -> None:
    code = (
        "import sys\n"
        "from clients.data import load_dataset\n"
        "from clients.models import build_model\n"
        "ds = load_dataset('rotten-tomatoes').subset(list(range(500)))\n"
        "for name in ('mnb', 'tfidf-logreg'):\n"
        "    m = build_model(name, input_shape=ds.input_shape, num_classes=2, seed=0)\n"
        "    m.fit(ds, epochs=1, batch_size=32, learning_rate=0.05, seed=0); m.evaluate(ds, batch_size=32)\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'torch', 'sklearn', 'flwr', 'prefect', 'minio'}))\n"
    )

    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "[]"
