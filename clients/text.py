"""Text as numbers without a shared vocabulary: hashed word ids and hashed n-gram counts (numpy; scipy on demand).

Every node turns its own texts into features alone, so no word list is agreed on and no
text leaves a node:

1. ``tokenize`` lowercases a text and cuts it into words (letters and digits, with inner
   apostrophes: "don't" is one word).
2. ``token_ids`` hashes every word with CRC-32 (``zlib.crc32`` of its UTF-8 bytes; not
   Python's ``hash``, which is salted per process) into 1..vocab_size-1 and writes the
   first ``max_length`` of them, left-aligned, into a row of an int64 matrix; 0 pads.
   Text datasets keep this matrix as their ``x`` (``Dataset.kind == "text"``).
3. The models reduce the ids further, each node the same way: the torch models fold
   them into their embedding table (``fold_ids``), the small models hash the ids of
   every word and every run of consecutive words (n-gram) into ``num_features``
   buckets and count them (``ngram_counts``: a sparse matrix, never a dense one —
   12,808 texts x 2^18 buckets would take 27 GB dense, and take 6 MB sparse).

A hash collision merges two words (or n-grams) into one feature; it never touches the
padding id 0.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from scipy.sparse import csr_matrix

__all__ = ["MAX_LENGTH", "NGRAM_FEATURES", "TOKEN_SPACE", "fold_ids", "ngram_counts", "token_ids", "tokenize",
           "word_id"]

TOKEN_SPACE = 2**20  # hashed word ids of a text dataset lie in 1..TOKEN_SPACE-1 (0 pads)
MAX_LENGTH = 64  # words kept per text; rotten-tomatoes' longest review snippet has 53
NGRAM_FEATURES = 2**18  # hash buckets of the small models' word and word-pair counts
_WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")  # letters/digits, inner apostrophes kept: "don't", "it's"
# odd 64-bit constants of the n-gram mix (splitmix64's and xxhash's primes): any fixed odd values would do
_MIX_A, _MIX_B, _MIX_C = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0x94D049BB133111EB)


def tokenize(text: str) -> list[str]:
    """Return the lowercase words of ``text`` in order."""
    return _WORD.findall(text.lower())


def word_id(word: str, vocab_size: int = TOKEN_SPACE) -> int:
    """Return the hashed id of one word: 1 + CRC-32 of its UTF-8 bytes modulo ``vocab_size - 1``."""
    return 1 + zlib.crc32(word.encode("utf-8")) % (vocab_size - 1)


def token_ids(texts: Iterable[str], *, vocab_size: int = TOKEN_SPACE, max_length: int = MAX_LENGTH) -> np.ndarray:
    """Return the hashed word ids of ``texts`` as an int64 (N, max_length) matrix, left-aligned, 0-padded.

    Ids lie in 1..vocab_size-1; words after the first ``max_length`` are dropped.
    """
    if vocab_size < 2 or max_length < 1:
        raise ValueError(f"token_ids needs vocab_size >= 2 and max_length >= 1, got {vocab_size} and {max_length}")
    rows = [[word_id(w, vocab_size) for w in tokenize(text)[:max_length]] for text in texts]
    ids = np.zeros((len(rows), max_length), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return ids


def fold_ids(ids: np.ndarray, buckets: int) -> np.ndarray:
    """Return ids folded into 1..buckets-1, 0 kept: ``1 + (id - 1) % (buckets - 1)``, as the torch models fold them."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.where(ids > 0, 1 + (ids - 1) % (buckets - 1), 0)


def _mix(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Return a 64-bit hash of the pairs (left, right) (uint64 arithmetic wraps, identically on every machine)."""
    with np.errstate(over="ignore"):
        h = left.astype(np.uint64) * _MIX_A + (right.astype(np.uint64) + np.uint64(1)) * _MIX_B
        h ^= h >> np.uint64(31)
        h *= _MIX_C
        h ^= h >> np.uint64(29)
    return h


def _ngram_columns(ids: np.ndarray, *, num_features: int = NGRAM_FEATURES,
                  ngram_range: tuple[int, int] = (1, 2)) -> tuple[np.ndarray, np.ndarray]:
    """Return (row, bucket) of every word n-gram in the id matrix ``ids``, n in ``ngram_range`` (padding skipped)."""
    low, high = ngram_range
    if not 1 <= low <= high or num_features < 1:
        raise ValueError(f"ngram_range must be (low, high) with 1 <= low <= high and num_features >= 1, got "
                         f"{ngram_range} and {num_features}; the small text models use (1, 2)")
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 2:
        raise ValueError(f"expected hashed token ids (N, L) from clients.text.token_ids, got shape {ids.shape}")
    rows, columns = [], []
    hashed, valid = _mix(ids, np.zeros_like(ids)), ids > 0  # n = 1: a word alone
    for n in range(1, min(high, ids.shape[1]) + 1):
        if n > 1:  # extend every (n-1)-gram by the word after it
            hashed, valid = _mix(hashed[:, :-1], ids[:, n - 1:]), valid[:, :-1] & (ids[:, n - 1:] > 0)
        if n >= low:
            row, at = np.nonzero(valid)
            rows.append(row)
            columns.append((hashed[row, at] % np.uint64(num_features)).astype(np.int64))
    empty = np.empty(0, dtype=np.int64)
    return (np.concatenate(rows) if rows else empty), (np.concatenate(columns) if columns else empty)


def ngram_counts(ids: np.ndarray, *, num_features: int = NGRAM_FEATURES,
                 ngram_range: tuple[int, int] = (1, 2)) -> csr_matrix:
    """Return how often every hashed word n-gram occurs in every row of ``ids``: a float64 CSR (N, num_features)."""
    from scipy.sparse import coo_matrix  # only the small text models pay for scipy

    rows, columns = _ngram_columns(ids, num_features=num_features, ngram_range=ngram_range)
    counts = coo_matrix((np.ones(len(rows)), (rows, columns)), shape=(len(ids), num_features))
    return counts.tocsr()  # repeated (row, bucket) pairs are summed
