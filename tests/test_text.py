"""Tests for the text task layer: the rotten-tomatoes loader and word hashing.

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

from clients.data import Dataset, load_dataset, node_data
from clients.text import TOKEN_SPACE, fold_ids, ngram_counts, token_ids, tokenize, word_id

REPO = Path(__file__).resolve().parents[1]
BY_MOVIE = {"num_partitions": 4, "scheme": "by-column", "seed": 0, "alpha": 0.5, "classes_per_node": 2,
            "central_test_fraction": 0.2, "local_test_fraction": 0.1}


@pytest.fixture(scope="module")
def reviews() -> Dataset:
    """Return the whole rotten-tomatoes dataset (fails with the install hint when its file is missing)."""
    return load_dataset("rotten-tomatoes")


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
