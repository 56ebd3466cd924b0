"""What produced a file: the versions of the packages behind its numbers, and the git commit.

Plain Python (the kit: imports no wing). Checkpoints, generated data sets, kept programs and
rankings record these, each with its own list of packages.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path

__all__ = ["versions", "git_commit"]


def versions(
    names: Sequence[str], python: bool = False, missing: str | None = None
) -> dict[str, str]:
    """{package: version} of `names` (each looked up once per process: a lookup scans the
    installed distributions, about 10 ms, and a run saves a checkpoint every epoch).

    Args:
      names: Distribution names, e.g. ("jax", "flax").
      python: Also give the Python version (key "python").
      missing: The value for a package that is not installed; None leaves it out.

    Returns:
      A new dict (callers may change it).
    """
    out = {"python": platform.python_version()} if python else {}
    for name in names:
        version = _version(name)
        if version is not None:
            out[name] = version
        elif missing is not None:
            out[name] = missing
    return out


@functools.cache
def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(directory: str | Path | None = None) -> str:
    """The short commit of the git checkout holding `directory` (default: this package), or ""
    (not a checkout, or no git)."""
    where = Path(directory) if directory is not None else Path(__file__).parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=where,
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""
