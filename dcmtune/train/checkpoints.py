"""Safe checkpoints: msgpack state + meta.json, atomic writes, best/latest/periodic, top-k.

A checkpoint is a directory:
  state.msgpack  the TrainState (step, params, opt_state, ema_params, rng) via flax.serialization
  meta.json      epoch, step, metrics, history, best metric, resolved config, versions, the
                 training domain (elements, largest molecule, total charges; prediction warns
                 outside it; absent from checkpoints written before it was recorded), the
                 SHA-256 of state.msgpack (a truncated or altered state file is refused) and the
                 SHA-256 of meta.json itself without that field (`meta_sha256`, over the
                 canonical JSON: an altered meta.json is refused too)

No pickle anywhere: loading a checkpoint never executes code. Directories are written under a
temporary name and renamed into place, so a crash mid-write never leaves a half checkpoint
under a real name; a crash between the two renames of the swap leaves the previous copy under
a hidden name, which `read_meta`/`load_checkpoint` find and put back (`_io.recover_directory`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from dcmtune import _io
from dcmtune.provenance import versions

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "read_meta",
    "verify_checkpoint",
    "prune_periodic",
    "checkpoint_candidates",
    "package_versions",
    "STATE_FILE",
    "META_FILE",
]

log = logging.getLogger(__name__)

STATE_FILE = "state.msgpack"
META_FILE = "meta.json"
FORMAT = "dcmtune-checkpoint-2"  # 2: meta.json carries its own checksum (meta_sha256)


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, altered, or does not fit the run."""


# The packages a checkpoint depends on (recorded in its meta.json).
_VERSIONS = ("dcmtune", "jax", "jaxlib", "flax", "optax", "e3x", "numpy")


def package_versions() -> dict[str, str]:
    """Versions of the packages a checkpoint depends on."""
    return versions(_VERSIONS)


def save_checkpoint(directory: Path, state: Any, meta: dict) -> Path:
    """Writes `state` (any flax-serializable pytree) and `meta` to `directory`, atomically.

    An existing checkpoint at `directory` is replaced only once the new one is complete.
    """
    with _io.atomic_directory(directory) as tmp:
        from flax import serialization  # here, so reading meta.json needs no JAX

        blob = serialization.to_bytes(state)
        (tmp / STATE_FILE).write_bytes(blob)
        full_meta = _io.jsonable(
            dict(
                meta,
                format=FORMAT,
                state_sha256=hashlib.sha256(blob).hexdigest(),
                versions=package_versions(),
            )
        )
        full_meta.pop("meta_sha256", None)
        full_meta["meta_sha256"] = _meta_digest(full_meta)
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2, sort_keys=True))
    return Path(directory)


def _meta_digest(meta: dict) -> str:
    """SHA-256 of the canonical JSON of `meta` without its `meta_sha256` field."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    ).hexdigest()


def read_meta(directory: Path) -> dict:
    """meta.json of a checkpoint (cheap: does not read the parameters), checksum-verified.

    A checkpoint whose swap was interrupted (only the previous copy left, under a hidden name)
    is put back first.
    """
    directory = Path(directory)
    path = directory / META_FILE
    if not path.is_file() and _io.recover_directory(directory) is not None:
        log.warning(
            "%s: recovered the previous copy left by an interrupted checkpoint write", directory
        )
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a dcmtune checkpoint (no {META_FILE})")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(
            f"{path}: not UTF-8 text (byte {e.start}); the file is damaged"
        ) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e.msg})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        ok = meta.get("meta_sha256") == _meta_digest(meta)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path}: checksum mismatch (meta.json altered or damaged)")
    return meta


def verify_checkpoint(directory: Path) -> dict:
    """The meta of a checkpoint whose meta.json and state file both pass their checksums
    (reads the state bytes, not the parameters into JAX). CheckpointError otherwise."""
    directory = Path(directory)
    meta = read_meta(directory)
    _read_state(directory, meta)
    return meta


def _read_state(directory: Path, meta: dict) -> bytes:
    state_path = directory / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{directory}: missing {STATE_FILE}")
    blob = state_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta.get("state_sha256"):
        raise CheckpointError(
            f"{state_path}: checksum mismatch (file truncated or altered; {len(blob)} bytes)"
        )
    return blob


def load_checkpoint(directory: Path, template: Any = None) -> tuple[Any, dict]:
    """Loads a checkpoint, verifying the state file's checksum.

    Args:
      directory: The checkpoint directory.
      template: Optional pytree (e.g. a freshly initialised TrainState) to restore into; its
        structure and shapes must match. Without it the state is a nested dict of numpy
        arrays (enough to read `params` / `ema_params`).

    Raises:
      CheckpointError: missing files, checksum mismatch (truncated or altered state), or a
        state that does not fit `template` (another architecture).
    """
    directory = Path(directory)
    meta = read_meta(directory)
    state_path = directory / STATE_FILE
    blob = _read_state(directory, meta)
    from flax import serialization

    try:
        raw = serialization.msgpack_restore(blob)
    except Exception as e:  # msgpack raises several unrelated types for corrupt input
        raise CheckpointError(f"{state_path}: unreadable msgpack ({type(e).__name__})") from None
    if template is None:
        return raw, meta
    _check_fits(template, raw, state_path)
    try:
        return serialization.from_state_dict(template, raw), meta
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{state_path}: the optimizer state does not fit this run "
            f"({type(e).__name__}); was it saved with another optimizer "
            "(e.g. use_grad_clip or use_ema toggled)?"
        ) from None


def _check_fits(template: Any, raw: dict, where: Path) -> None:
    """Refuses a state whose parameter tree or shapes differ from the template's."""
    from flax import serialization

    want = serialization.to_state_dict(template)

    def shapes(tree, prefix=""):
        if isinstance(tree, dict):
            out = {}
            for k, v in tree.items():
                out.update(shapes(v, f"{prefix}/{k}"))
            return out
        return {prefix: tuple(np.shape(tree))}

    a, b = shapes(want.get("params", want)), shapes(raw.get("params", raw))
    if a != b:
        missing = sorted(set(a) ^ set(b))
        diff = missing[0] if missing else next(k for k in a if a[k] != b[k])
        raise CheckpointError(
            f"{where}: parameters do not fit this model (first difference at "
            f"{diff}); was it saved with another architecture?"
        )


def prune_periodic(checkpoint_root: Path, keep: int, metric: str = "valid_loss") -> list[Path]:
    """Keeps the `keep` best `epoch_N` checkpoints by `metric` (lower is better); `best` and
    `latest` are never touched. Returns the removed directories."""
    periodic = []
    for d in Path(checkpoint_root).glob("epoch_*"):
        try:
            value = read_meta(d)["metrics"].get(metric)
        except (CheckpointError, KeyError):
            continue
        value = float("inf") if value is None or not np.isfinite(value) else float(value)
        periodic.append((value, int(d.name.split("_")[1]), d))
    periodic.sort()
    removed = [d for _, _, d in periodic[keep:]]
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed


def find_checkpoint(path: Path) -> Path | None:
    """`path` if it is a checkpoint, else `path/checkpoints/latest` for a run directory
    (either put back first if its write was interrupted)."""
    path = Path(path)
    for candidate in (path, path / "checkpoints" / "latest"):
        if not (candidate / META_FILE).is_file():
            _io.recover_directory(candidate)
        if (candidate / META_FILE).is_file():
            return candidate
    return None


def checkpoint_candidates(
    trial_dir: Path, skipped: list | None = None, verify_state: bool = True
) -> list[tuple[Path, dict]]:
    """(dir, meta) of every checksum-valid dcmtune checkpoint of a trial: Tune's copies first,
    then the trainer's own (best, latest, epoch_N). Damaged ones are logged and appended to
    `skipped` as "path: reason". With `verify_state=False` only meta.json is needed and checked
    (a local copy of a remote trial, whose state files are fetched later)."""
    dirs = sorted(trial_dir.glob("checkpoint_*"))
    root = trial_dir / "checkpoints"
    if root.is_dir():
        dirs += [root / "best", root / "latest"] + sorted(root.glob("epoch_*"))
    out = []
    for d in dirs:
        if not (d / META_FILE).is_file():
            _io.recover_directory(d)
        if (d / META_FILE).is_file() or (d / STATE_FILE).is_file():
            try:
                out.append((d, verify_checkpoint(d) if verify_state else read_meta(d)))
            except CheckpointError as e:
                log.warning("skipping a damaged checkpoint: %s", e)
                if skipped is not None:
                    skipped.append(f"{d}: {e}")
    return out
