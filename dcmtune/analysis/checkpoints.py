"""Trained checkpoints opened for analysis: the model's config and evaluation parameters, and
the data of the split they were trained on.

Everything here works on plain dcmtune directories (no Ray):

  * a checkpoint directory (`state.msgpack` + `meta.json`), e.g. `<run>/checkpoints/best`, a
    Tune `checkpoint_NNNNNN/` copy of one, or a ranking's `best_model/`;
  * a run directory (`config.json`, `split.json`, `history.csv`, `checkpoints/`), as written by
    `python -m dcmtune.train` or by one sweep trial.

Data to evaluate on is either an `ESPData` or the name of a split ("test", "valid", "train",
"all"); a split is taken from the split record saved with the run, after checking that the data
is the data the run was trained on (SHA-256 checksum).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dcmtune.config import ConfigError, ExperimentConfig
from dcmtune.data.dataset import ESPData
from dcmtune.data.file_format import DataError
from dcmtune.data.load import load_dataset
from dcmtune.data.splits import split_dataset
from dcmtune.train import checkpoints as ckpt

__all__ = [
    "AnalysisError",
    "LoadedCheckpoint",
    "EVAL_SPLITS",
    "resolve_checkpoint",
    "open_checkpoint",
    "checkpoint_data",
    "DataCache",
    "split_summary",
]

# The splits a checkpoint can be evaluated on: the run's three, or all of its data.
EVAL_SPLITS = ("test", "valid", "train", "all")


class AnalysisError(ValueError):
    """A path is not what was expected (no checkpoint, no run, wrong data); one line."""


# --------------------------------------------------------------------------- loading


def resolve_checkpoint(path: str | Path, which: str = "best") -> Path:
    """The checkpoint directory meant by `path`.

    Args:
      path: A checkpoint directory (has meta.json), or a run/trial directory holding
        `checkpoints/<which>` (falls back to `checkpoints/latest`).
      which: "best" or "latest" for run directories.

    Raises:
      AnalysisError: naming the path and what was expected.
    """
    p = Path(path)
    if not p.exists():
        raise AnalysisError(
            f"{p}: not found; expected a dcmtune checkpoint directory or run directory"
        )
    if (p / ckpt.META_FILE).is_file():
        return p
    for name in (which, "latest"):
        c = p / "checkpoints" / name
        if (c / ckpt.META_FILE).is_file():
            return c
    raise AnalysisError(
        f"{p}: not a dcmtune checkpoint (expected {ckpt.META_FILE} and "
        f"{ckpt.STATE_FILE}, or a run directory with checkpoints/{which})"
    )


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint with its model rebuilt from the checkpoint's own config.

    Attributes:
      path: The checkpoint directory.
      config: The run's resolved ExperimentConfig.
      params: The parameters used for evaluation (the EMA when `training.use_ema`, as the
        trainer evaluates).
      meta: meta.json (epoch, metrics, history, split record, ...).
      split_record: The run's split (indices per split, mol_ids, data checksum), or None for
        checkpoints saved before splits were recorded.
    """

    path: Path
    config: ExperimentConfig
    params: Any
    meta: dict
    split_record: dict | None

    @property
    def epoch(self) -> int:
        return int(self.meta.get("epoch", 0))

    @property
    def model(self):
        from dcmtune.model.dcmnet import build_model

        return build_model(self.config.model)

    @property
    def num_params(self) -> int:
        import jax

        return int(sum(np.size(x) for x in jax.tree.leaves(self.params)))


def _find_split_record(path: Path, meta: dict) -> dict | None:
    """The split record of a checkpoint: in its meta, or split.json beside it (best_model/),
    in its run directory (<run>/checkpoints/X) or its Tune trial directory
    (<trial>/checkpoint_NNNNNN)."""
    rec = meta.get("split")
    if isinstance(rec, dict) and "indices" in rec:
        return rec
    for cand in (
        path / "split.json",
        path.parent.parent / "split.json",
        path.parent / "split.json",
    ):
        if cand.is_file():
            try:
                rec = json.loads(cand.read_text())
            except json.JSONDecodeError as e:
                raise AnalysisError(f"{cand}: unreadable JSON ({e.msg})") from None
            if rec.get("checksum") == meta.get("data_checksum"):
                return rec
    return None


def open_checkpoint(path: str | Path, which: str = "best") -> LoadedCheckpoint:
    """Loads a checkpoint (or a run directory's `checkpoints/<which>`) and its config.

    Raises:
      AnalysisError / CheckpointError: one line naming the path.
    """
    directory = resolve_checkpoint(path, which)
    state, meta = ckpt.load_checkpoint(directory)
    try:
        config = ExperimentConfig.from_dict(meta.get("config") or {})
    except ConfigError as e:
        raise AnalysisError(
            f"{directory}: the config in {ckpt.META_FILE} is invalid ({e})"
        ) from None
    key = "ema_params" if config.training.use_ema else "params"
    if not isinstance(state, dict) or key not in state:
        raise AnalysisError(
            f"{directory}: {ckpt.STATE_FILE} holds no {key!r}; expected a dcmtune TrainState"
        )
    return LoadedCheckpoint(
        path=directory,
        config=config,
        params=state[key],
        meta=meta,
        split_record=_find_split_record(directory, meta),
    )


def _as_loaded(checkpoint) -> LoadedCheckpoint:
    return checkpoint if isinstance(checkpoint, LoadedCheckpoint) else open_checkpoint(checkpoint)


def checkpoint_data(
    checkpoint,
    split: str = "test",
    data: ESPData | None = None,
    data_files: Sequence[str | Path] | None = None,
) -> ESPData:
    """The conformers of `split` of the data the checkpoint was trained on.

    Args:
      checkpoint: A path or LoadedCheckpoint.
      split: "test", "valid", "train" or "all".
      data: The full dataset, if already loaded; else it is loaded from `data_files`, or from
        the run's own `data.data_files` (empty = the bundled demo set).

    Raises:
      AnalysisError: unknown or empty split, or data that is not the run's (checksum differs).
    """
    c = _as_loaded(checkpoint)
    if split not in EVAL_SPLITS:
        raise AnalysisError(f"split: expected one of {', '.join(EVAL_SPLITS)}, got {split!r}")
    cfg = c.config
    if data is None:
        files = list(data_files) if data_files else list(cfg.data.data_files)
        data = load_dataset(files, cfg.model.max_atomic_number, cfg.data.dipole_units)
    expected = (c.split_record or {}).get("checksum") or c.meta.get("data_checksum")
    if expected and data.checksum() != expected:
        files = list(data_files or cfg.data.data_files) or ["the bundled demo set"]
        raise AnalysisError(
            f"{c.path}: the data ({', '.join(map(str, files))}) is not the data this run was "
            f"trained on (checksum {data.checksum()[:12]}, expected {expected[:12]}); pass the "
            "original files"
        )
    if split == "all":
        return data
    if c.split_record is not None:
        idx = np.asarray(c.split_record["indices"].get(split, []), dtype=np.int64)
    else:
        idx = split_dataset(data, cfg.data)[split]
    if len(idx) == 0:
        raise AnalysisError(
            f"{c.path}: the {split} split of this run is empty (data."
            f"{split}_fraction = 0?); evaluate another split"
        )
    if idx.max() >= data.num_conformers:
        raise AnalysisError(
            f"{c.path}: split indices reach {idx.max()}, but the data has "
            f"{data.num_conformers} conformers"
        )
    return data.subset(idx)


class DataCache:
    """The data of several runs, each distinct set of files loaded once.

    Args:
      data: The full dataset of every run, if already in memory (then nothing is loaded).
      data_files: Files to load instead of each run's own `data.data_files` (they moved).
    """

    def __init__(self, data: ESPData | None = None, data_files: Sequence[str | Path] | None = None):
        self._given = data
        self._files = [str(f) for f in data_files] if data_files else None
        self._loaded: dict[tuple, ESPData] = {}

    def _files_of(self, config: ExperimentConfig) -> list[str]:
        return self._files if self._files is not None else list(config.data.data_files)

    def _load(self, config: ExperimentConfig) -> ESPData:
        key = (
            tuple(self._files_of(config)),
            config.model.max_atomic_number,
            config.data.dipole_units,
        )
        if key not in self._loaded:
            self._loaded[key] = load_dataset(*key)
        return self._loaded[key]

    def full(self, config: ExperimentConfig) -> ESPData:
        """The full dataset of a run (pass it to `checkpoint_data`, which checks its checksum)."""
        return self._given if self._given is not None else self._load(config)

    def files(self, config: ExperimentConfig) -> list[str] | None:
        """The files `full(config)` holds (empty list: the bundled demo set); None when the
        data was passed in memory and is not the run's files."""
        if self._given is None or self._files is not None:
            return self._files_of(config)
        try:
            same = self._load(config).checksum() == self._given.checksum()
        except DataError:
            same = False
        return self._files_of(config) if same else None


def split_summary(checkpoint, data: ESPData) -> dict:
    """The run's split of `data` (its full dataset), JSON-able: the data checksum, split_by,
    split_seed, per split the conformer count and sorted mol_ids, and per held-out split the
    atomic numbers the training split never shows (no splits without a split record)."""
    c = _as_loaded(checkpoint)
    record = c.split_record or {}
    indices = {s: np.asarray(i, np.int64) for s, i in record.get("indices", {}).items()}
    elements = {
        s: {int(z) for z in np.unique(data.Z[i]) if z > 0} for s, i in indices.items() if len(i)
    }
    train = elements.get("train", set())
    return {
        "checksum": record.get("checksum") or c.meta.get("data_checksum"),
        "split_by": c.config.data.split_by,
        "split_seed": c.config.data.split_seed,
        "guarantee": record.get(
            "guarantee",
            "molecules: no mol_id of a held-out split is in training"
            if c.config.data.split_by == "molecule"
            else "conformers only",
        ),
        "splits": {
            s: {"conformers": int(len(i)), "molecules": sorted(set(data.mol_id[i].tolist()))}
            for s, i in indices.items()
        },
        "elements_not_in_train": {
            s: sorted(e - train) for s, e in elements.items() if s != "train" and e - train
        },
    }
