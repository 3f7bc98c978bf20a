"""What code wrote a checkpoint: package, git commit, Python and numpy versions (private)."""

from __future__ import annotations

import functools
import platform
import re
from importlib import metadata
from pathlib import Path

import numpy as np

__all__ = ["code_version"]

_SHA = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")  # sha1 or sha256 object names


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, str | None]:
    """Return the versions that describe the running code; a value that cannot be found cheaply is None."""
    try:
        package = metadata.version("fedcompare")
    except metadata.PackageNotFoundError:
        package = None
    return {
        "fedcompare": package,
        "git_commit": _git_commit(Path(__file__).resolve().parents[1]),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


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
