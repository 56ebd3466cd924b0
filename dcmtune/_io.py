"""The one crash-safe writer: every file or directory dcmtune writes goes through here.

A write goes to a temporary sibling with a unique name (so two writers never share one), is
flushed and fsynced, then renamed over the target, and the directory is fsynced so the rename
itself survives a power cut. A failure at any point leaves the previous file untouched and no
temporary behind. This module holds the only renames in the package.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "atomic_write",
    "write_bytes",
    "write_text",
    "write_json",
    "write_csv",
    "atomic_directory",
    "recover_directory",
    "jsonable",
    "plain",
    "move_aside",
    "writable_problem",
]


def _tmp_name(target: Path, suffix: str) -> Path:
    return target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.{suffix}")


def _fsync_dir(directory: Path) -> None:
    """Persists a rename: fsync of the directory entry (a no-op where the OS refuses it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], durable: bool = True) -> Path:
    """Calls `write(f)` on a binary temp file next to `path`, then renames it over `path`.

    Raises whatever `write` raises; `path` then keeps its old content and no temp is left.
    durable=False skips the fsyncs: still atomic for readers and across a killed process,
    but not across a power loss (for bookkeeping whose loss only costs a repeat).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path, "tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if durable:
        _fsync_dir(path.parent)
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def jsonable(x: Any) -> Any:
    """A JSON-safe copy: numpy scalars/arrays to Python, NaN to null, +-inf to +-1e308."""
    t = type(x)
    if t is float:  # the common leaves first (a checkpoint's history holds thousands)
        return x if math.isfinite(x) else (None if math.isnan(x) else math.copysign(1e308, x))
    if t is int or t is str or t is bool or x is None:
        return x
    if t is dict:
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        x = x.item()
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not np.isfinite(x):
        return None if np.isnan(x) else (1e308 if x > 0 else -1e308)
    return x


def plain(x: Any) -> Any:
    """A numpy scalar (as some samplers and pandas hand out) as the Python scalar; anything
    else unchanged."""
    if hasattr(x, "item") and getattr(x, "ndim", None) == 0:
        return x.item()
    return x


def write_json(path: str | Path, obj: Any, durable: bool = True) -> Path:
    """Pretty, key-sorted JSON (NaN as null), written atomically (`atomic_write`)."""
    text = json.dumps(jsonable(obj), indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), durable=durable)


def write_csv(path: str | Path, rows: Any, columns: Sequence[str] | None = None) -> Path:
    """A CSV from a pandas DataFrame (index dropped) or from an iterable of dict rows (columns:
    the union of their keys in first-seen order, unless given)."""
    path = Path(path)
    if hasattr(rows, "to_csv"):
        return write_text(path, rows.to_csv(index=False))
    rows = list(rows)
    keys = (
        list(columns)
        if columns is not None
        else list(dict.fromkeys(k for row in rows for k in row))
    )

    def write(f):
        import io

        text = io.StringIO(newline="")
        w = csv.DictWriter(text, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
        f.write(text.getvalue().encode("utf-8"))

    return atomic_write(path, write)


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yields a temporary sibling directory to fill; on success it replaces `target`.

    The files written inside are fsynced before the swap. An existing `target` is moved aside
    first (to `.<name>.<id>.old`) and deleted only after the new one is in place. On error the
    temporary directory is removed and `target` is untouched, or put back if the error came
    between the two renames. If the process dies between them, `recover_directory(target)`
    puts the previous copy back.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(target, "tmp")
    tmp.mkdir()
    old = None
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        if target.exists():
            old = _tmp_name(target, "old")
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        if old is not None and old.exists() and not target.exists():
            os.replace(old, target)  # the new copy never arrived: put the old one back
            _fsync_dir(target.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_directory(target: str | Path) -> Path | None:
    """Puts back the previous copy of `target` left by an `atomic_directory` swap that was
    interrupted between its two renames (no `target`, a `.<name>.<id>.old` sibling).

    Returns `target` if a copy was put back, None if there was nothing to recover (`target`
    exists, or no previous copy is left). Of several left-over copies the newest is used.
    """
    target = Path(target)
    if target.exists() or not target.parent.is_dir():
        return None
    olds = [p for p in target.parent.glob(f".{_glob_escape(target.name)}.*.old") if p.is_dir()]
    if not olds:
        return None
    newest = max(olds, key=lambda p: p.stat().st_mtime)
    try:
        os.replace(newest, target)
    except OSError:
        return None  # another process recovered it first
    _fsync_dir(target.parent)
    return target


def _glob_escape(name: str) -> str:
    """`name` with glob metacharacters escaped."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def writable_problem(directory: str | Path) -> str | None:
    """Why `directory` (created later, with its parents) could not be written, or None.

    Probes the nearest existing ancestor with a temporary file that is removed at once, so the
    answer holds for root and read-only mounts too, and nothing is left behind.
    """
    p = Path(directory).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        return f"{p} is a file, not a directory"
    try:
        fd, name = tempfile.mkstemp(prefix=".dcmtune-probe-", dir=p)
    except OSError as e:
        return f"{p} is not writable ({e.strerror or type(e).__name__})"
    os.close(fd)
    os.unlink(name)
    return None


def move_aside(path: str | Path, new_name: str) -> Path:
    """Renames `path` to `new_name` in the same directory (never overwriting); returns it."""
    path = Path(path)
    target = path.with_name(new_name)
    if target.exists():
        target = _tmp_name(target, "aside")
    os.replace(path, target)
    _fsync_dir(path.parent)
    return target
