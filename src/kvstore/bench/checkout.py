"""The source checkout this package runs from, if it runs from one (git), and its version.

The installed package does not depend on a checkout: both functions return None without one.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

GIT_TIMEOUT_S = 10


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(Path(__file__).parent), *args],
        capture_output=True,
        text=True,
        timeout=GIT_TIMEOUT_S,
        check=True,
    ).stdout.strip()


def checkout_root() -> Path | None:
    """The top of the git checkout holding this package, or None (an installed package)."""
    try:
        root = Path(_git("rev-parse", "--show-toplevel"))
    except (OSError, subprocess.SubprocessError):
        return None
    return root if (root / "src" / "kvstore").is_dir() else None


def source_version() -> str | None:
    """The checkout's commit (with "+changes" if the tree differs from it), if known."""
    if checkout_root() is None:
        return None
    try:
        commit = _git("rev-parse", "--short", "HEAD")
        changed = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+changes" if changed else commit
