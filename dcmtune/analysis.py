"""Analysis of trained checkpoints: re-evaluation, comparison, training history, summaries.

Everything here works on plain dcmtune directories (no Ray):

  * a checkpoint directory (`state.msgpack` + `meta.json`), e.g. `<run>/checkpoints/best`, a
    Tune `checkpoint_NNNNNN/` copy of one, or a ranking's `best_model/`;
  * a run directory (`config.json`, `split.json`, `history.csv`, `checkpoints/`), as written by
    `python -m dcmtune.train` or by one sweep trial.

The model is rebuilt from the checkpoint's own config and evaluated with the trainer's model
and loss code (`dcmtune.model`, `dcmtune.loss`), so the numbers here mean exactly what the
training table and Tune report: `esp_rmse` is the square root of the mean over conformers of
each conformer's mean squared ESP error over its valid grid points, in kcal/mol/e; monopole
metrics count real atoms only; padding (atoms, grid points, dummy molecules) changes nothing.

Data to evaluate on is either an `ESPData` or the name of a split ("test", "valid", "train",
"all"); a split is taken from the split record saved with the run, after checking that the data
is the data the run was trained on (SHA-256 checksum).

Reading a training history never loads parameters: it reads `history.csv`, or `meta.json`
files, and orders epochs numerically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import pandas as pd

from dcmtune import _io
from dcmtune import checkpoint as ckpt
from dcmtune import metrics as registry
from dcmtune.cli import OneLineParser, run_cli
from dcmtune.config import ConfigError, ExperimentConfig
from dcmtune.data import DataError, ESPData, load_dataset, make_batch, split_dataset
from dcmtune.units import HARTREE_TO_KCAL

__all__ = [
    "AnalysisError",
    "LoadedCheckpoint",
    "CheckpointAnalysis",
    "TrainingHistory",
    "METRIC_UNITS",
    "SPLITS",
    "resolve_checkpoint",
    "load_checkpoint",
    "checkpoint_data",
    "DataCache",
    "split_summary",
    "analyze_checkpoint",
    "print_analysis_summary",
    "compare_checkpoints",
    "analyze_training_history",
    "batch_analysis_summary",
    "metric_unit",
    "main",
]

log = logging.getLogger(__name__)

SPLITS = ("test", "valid", "train", "all")
_PERCENTILE_PREFIX = "esp_abs_error_p"
# The |ESP error| percentiles computed are the ones the metric registry names.
PERCENTILES = tuple(int(name[len(_PERCENTILE_PREFIX):]) for name in registry.METRICS
                    if name.startswith(_PERCENTILE_PREFIX))

# Units of the metrics reported here, from the registry (ESP in kcal/mol/e, charges in e,
# dipoles in Debye).
METRIC_UNITS = {name: m.unit for name, m in registry.METRICS.items()}


class AnalysisError(ValueError):
    """A path is not what was expected (no checkpoint, no run, wrong data); one line."""


def metric_unit(name: str) -> str:
    """The unit of a metric name, with or without a split prefix (`test_esp_rmse` ->
    `kcal/mol/e`); "" when dimensionless or unknown. `dcmtune.metrics.unit`, which also
    knows this module's split "all"."""
    return registry.unit(name[len("all_"):] if name.startswith("all_") else name)


# --------------------------------------------------------------------------- loading


def resolve_checkpoint(path: Union[str, Path], which: str = "best") -> Path:
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
        raise AnalysisError(f"{p}: not found; expected a dcmtune checkpoint directory or run "
                            "directory")
    if (p / ckpt.META_FILE).is_file():
        return p
    for name in (which, "latest"):
        c = p / "checkpoints" / name
        if (c / ckpt.META_FILE).is_file():
            return c
    raise AnalysisError(f"{p}: not a dcmtune checkpoint (expected {ckpt.META_FILE} and "
                        f"{ckpt.STATE_FILE}, or a run directory with checkpoints/{which})")


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
    split_record: Optional[dict]

    @property
    def epoch(self) -> int:
        return int(self.meta.get("epoch", 0))

    @property
    def model(self):
        from dcmtune.model import build_model

        return build_model(self.config.model)

    @property
    def num_params(self) -> int:
        import jax

        return int(sum(np.size(x) for x in jax.tree.leaves(self.params)))


def _find_split_record(path: Path, meta: dict) -> Optional[dict]:
    """The split record of a checkpoint: in its meta, or split.json beside it (best_model/),
    in its run directory (<run>/checkpoints/X) or its Tune trial directory
    (<trial>/checkpoint_NNNNNN)."""
    rec = meta.get("split")
    if isinstance(rec, dict) and "indices" in rec:
        return rec
    for cand in (path / "split.json", path.parent.parent / "split.json",
                 path.parent / "split.json"):
        if cand.is_file():
            try:
                rec = json.loads(cand.read_text())
            except json.JSONDecodeError as e:
                raise AnalysisError(f"{cand}: unreadable JSON ({e.msg})") from None
            if rec.get("checksum") == meta.get("data_checksum"):
                return rec
    return None


def load_checkpoint(path: Union[str, Path], which: str = "best") -> LoadedCheckpoint:
    """Loads a checkpoint (or a run directory's `checkpoints/<which>`) and its config.

    Raises:
      AnalysisError / CheckpointError: one line naming the path.
    """
    directory = resolve_checkpoint(path, which)
    state, meta = ckpt.load_checkpoint(directory)
    try:
        config = ExperimentConfig.from_dict(meta.get("config") or {})
    except ConfigError as e:
        raise AnalysisError(f"{directory}: the config in {ckpt.META_FILE} is invalid ({e})") \
            from None
    key = "ema_params" if config.training.use_ema else "params"
    if not isinstance(state, dict) or key not in state:
        raise AnalysisError(f"{directory}: {ckpt.STATE_FILE} holds no {key!r}; expected a "
                            "dcmtune TrainState")
    return LoadedCheckpoint(path=directory, config=config, params=state[key], meta=meta,
                            split_record=_find_split_record(directory, meta))


def _as_loaded(checkpoint) -> LoadedCheckpoint:
    return checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint(checkpoint)


def checkpoint_data(checkpoint, split: str = "test", data: Optional[ESPData] = None,
                    data_files: Optional[Sequence[Union[str, Path]]] = None) -> ESPData:
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
    if split not in SPLITS:
        raise AnalysisError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
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
            "original files")
    if split == "all":
        return data
    if c.split_record is not None:
        idx = np.asarray(c.split_record["indices"].get(split, []), dtype=np.int64)
    else:
        idx = split_dataset(data, cfg.data)[split]
    if len(idx) == 0:
        raise AnalysisError(f"{c.path}: the {split} split of this run is empty (data."
                            f"{split}_fraction = 0?); evaluate another split")
    if idx.max() >= data.num_conformers:
        raise AnalysisError(f"{c.path}: split indices reach {idx.max()}, but the data has "
                            f"{data.num_conformers} conformers")
    return data.subset(idx)


class DataCache:
    """The data of several runs, each distinct set of files loaded once.

    Args:
      data: The full dataset of every run, if already in memory (then nothing is loaded).
      data_files: Files to load instead of each run's own `data.data_files` (they moved).
    """

    def __init__(self, data: Optional[ESPData] = None,
                 data_files: Optional[Sequence[Union[str, Path]]] = None):
        self._given = data
        self._files = [str(f) for f in data_files] if data_files else None
        self._loaded: dict[tuple, ESPData] = {}

    def _files_of(self, config: ExperimentConfig) -> list[str]:
        return self._files if self._files is not None else list(config.data.data_files)

    def _load(self, config: ExperimentConfig) -> ESPData:
        key = (tuple(self._files_of(config)), config.model.max_atomic_number,
               config.data.dipole_units)
        if key not in self._loaded:
            self._loaded[key] = load_dataset(*key)
        return self._loaded[key]

    def full(self, config: ExperimentConfig) -> ESPData:
        """The full dataset of a run (pass it to `checkpoint_data`, which checks its checksum)."""
        return self._given if self._given is not None else self._load(config)

    def files(self, config: ExperimentConfig) -> Optional[list[str]]:
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
    elements = {s: {int(z) for z in np.unique(data.Z[i]) if z > 0}
                for s, i in indices.items() if len(i)}
    train = elements.get("train", set())
    return {"checksum": record.get("checksum") or c.meta.get("data_checksum"),
            "split_by": c.config.data.split_by, "split_seed": c.config.data.split_seed,
            "guarantee": record.get("guarantee", "molecules: no mol_id of a held-out split is "
                                                 "in training"
                                    if c.config.data.split_by == "molecule" else
                                    "conformers only"),
            "splits": {s: {"conformers": int(len(i)),
                           "molecules": sorted(set(data.mol_id[i].tolist()))}
                       for s, i in indices.items()},
            "elements_not_in_train": {s: sorted(e - train) for s, e in elements.items()
                                      if s != "train" and e - train}}


# --------------------------------------------------------------------------- evaluation


def _predict(c: LoadedCheckpoint, data: ESPData, batch_size: int) -> dict[str, np.ndarray]:
    """Per-conformer model outputs over all of `data` (host numpy) and the summed metric sums
    (float64)."""
    import jax
    import jax.numpy as jnp

    from dcmtune.loss import LossWeights

    from dcmtune.train import predict_batch as predict

    t = c.config.training
    weights = LossWeights(*(jnp.asarray(x, jnp.float32) for x in (t.esp_w, t.chg_w, t.dip_w)))
    params = jax.device_put(c.params)  # once, not per batch
    n = data.num_conformers
    parts: list[dict] = []
    sums: dict[str, float] = {}
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        out = jax.device_get(predict(params, make_batch(data, idx, batch_size), weights,
                                     c.config.model))
        for k, v in out.pop("sums").items():
            sums[k] = sums.get(k, 0.0) + float(v)
        parts.append({k: np.asarray(v)[: len(idx)] for k, v in out.items()})
    result = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    result["sums"] = sums
    return result


@dataclasses.dataclass
class CheckpointAnalysis:
    """A checkpoint evaluated on some data.

    Attributes:
      checkpoint: The checkpoint directory.
      epoch: Its epoch.
      config: The run's config.
      split: The split evaluated ("test", ..., or "data" for data passed in).
      metrics: Flat scalars; units in METRIC_UNITS. `esp_rmse`, `esp_mae`, `mono_*`,
        `dipole_mae` and `loss` are the trainer's metrics (same definitions and names);
        also `esp_max_abs_error`, `esp_r2`, `esp_pearson_r` and `esp_abs_error_pNN` over all
        valid grid points pooled, `dipole_magnitude_mae`, `dipole_error_norm_mean`,
        `total_charge_max_error`, counts and `n_params`.
      per_conformer: One row per conformer (index into the full dataset when known).
      per_molecule: One row per mol_id: ESP RMSE over its conformers (sqrt of mean of their
        MSEs), conformer count.
      data: The evaluated conformers.
      esp_pred: (M, G) predicted ESP, Hartree/e; zero beyond each conformer's n_grid.
      charges: (M, A, n_dcm) e. positions: (M, A, n_dcm, 3) Angstrom.
      mono_pred: (M, A) predicted atomic monopoles (sum of each atom's charges), e.
      dipole_pred: (M, 3) Debye about `data.com`.
    """

    checkpoint: Path
    epoch: int
    config: ExperimentConfig
    split: str
    metrics: dict[str, float]
    per_conformer: pd.DataFrame
    per_molecule: pd.DataFrame
    data: ESPData
    esp_pred: np.ndarray
    charges: np.ndarray
    positions: np.ndarray
    mono_pred: np.ndarray
    dipole_pred: np.ndarray

    def esp_points(self) -> tuple[np.ndarray, np.ndarray]:
        """(reference, predicted) ESP at all valid grid points, kcal/mol/e, float64."""
        mask = _grid_mask(self.data)
        return (self.data.esp[mask].astype(np.float64) * HARTREE_TO_KCAL,
                self.esp_pred[mask].astype(np.float64) * HARTREE_TO_KCAL)

    def to_dict(self) -> dict:
        """A JSON-able summary (no arrays)."""
        return {"checkpoint": str(self.checkpoint), "epoch": self.epoch, "split": self.split,
                "metrics": dict(self.metrics), "units": {k: metric_unit(k) for k in self.metrics},
                "per_molecule": self.per_molecule.to_dict(orient="records"),
                "config": self.config.to_dict()}


def _grid_mask(data: ESPData) -> np.ndarray:
    return np.arange(data.num_grid)[None, :] < data.n_grid[:, None]


def analyze_checkpoint(checkpoint, data: Union[ESPData, str] = "test", *,
                       batch_size: int = 16, data_files=None,
                       indices: Optional[np.ndarray] = None) -> CheckpointAnalysis:
    """Evaluates a checkpoint: ESP, monopole and dipole errors, per conformer and molecule.

    Args:
      checkpoint: A checkpoint or run directory, or a LoadedCheckpoint.
      data: The conformers to evaluate (an ESPData), or a split name of the run ("test" by
        default; see `checkpoint_data`).
      batch_size: Conformers per forward pass (padding molecules are masked; the result does
        not depend on it).
      data_files: Where to load the run's data from when `data` is a split name (default: the
        run's own data files).
      indices: Dataset indices of the conformers of an ESPData `data`, for the per-conformer
        table (split names fill them in).

    Returns:
      A CheckpointAnalysis.
    """
    c = _as_loaded(checkpoint)
    split = "data"
    if isinstance(data, str):
        split = data
        full_idx = None
        sub = checkpoint_data(c, split, data_files=data_files)
        if split != "all" and c.split_record is not None:
            full_idx = np.asarray(c.split_record["indices"][split], dtype=np.int64)
        indices, data = full_idx, sub
    if not isinstance(data, ESPData):
        raise TypeError(f"data: expected an ESPData or a split name, got {type(data).__name__}")
    if data.num_atoms and int(data.Z.max()) > c.config.model.max_atomic_number:
        raise AnalysisError(f"{c.path}: the data holds atomic number {int(data.Z.max())}, above "
                            f"this model's max_atomic_number {c.config.model.max_atomic_number}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected at least 1, got {batch_size}")
    out = _predict(c, data, batch_size)

    from dcmtune.loss import LossWeights, finalize_metrics

    t = c.config.training
    metrics = finalize_metrics(out["sums"], LossWeights(t.esp_w, t.chg_w, t.dip_w))

    # Pooled over all valid grid points (float64 on the host).
    mask = _grid_mask(data)
    ref = data.esp[mask].astype(np.float64) * HARTREE_TO_KCAL
    pred = out["esp"][mask].astype(np.float64) * HARTREE_TO_KCAL
    abs_err = np.abs(pred - ref)
    ss_tot = float(np.sum((ref - ref.mean()) ** 2))
    metrics["esp_max_abs_error"] = float(abs_err.max())
    metrics["esp_r2"] = 1.0 - float(np.sum((pred - ref) ** 2)) / ss_tot if ss_tot > 0 \
        else float("nan")
    metrics["esp_pearson_r"] = (float(np.corrcoef(pred, ref)[0, 1])
                                if len(ref) > 1 and pred.std() > 0 and ref.std() > 0
                                else float("nan"))
    for p, v in zip(PERCENTILES, np.percentile(abs_err, PERCENTILES)):
        metrics[f"esp_abs_error_p{p}"] = float(v)

    # Monopoles and dipoles (real atoms only).
    amask = data.Z > 0
    mono_pred = np.where(amask, out["mono"], 0.0)
    metrics["total_charge_max_error"] = float(np.max(np.abs(mono_pred.sum(axis=1) - data.Q)))
    if data.dipole is not None:
        dp, dr = out["dipole"].astype(np.float64), data.dipole.astype(np.float64)
        metrics["dipole_magnitude_mae"] = float(np.mean(np.abs(np.linalg.norm(dp, axis=1)
                                                               - np.linalg.norm(dr, axis=1))))
        metrics["dipole_error_norm_mean"] = float(np.mean(np.linalg.norm(dp - dr, axis=1)))
    else:
        metrics["dipole_magnitude_mae"] = metrics["dipole_error_norm_mean"] = float("nan")
    metrics["n_conformers"] = data.num_conformers
    metrics["n_molecules"] = int(len(np.unique(data.mol_id)))
    metrics["n_grid_points"] = int(mask.sum())
    metrics["n_params"] = c.num_params

    # Per conformer: from the predicted ESP in float64 (the same definitions as above).
    err = np.where(mask, out["esp"].astype(np.float64) - data.esp.astype(np.float64), 0.0)
    n_grid = data.n_grid.astype(np.float64)
    mse = np.sum(err ** 2, axis=1) / n_grid
    rows = {
        "conformer": (indices if indices is not None else np.arange(data.num_conformers)),
        "mol_id": data.mol_id,
        "n_atoms": data.N,
        "n_grid": data.n_grid,
        "esp_rmse": np.sqrt(mse) * HARTREE_TO_KCAL,
        "esp_mae": np.sum(np.abs(err), axis=1) / n_grid * HARTREE_TO_KCAL,
        "esp_max_abs_error": np.max(np.abs(err), axis=1) * HARTREE_TO_KCAL,
        "esp_mse_hartree2": mse,
    }
    if data.mono is not None:
        dq = np.where(amask, mono_pred - data.mono, 0.0)
        rows["mono_mae"] = np.sum(np.abs(dq), axis=1) / data.N
        rows["mono_rmse"] = np.sqrt(np.sum(dq ** 2, axis=1) / data.N)
    for i, ax in enumerate("xyz"):
        rows[f"dipole_pred_{ax}"] = out["dipole"][:, i].astype(np.float64)
    if data.dipole is not None:
        for i, ax in enumerate("xyz"):
            rows[f"dipole_ref_{ax}"] = data.dipole[:, i].astype(np.float64)
        rows["dipole_error_norm"] = np.linalg.norm(out["dipole"] - data.dipole, axis=1)
    per_conf = pd.DataFrame(rows)
    per_mol = (per_conf.groupby("mol_id", sort=False)
               .agg(n_conformers=("esp_rmse", "size"), esp_mse=("esp_mse_hartree2", "mean"),
                    esp_max_abs_error=("esp_max_abs_error", "max"))
               .reset_index())
    per_mol.insert(2, "esp_rmse", np.sqrt(per_mol.pop("esp_mse")) * HARTREE_TO_KCAL)
    return CheckpointAnalysis(
        checkpoint=c.path, epoch=c.epoch, config=c.config, split=split, metrics=metrics,
        per_conformer=per_conf, per_molecule=per_mol, data=data, esp_pred=out["esp"],
        charges=out["charges"], positions=out["positions"], mono_pred=mono_pred,
        dipole_pred=out["dipole"])


# Sections of the summary: the registry's metrics whose names start with these prefixes.
_SUMMARY_SECTIONS = (("ESP", ("esp_",)),
                     ("Monopoles (real atoms)", ("mono_", "total_charge_")),
                     ("Dipole", ("dipole_",)))
_SUMMARY_ROWS = tuple((title, tuple(n for n in registry.METRICS if n.startswith(prefixes)))
                      for title, prefixes in _SUMMARY_SECTIONS)


def print_analysis_summary(analysis: CheckpointAnalysis, worst: int = 5) -> str:
    """A human-readable summary of an analysis (returned; the CLI prints it)."""
    m = analysis.metrics
    cfg = analysis.config
    lines = [
        f"Checkpoint {analysis.checkpoint} (epoch {analysis.epoch}, {m['n_params']} parameters)",
        f"Model: n_dcm={cfg.model.n_dcm} features={cfg.model.features} max_degree="
        f"{cfg.model.max_degree} num_iterations={cfg.model.num_iterations} cutoff="
        f"{cfg.model.cutoff:g} A",
        f"Evaluated on: {analysis.split} ({m['n_conformers']} conformers of {m['n_molecules']} "
        f"molecules, {m['n_grid_points']} grid points)",
    ]
    for title, names in _SUMMARY_ROWS:
        shown = [(n, m.get(n)) for n in names if m.get(n) is not None and np.isfinite(m[n])]
        if not shown:
            continue
        lines.append(f"{title}:")
        for name, v in shown:
            unit = metric_unit(name)
            lines.append(f"  {name:<24}{v:>12.5g} {unit}".rstrip())
    pm = analysis.per_molecule.sort_values("esp_rmse", ascending=False).head(worst)
    if len(pm):
        lines.append(f"Worst molecules by {registry.axis_label('esp_rmse')}:")
        for _, r in pm.iterrows():
            lines.append(f"  {str(r['mol_id']):<16}{r['esp_rmse']:>10.4f}  "
                         f"({int(r['n_conformers'])} conformers)")
    return "\n".join(lines)


def compare_checkpoints(paths: Sequence[Union[str, Path]],
                        data: Union[ESPData, str] = "test",
                        labels: Optional[Sequence[str]] = None, *,
                        batch_size: int = 16) -> pd.DataFrame:
    """Evaluates several checkpoints on the same data (or each on its own split) and returns
    one row per checkpoint: label, path, epoch, n_params and the metrics of
    `analyze_checkpoint`, sorted as given."""
    paths = list(paths)
    if labels is None:
        labels = [Path(p).name if Path(p).name not in ("best", "latest")
                  else f"{Path(p).parent.parent.name}/{Path(p).name}" for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"labels: expected {len(paths)} labels (one per path), got "
                         f"{len(labels)}")
    rows = []
    for label, path in zip(labels, paths):
        a = analyze_checkpoint(path, data, batch_size=batch_size)
        rows.append({"label": label, "checkpoint": str(a.checkpoint), "epoch": a.epoch,
                     "split": a.split, **a.metrics})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- history


@dataclasses.dataclass(frozen=True)
class TrainingHistory:
    """A run's per-epoch metrics, read without loading any parameters.

    Attributes:
      history_df: One row per epoch, sorted numerically by `epoch`.
      best_epoch: Epoch of the lowest finite valid_loss (0 if none).
      best_valid_loss: That loss (NaN if none).
      final_train_loss, final_valid_loss: Of the last epoch.
      num_epochs: The last epoch trained.
      diverged: Whether an epoch reported a non-finite loss.
      source: The file(s) read.
    """

    history_df: pd.DataFrame
    best_epoch: int
    best_valid_loss: float
    final_train_loss: float
    final_valid_loss: float
    num_epochs: int
    diverged: bool
    source: str

    def best(self, metric: str = "valid_loss", mode: str = "min") -> tuple[int, float]:
        """(epoch, value) of the best finite `metric`; ties go to the earliest epoch.
        (0, NaN) when no epoch has a finite value."""
        df = self.history_df
        if metric not in df:
            return 0, float("nan")
        vals = pd.to_numeric(df[metric], errors="coerce")
        ok = np.isfinite(vals.to_numpy(dtype=np.float64))
        if not ok.any():
            return 0, float("nan")
        v = vals.to_numpy(dtype=np.float64)
        v = np.where(ok, v if mode == "min" else -v, np.inf)
        i = int(np.argmin(v))  # first occurrence of the minimum = earliest epoch
        return int(df["epoch"].iloc[i]), float(vals.iloc[i])

    def to_dict(self) -> dict:
        return {"best_epoch": self.best_epoch, "best_valid_loss": self.best_valid_loss,
                "final_train_loss": self.final_train_loss,
                "final_valid_loss": self.final_valid_loss, "num_epochs": self.num_epochs,
                "diverged": self.diverged, "source": self.source}


def _history_rows(path: Path) -> tuple[list[dict] | pd.DataFrame, str]:
    """Per-epoch rows of a run, trial or checkpoint directory, from the cheapest source."""
    if (path / "history.csv").is_file():
        try:
            return pd.read_csv(path / "history.csv"), str(path / "history.csv")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise AnalysisError(f"{path / 'history.csv'}: unreadable CSV ({e})") from None
    if (path / ckpt.META_FILE).is_file():
        return list(ckpt.read_meta(path).get("history", [])), str(path / ckpt.META_FILE)
    root = path / "checkpoints"
    metas = []
    if root.is_dir():
        for d in root.iterdir():
            if (d / ckpt.META_FILE).is_file() and not d.name.startswith("."):
                metas.append((d, ckpt.read_meta(d)))
    if not metas:
        raise AnalysisError(f"{path}: no training history (expected history.csv, {ckpt.META_FILE}"
                            " or checkpoints/*/meta.json of a dcmtune run)")
    # The most complete history any checkpoint carries, plus each checkpoint's own epoch row
    # (covers runs whose latest/ is gone but whose epoch_N/ checkpoints remain).
    d, meta = max(metas, key=lambda dm: int(dm[1].get("epoch", 0)))
    rows = {int(r["epoch"]): r for r in meta.get("history", []) if "epoch" in r}
    for _, m in metas:
        if "metrics" in m and "epoch" in m:
            rows.setdefault(int(m["epoch"]), dict(m["metrics"], epoch=int(m["epoch"])))
    return list(rows.values()), f"{root}/*/{ckpt.META_FILE}"


def analyze_training_history(exp_dir: Union[str, Path]) -> TrainingHistory:
    """The per-epoch history of a run (or trial, or checkpoint) directory, in numeric epoch
    order, with the best epoch and final losses. Never loads parameters.

    Raises:
      AnalysisError: the directory is missing or holds no dcmtune history.
    """
    path = Path(exp_dir)
    if not path.is_dir():
        raise AnalysisError(f"{path}: not found; expected a dcmtune run directory (config.json, "
                            "history.csv, checkpoints/)")
    rows, source = _history_rows(path)
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    if df.empty or "epoch" not in df:
        raise AnalysisError(f"{source}: no epochs recorded (expected rows with an 'epoch' "
                            "column)")
    df = df.copy()
    df["epoch"] = pd.to_numeric(df["epoch"], errors="coerce")
    df = df[df["epoch"].notna()]
    df["epoch"] = df["epoch"].astype(int)
    df = (df.drop_duplicates("epoch", keep="last").sort_values("epoch", kind="stable")
          .reset_index(drop=True))
    for col in df.columns:
        if col != "epoch" and df[col].dtype == object:
            converted = pd.to_numeric(df[col], errors="coerce")
            if converted.notna().sum() == df[col].notna().sum():
                df[col] = converted
    last = df.iloc[-1]

    def num(row, key):
        v = row.get(key) if hasattr(row, "get") else None
        try:
            return float(v)
        except (TypeError, ValueError):
            return float("nan")

    diverged = bool("diverged" in df and pd.to_numeric(df["diverged"], errors="coerce")
                    .fillna(0).astype(bool).any())
    for col in ("train_loss", "valid_loss"):
        if col in df:
            diverged |= bool((~np.isfinite(pd.to_numeric(df[col], errors="coerce")
                                            .to_numpy(np.float64))).any())
    h = TrainingHistory(history_df=df, best_epoch=0, best_valid_loss=float("nan"),
                        final_train_loss=num(last, "train_loss"),
                        final_valid_loss=num(last, "valid_loss"), num_epochs=int(last["epoch"]),
                        diverged=diverged, source=source)
    best_epoch, best_loss = h.best("valid_loss", "min")
    return dataclasses.replace(h, best_epoch=best_epoch, best_valid_loss=best_loss)


# --------------------------------------------------------------------------- summaries


def batch_analysis_summary(exp_dir: Union[str, Path], data: Union[ESPData, str, None] = None,
                           output_dir: Union[str, Path, None] = None, *,
                           batch_size: int = 16, data_files=None) -> dict:
    """Analyses a run's best checkpoint and history and writes the results.

    Writes into `output_dir` (default `<exp_dir>/analysis`):
      best_analysis.json    metrics of the best checkpoint (units, per-molecule RMSE, config)
                            and the history summary;
      predictions.csv       one row per evaluated conformer (ESP errors, monopole errors,
                            predicted and reference dipoles);
      training_history.csv  the per-epoch history in numeric epoch order.

    Args:
      exp_dir: A run (or trial) directory, or a checkpoint directory.
      data: What to evaluate on: an ESPData, a split name, or None for the run's test split
        (the validation split when the run has no test split).
      data_files: The run's data files, if they moved (checked by checksum).

    Returns:
      {"analysis": CheckpointAnalysis, "history": TrainingHistory, "files": {name: path}}.
    """
    exp = Path(exp_dir)
    history = analyze_training_history(exp)
    c = load_checkpoint(exp, which="best")
    if data is None:
        has_test = bool((c.split_record or {}).get("indices", {}).get("test"))
        data = "test" if has_test or c.split_record is None else "valid"
    analysis = analyze_checkpoint(c, data, batch_size=batch_size, data_files=data_files)
    out = Path(output_dir) if output_dir is not None else exp / "analysis"
    files = {"best_analysis.json": out / "best_analysis.json",
             "predictions.csv": out / "predictions.csv",
             "training_history.csv": out / "training_history.csv"}
    _io.write_json(files["best_analysis.json"],
                   {**analysis.to_dict(), "history": history.to_dict()})
    _io.write_csv(files["predictions.csv"], analysis.per_conformer)
    _io.write_csv(files["training_history.csv"], history.history_df)
    return {"analysis": analysis, "history": history, "files": files}


# --------------------------------------------------------------------------- CLI


def _parser() -> OneLineParser:
    p = OneLineParser(prog="python -m dcmtune.analysis",
                      description="Evaluate a DCMNet checkpoint (ESP, monopole and dipole "
                                  "errors).")
    p.add_argument("path", help="checkpoint directory, run directory, or a ranking's best_model/")
    p.add_argument("--split", choices=SPLITS, default="test",
                   help="split of the run to evaluate on (default test)")
    p.add_argument("--data", nargs="+", metavar="FILE",
                   help="the run's data files, if they moved (checked by checksum)")
    p.add_argument("--output-dir", type=Path,
                   help="also write best_analysis.json, predictions.csv, training_history.csv")
    p.add_argument("--batch-size", type=int, default=16)
    return p


def _main(args) -> int:
    if args.output_dir is not None:
        res = batch_analysis_summary(args.path, args.split, args.output_dir,
                                     batch_size=args.batch_size, data_files=args.data)
        analysis = res["analysis"]
    else:
        analysis = analyze_checkpoint(args.path, args.split, batch_size=args.batch_size,
                                      data_files=args.data)
    print(print_analysis_summary(analysis))
    if args.output_dir is not None:
        print(f"wrote {', '.join(str(f) for f in res['files'].values())}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m dcmtune.analysis PATH`: evaluate a checkpoint and print the summary.

    Exit 0 on success, 2 on bad input (one line on stderr).
    """
    return run_cli(_main, _parser(), argv,
                   bad_input=(AnalysisError, ckpt.CheckpointError, DataError, ConfigError))


if __name__ == "__main__":
    raise SystemExit(main())
