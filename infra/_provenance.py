"""What code wrote a checkpoint: package, git commit (or why there is none), FAB, Python and numpy (private)."""

from __future__ import annotations

import functools
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Source", "checkout_source", "code_version", "run_source"]

_SHA = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")  # sha1 or sha256 object names
_PROJECT = Path(__file__).resolve().parents[1]  # the checkout, or the unpacked FAB a ServerApp runs from


@dataclass(frozen=True)
class Source:
    """Which code runs: the git commit it comes from (None: ``reason`` says why) and the Flower app bundle."""

    git_commit: str | None
    git_dirty: bool | None = None  # the checkout had uncommitted changes; None: not known
    reason: str | None = None  # why git_commit is None
    fab_hash: str | None = None  # sha256 of the Flower app bundle (FAB) the code runs from; None: not from a FAB

    def as_dict(self) -> dict[str, Any]:
        """Return the checkpoint's fields: git_commit, git_dirty, fab_hash, and git_commit_reason when there is none."""
        fields = {"git_commit": self.git_commit, "git_dirty": self.git_dirty, "fab_hash": self.fab_hash}
        return fields if self.git_commit else {**fields, "git_commit_reason": self.reason}


def checkout_source(root: Path) -> Source:
    """Return the commit ``root`` is checked out at and whether it has uncommitted changes, or why there is none.

    Args:
        root: the project's folder; only ``root/.git`` counts (see ``_git_commit``).

    Returns:
        A Source without a FAB hash; ``git_dirty`` is None where `git status` cannot run.
    """
    commit = _git_commit(root)
    if commit is None:
        return Source(None, reason=f"not a git checkout: {root} has no .git naming a commit")
    return Source(commit, git_dirty=_git_dirty(root))


def run_source(*, git_commit: str, git_dirty: bool | None, fab_hash: str | None, root: Path = _PROJECT) -> Source:
    """Return where the code running from ``root`` comes from: its own checkout, else the commit its submitter named.

    A Flower ServerApp runs from the FAB the SuperLink unpacked, which has no .git: then the
    commit is the one the run's submitter read from the checkout it built the FAB from.

    Args:
        git_commit: the commit the run's submitter built the app from; "" if it named none.
        git_dirty: whether the submitter's checkout had uncommitted changes; None if not known.
        fab_hash: sha256 of the FAB the run runs (Flower's ``grid.run.fab_hash``); None if none.
        root: the folder the running code was loaded from.

    Returns:
        The Source, with ``reason`` set when no commit is known.

    Raises:
        ValueError: ``git_commit`` is neither "" nor 40 (or 64) lowercase hex digits.
    """
    if git_commit and not _SHA.fullmatch(git_commit):
        raise ValueError(f"expected a git commit of 40 (or 64) lowercase hex digits or '', got {git_commit!r}: "
                         "pass the output of `git rev-parse HEAD`")
    own = _own_source() if root == _PROJECT else checkout_source(root)
    if own.git_commit:
        return replace(own, fab_hash=fab_hash)
    if git_commit:
        return Source(git_commit, git_dirty=git_dirty, fab_hash=fab_hash)
    return Source(None, fab_hash=fab_hash, reason=f"{own.reason}, and the run's submitter named no commit"
                  + (" (the code runs from the unpacked FAB recorded as fab_hash)" if fab_hash else ""))


def code_version(source: Source | None = None) -> dict[str, Any]:
    """Return the versions that describe the running code; ``source`` None: the checkout this module lives in."""
    return {**_versions(), **(source or _own_source()).as_dict()}


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str | None]:
    """Return the package, Python and numpy versions; a value that cannot be found cheaply is None."""
    try:
        package = metadata.version("fedcompare")
    except metadata.PackageNotFoundError:
        package = None
    return {"fedcompare": package, "python": platform.python_version(), "numpy": np.__version__}


@functools.lru_cache(maxsize=1)
def _own_source() -> Source:
    """Return the checkout source of the folder this code was loaded from, once per process."""
    return checkout_source(_PROJECT)


def _git_dirty(root: Path) -> bool | None:
    """Return whether `git status --porcelain` lists changes in ``root``; None if git is missing or fails."""
    git = shutil.which("git")
    if git is None:
        return None
    try:  # --no-optional-locks: never take index.lock under a user's own git commands
        done = subprocess.run([git, "--no-optional-locks", "status", "--porcelain"], cwd=root, capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return bool(done.stdout.strip()) if done.returncode == 0 else None


def _git_commit(root: Path) -> str | None:
    """Return the commit HEAD points at when ``root`` (the project's folder) is a git checkout.

    Only ``root/.git`` counts: a repository further up (a home folder under version control,
    with the app unpacked inside) would name a commit of other code.
    """
    dot_git = root / ".git"
    try:
        if dot_git.is_file():  # a worktree or submodule: "gitdir: <path>"
            text = dot_git.read_text(encoding="utf-8").strip()
            if not text.startswith("gitdir:"):
                return None
            return _resolve_head((root / text.removeprefix("gitdir:").strip()).resolve())
        return _resolve_head(dot_git) if dot_git.is_dir() else None
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _resolve_head(git_dir: Path) -> str | None:
    """Return the commit of ``git_dir``'s HEAD: detached, a loose ref, or a packed ref."""
    head = (git_dir / "HEAD").read_text(encoding="utf-8").strip()
    if _SHA.fullmatch(head):
        return head
    if not head.startswith("ref:"):
        return None
    ref = head.removeprefix("ref:").strip()
    common = git_dir
    commondir = git_dir / "commondir"  # a worktree keeps shared refs in the main .git
    if commondir.is_file():
        common = (git_dir / commondir.read_text(encoding="utf-8").strip()).resolve()
    for base in (git_dir, common):
        loose = base / ref
        if loose.is_file():
            value = loose.read_text(encoding="utf-8").strip()
            return value if _SHA.fullmatch(value) else None
    packed = common / "packed-refs"
    if packed.is_file():
        for line in packed.read_text(encoding="utf-8").splitlines():
            sha, _, name = line.partition(" ")
            if name == ref and _SHA.fullmatch(sha):
                return sha
    return None
