"""Which code wrote a checkpoint: a git checkout's commit and dirty state, or, from Flower's unpacked FAB, the
submitter's commit or the reason there is none, with the FAB's hash. Real git, a real FAB, no mocks."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from flows.flower import build_fab, source_run_config
from infra.checkpoints import checkout_source, read_checkpoint, run_source
from infra.store import open_store

ROOT = Path(__file__).resolve().parents[1]
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")


def _git(folder: Path, *args: str) -> str:
    """Run git in ``folder`` with a throwaway identity and return its output."""
    done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=folder,
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


@needs_git
def test_a_checkout_names_its_commit_and_whether_it_has_uncommitted_changes(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "commit", "-q", "-m", "one")
    head = _git(tmp_path, "rev-parse", "HEAD")

    clean = checkout_source(tmp_path)
    (tmp_path / "a.py").write_text("x = 2\n")
    edited = checkout_source(tmp_path)

    assert (clean.git_commit, clean.git_dirty, clean.reason) == (head, False, None)
    assert (edited.git_commit, edited.git_dirty) == (head, True)
    assert source_run_config(tmp_path) == {"git-commit": head, "git-dirty": "yes"}


def test_a_folder_without_git_says_why_it_has_no_commit_and_a_bad_commit_is_refused(tmp_path):
    fab_hash = "ab" * 32

    source = run_source(git_commit="", git_dirty=None, fab_hash=fab_hash, root=tmp_path)

    assert source.as_dict() == {
        "git_commit": None, "git_dirty": None, "fab_hash": fab_hash,
        "git_commit_reason": f"not a git checkout: {tmp_path} has no .git naming a commit, and the run's "
                             "submitter named no commit (the code runs from the unpacked FAB recorded as fab_hash)"}
    assert source_run_config(tmp_path) == {"git-commit": "", "git-dirty": "unknown"}
    with pytest.raises(ValueError, match=r"expected a git commit of 40 \(or 64\) lowercase hex digits or '', "
                                         r"got 'HEAD~1'"):
        run_source(git_commit="HEAD~1", git_dirty=None, fab_hash=None, root=tmp_path)


_WRITE_FROM_THE_FAB = """
import json, sys
from pathlib import Path
app, store_uri, fab_hash, commit = sys.argv[1:5]
sys.path.insert(0, app)  # as Flower loads a ServerApp from the FAB it unpacked
import numpy as np
import infra.checkpoints as checkpoints
assert Path(checkpoints.__file__).is_relative_to(app), checkpoints.__file__
from infra.store import open_store
for run_key, named in (("from-flow", commit), ("by-hand", "")):
    source = checkpoints.run_source(git_commit=named, git_dirty=False if named else None, fab_hash=fab_hash)
    checkpoints.write_round(open_store(store_uri), run_key, "small", 1, {"w": np.zeros(3, np.float32)}, {}, {},
                            source=source)
"""


def test_a_round_written_from_the_unpacked_fab_records_the_submitters_commit_or_why_there_is_none(tmp_path):
    from flwr.cli.install import install_from_fab

    fab = build_fab()
    fab_hash = hashlib.sha256(fab).hexdigest()
    app = install_from_fab(fab, install_dir=tmp_path / "flwr", skip_prompt=True)  # what the SuperLink runs
    commit = "0123456789abcdef0123456789abcdef01234567"
    store_uri = f"file://{tmp_path / 'store'}"

    done = subprocess.run([sys.executable, "-c", _WRITE_FROM_THE_FAB, str(app), store_uri, fab_hash, commit],
                          capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr[-2000:]
    assert not (app / ".git").exists()
    store = open_store(store_uri)
    named, by_hand = (read_checkpoint(store, key, "small", 1)["code"] for key in ("from-flow", "by-hand"))
    assert {k: named[k] for k in ("git_commit", "git_dirty", "fab_hash")} == {
        "git_commit": commit, "git_dirty": False, "fab_hash": fab_hash}
    assert "git_commit_reason" not in named
    assert (by_hand["git_commit"], by_hand["git_dirty"], by_hand["fab_hash"]) == (None, None, fab_hash)
    assert by_hand["git_commit_reason"].startswith(f"not a git checkout: {app} has no .git")
    assert named["fedcompare"] == by_hand["fedcompare"] == metadata.version("fedcompare")


@needs_git
def test_the_flow_sends_this_checkouts_commit_and_dirty_state():
    head = _git(ROOT, "rev-parse", "HEAD")
    dirty = bool(_git(ROOT, "status", "--porcelain"))

    assert source_run_config() == {"git-commit": head, "git-dirty": "yes" if dirty else "no"}
