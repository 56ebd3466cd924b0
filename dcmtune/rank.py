"""`python -m dcmtune.rank EXPERIMENT_DIR`: rank the best checkpoints of a sweep on held-out data.

Reads a sweep experiment as Ray Tune left it under its storage path (`<storage>/<name>/`: one
directory per trial holding the trainer's `config.json`, `split.json`, `history.csv`, its own
`checkpoints/` and Tune's `checkpoint_NNNNNN/` copies, plus `sweep_spec.json`). Only plain
files are read (JSON, CSV, msgpack): no Ray session, no pickle. A directory of plain training
runs (`python -m dcmtune.train` output) ranks the same way.

The rules, so that the number a user publishes was measured on data that chose nothing:

1. Every trial competes at its best epoch by the sweep's validation metric (default
   `valid_esp_rmse`, kcal/mol/e), using the checkpoint saved at that epoch; trials stopped early
   by ASHA compete at their best epoch too. Diverged trials (a non-finite loss at any epoch) and
   failed trials (no checkpoint) are excluded and listed.
2. The winner is the best by that validation metric. The top_k trials' checkpoints are then
   re-evaluated on the test split saved with each trial (after checking the data checksum),
   and the test metrics are reported beside the validation ones; they never reorder anything.
3. Classical baselines are evaluated on the same test conformers: one charge per element fitted
   on the training split (a prediction), and, where the data allow, the stored per-conformer
   ESP-fitted charges (`mono`), one charge set per molecule fitted across its test conformers,
   and Mulliken charges. The two fits to the test ESP itself are not predictions: they bound
   what fixed atom-centred charges can do on these molecules.

Written into the experiment directory: ranking.csv, ranking.json, report.md, four PNG plots
(learning_curves.png, esp_parity.png, per_molecule_rmse.png, hyperparameters.png) and
best_model/ (the winner's checkpoint, config.json, split.json, history.csv, evaluation.json;
`python -m dcmtune.analysis <experiment>/best_model` re-evaluates it).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import pandas as pd

from dcmtune import checkpoint as ckpt
from dcmtune.analysis import (AnalysisError, CheckpointAnalysis, TrainingHistory,
                              analyze_checkpoint, analyze_training_history, checkpoint_data,
                              load_checkpoint, metric_unit)
from dcmtune.config import ConfigError, ExperimentConfig
from dcmtune.data import DataError, ESPData, bundled_dataset_path, load_dataset
from dcmtune.units import HARTREE_TO_KCAL

__all__ = ["RankError", "rank_experiment", "discover_trials", "TrialRecord", "main",
           "OUTPUT_FILES", "PLOT_FILES"]

log = logging.getLogger(__name__)

PLOT_FILES = ("learning_curves.png", "esp_parity.png", "per_molecule_rmse.png",
              "hyperparameters.png")
OUTPUT_FILES = ("ranking.csv", "ranking.json", "report.md") + PLOT_FILES
BEST_MODEL = "best_model"
SPEC_RECORD = "sweep_spec.json"
# Validation metrics copied from the selected epoch into the ranking, beside the sweep metric.
VALID_COLUMNS = ("valid_esp_rmse", "valid_esp_mae", "valid_loss", "valid_mono_mae",
                 "valid_dipole_mae")
# Re-evaluated metrics reported for the ranking split.
EVAL_COLUMNS = ("esp_rmse", "esp_mae", "esp_max_abs_error", "esp_abs_error_p95", "esp_r2",
                "mono_mae", "mono_rmse", "dipole_mae", "n_conformers", "n_molecules")
_NOT_TRIALS = {BEST_MODEL, "checkpoints"}


class RankError(AnalysisError):
    """The experiment cannot be ranked (missing, empty or foreign directory, no usable trial,
    data that is not the sweep's); one line naming the path."""


# --------------------------------------------------------------------------- trials


@dataclasses.dataclass
class TrialRecord:
    """One trial of the experiment, read from its directory without loading parameters.

    Attributes:
      trial_id: Tune's trial id (or the directory name).
      path: The trial directory.
      status: "completed", "stopped early" (ASHA), "errored" (crashed after saving
        checkpoints), "diverged" or "failed".
      point: The searched hyper-parameters (dotted keys) of the trial.
      config: The trial's ExperimentConfig (None if it never started training).
      history: Its TrainingHistory (None if none).
      epochs: Epochs trained. max_epochs: training.num_epochs.
      checkpoint: The checkpoint it competes with (None if none).
      checkpoint_epoch: That checkpoint's epoch.
      value: The validation metric at checkpoint_epoch (NaN if none).
      valid: Validation metrics at checkpoint_epoch.
      reason: Why it is excluded ("" if it is not).
    """

    trial_id: str
    path: Path
    status: str
    point: dict
    config: Optional[ExperimentConfig] = None
    history: Optional[TrainingHistory] = None
    epochs: int = 0
    max_epochs: int = 0
    checkpoint: Optional[Path] = None
    checkpoint_epoch: int = 0
    value: float = float("nan")
    valid: dict = dataclasses.field(default_factory=dict)
    reason: str = ""

    @property
    def eligible(self) -> bool:
        return not self.reason


def _read_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _is_trial_dir(d: Path) -> bool:
    if not d.is_dir() or d.name.startswith(".") or d.name in _NOT_TRIALS:
        return False
    if (d / "config.json").is_file() and ((d / "history.csv").is_file()
                                          or (d / "checkpoints").is_dir()):
        return True
    # A Tune trial dir: params.json; holds dcmtune files unless it failed before training.
    return (d / "params.json").is_file()


def _checkpoint_candidates(trial_dir: Path) -> list[tuple[Path, dict]]:
    """(dir, meta) of every dcmtune checkpoint of a trial: Tune's copies first, then the
    trainer's own (best, latest, epoch_N)."""
    dirs = sorted(trial_dir.glob("checkpoint_*"))
    root = trial_dir / "checkpoints"
    if root.is_dir():
        dirs += [root / "best", root / "latest"] + sorted(root.glob("epoch_*"))
    out = []
    for d in dirs:
        if (d / ckpt.META_FILE).is_file() and (d / ckpt.STATE_FILE).is_file():
            try:
                out.append((d, ckpt.read_meta(d)))
            except ckpt.CheckpointError as e:
                log.warning("skipping %s", e)
    return out


def _error_line(trial_dir: Path) -> str:
    err = trial_dir / "error.txt"
    if not err.is_file():
        return ""
    lines = [ln.strip() for ln in err.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "error.txt present"


def _flat_config(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(_flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_trial(d: Path, metric: str, mode: str) -> TrialRecord:
    params = _read_json(d / "params.json")
    trial_id = d.name[len("trial_"):] if d.name.startswith("trial_") else d.name
    rec = TrialRecord(trial_id=trial_id, path=d, status="failed",
                      point=dict(params) if isinstance(params, dict) else {})
    err = _error_line(d)
    cfg_raw = _read_json(d / "config.json")
    if cfg_raw is not None:
        try:
            rec.config = ExperimentConfig.from_dict(cfg_raw)
            rec.max_epochs = rec.config.training.num_epochs
        except ConfigError as e:
            rec.reason = f"config.json is invalid ({e})"
            return rec
    try:
        rec.history = analyze_training_history(d)
    except (AnalysisError, ckpt.CheckpointError):
        rec.reason = "failed before its first epoch" + (f": {err}" if err else "")
        return rec
    h = rec.history
    rec.epochs = h.num_epochs
    if h.diverged:
        rec.status = "diverged"
        rows = h.history_df
        bad = rows[pd.to_numeric(rows.get("diverged", 0), errors="coerce").fillna(0) > 0]
        at = int(bad["epoch"].iloc[0]) if len(bad) else h.num_epochs
        rec.reason = f"diverged at epoch {at} (non-finite loss)"
    elif rec.max_epochs and rec.epochs >= rec.max_epochs:
        rec.status = "completed"
    elif err:
        rec.status = "errored"
    else:
        rec.status = "stopped early"
    best_epoch, _ = h.best(metric, mode)
    if metric not in h.history_df:
        rec.reason = rec.reason or f"history has no {metric}"
    cands = _checkpoint_candidates(d)
    chosen = next(((c, m) for c, m in cands if int(m.get("epoch", -1)) == best_epoch), None)
    if chosen is None and cands:
        sign = 1.0 if mode == "min" else -1.0

        def score(cm):
            v = cm[1].get("metrics", {}).get(metric)
            return sign * float(v) if v is not None and math.isfinite(float(v)) else math.inf

        chosen = min(cands, key=score)
        if math.isfinite(score(chosen)) and not rec.reason:
            log.warning("trial %s: no checkpoint of its best epoch %d; using epoch %s",
                        trial_id, best_epoch, chosen[1].get("epoch"))
        else:
            chosen = None
    if chosen is None:
        rec.reason = rec.reason or "no checkpoint with a finite " + metric
        if rec.status not in ("diverged",):
            rec.status = "failed"
        return rec
    rec.checkpoint, meta = chosen
    rec.checkpoint_epoch = int(meta.get("epoch", 0))
    m = meta.get("metrics", {})
    v = m.get(metric)
    rec.value = float(v) if v is not None else float("nan")
    if not math.isfinite(rec.value):
        rec.reason = rec.reason or f"{metric} is not finite"
    rec.valid = {k: float(m[k]) for k in (metric,) + VALID_COLUMNS
                 if isinstance(m.get(k), (int, float))}
    return rec


def discover_trials(experiment_dir: Union[str, Path], metric: str = "valid_esp_rmse",
                    mode: str = "min") -> list[TrialRecord]:
    """The trials of an experiment directory, each at its best checkpoint by `metric`.

    Raises:
      RankError: missing, empty or foreign directory (one line saying what was expected).
    """
    exp = Path(experiment_dir)
    expected = ("a dcmtune sweep experiment (<storage_path>/<name>/ with trial directories "
                "holding config.json, history.csv and checkpoints)")
    if not exp.exists():
        raise RankError(f"{exp}: not found; expected {expected}")
    if not exp.is_dir():
        raise RankError(f"{exp}: not a directory; expected {expected}")
    entries = [p for p in exp.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise RankError(f"{exp}: empty directory; expected {expected}")
    trial_dirs = sorted(p for p in entries if _is_trial_dir(p))
    if not trial_dirs:
        nested = sorted(p.name for p in entries
                        if p.is_dir() and any(_is_trial_dir(q) for q in p.iterdir()
                                              if q.is_dir()))
        hint = f" (it holds experiments: {', '.join(nested)}; pass one of them)" if nested \
            else ""
        raise RankError(f"{exp}: no dcmtune trials found; expected {expected}{hint}")
    return [_read_trial(d, metric, mode) for d in trial_dirs]


# --------------------------------------------------------------------------- data and baselines


class _DataCache:
    """Loads each distinct set of data files once, checking it against the trial's split."""

    def __init__(self, data: Optional[ESPData], data_files: Optional[Sequence[str]]):
        self._given = data
        self._files = list(data_files) if data_files else None
        self._loaded: dict[tuple, ESPData] = {}

    def files_of(self, config: ExperimentConfig) -> list[str]:
        return self._files if self._files is not None else list(config.data.data_files)

    def full(self, config: ExperimentConfig) -> ESPData:
        if self._given is not None:
            return self._given
        key = (tuple(self.files_of(config)), config.model.max_atomic_number,
               config.data.dipole_units)
        if key not in self._loaded:
            self._loaded[key] = load_dataset(*key)
        return self._loaded[key]


def _mulliken(files: list[str], data: ESPData) -> Optional[np.ndarray]:
    """(M, A) Mulliken charges from the files' extra `mulliken` key, padded like `data`; None
    if any file lacks it."""
    paths = [Path(f) for f in files] or [bundled_dataset_path()]
    parts = []
    for p in paths:
        try:
            with np.load(p, allow_pickle=False) as z:
                if "mulliken" not in z.files:
                    return None
                q = np.asarray(z["mulliken"], np.float64)
        except (OSError, ValueError):
            return None
        if q.ndim != 2 or q.shape[1] > data.num_atoms:
            return None
        parts.append(np.pad(q, [(0, 0), (0, data.num_atoms - q.shape[1])]))
    q = np.concatenate(parts)
    if q.shape[0] != data.num_conformers:
        return None
    return np.where(data.Z > 0, q, 0.0)


def _baselines(full: ESPData, record: dict, split: str, files: Optional[list[str]]
               ) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Classical charge models on the conformers of `split`.

    Returns:
      (rows {method, fitted_on, esp_rmse, kind, note}, {method: per-conformer ESP MSE
      (Hartree/e)^2}) with esp_rmse defined as the model's (sqrt of the mean over conformers).
    """
    from dcmtune.baselines import (element_charge_array, element_charges,
                                   per_molecule_esp_mse)
    from dcmtune.qm import fit_esp_charges_shared

    idx = np.asarray(record["indices"][split], np.int64)
    target = full.subset(idx)
    rows, per_conf = [], {}

    def add(method, fitted_on, kind, note, charges):
        mse = per_molecule_esp_mse(target, charges)
        per_conf[method] = mse
        rows.append({"method": method, "fitted_on": fitted_on, "kind": kind,
                     f"{split}_esp_rmse": float(np.sqrt(mse.mean()) * HARTREE_TO_KCAL),
                     "note": note})

    train_idx = np.asarray(record["indices"].get("train", []), np.int64)
    if len(train_idx):
        table = element_charges(full.subset(train_idx))
        missing = sorted(set(int(z) for z in np.unique(target.Z) if z > 0) - set(table))
        note = ("one charge per element, least squares on the training split's ESP"
                + (f"; elements {missing} absent from training get 0" if missing else ""))
        add("element charges (LSQ)", "train split", "prediction", note,
            element_charge_array(target, table))
    if target.mono is not None:
        add("per-conformer charges (`mono`)", f"each {split} conformer (data file)",
            "reference charges", "the data file's reference atomic charges; in data made by "
            "`python -m dcmtune.data generate` they are ESP-fitted to each conformer's own "
            "ESP, so not a prediction", target.mono)
    shared = np.zeros(target.Z.shape)
    for mid in np.unique(target.mol_id):
        members = np.flatnonzero(target.mol_id == mid)
        n = int(target.N[members[0]])
        if any(int(target.N[i]) != n or not np.array_equal(target.Z[i], target.Z[members[0]])
               for i in members):
            continue
        q = fit_esp_charges_shared(
            [target.R[i, :n].astype(np.float64) for i in members],
            [target.grid[i, : target.n_grid[i]].astype(np.float64) for i in members],
            [target.esp[i, : target.n_grid[i]].astype(np.float64) for i in members],
            float(target.Q[members[0]]))
        shared[members, :n] = q
    add("one charge set per molecule (LSQ)", f"all {split} conformers of the molecule",
        f"fit to the {split} ESP", "atom-centred charges shared by a molecule's conformers",
        shared)
    if files is not None:
        mull = _mulliken(files, full)
        if mull is not None:
            add("Mulliken charges", "QM wavefunction", "prediction (QM)",
                "from the data file's `mulliken` key", mull[idx])
    return rows, per_conf


# --------------------------------------------------------------------------- ranking


def _spec_settings(exp: Path) -> dict:
    spec = _read_json(exp / SPEC_RECORD)
    return spec if isinstance(spec, dict) else {}


def _searched_keys(spec: dict, trials: list[TrialRecord]) -> list[str]:
    if isinstance(spec.get("search"), dict) and spec["search"]:
        return sorted(spec["search"])
    keys = sorted({k for t in trials for k in t.point})
    if keys:
        return keys
    # Plain runs: the config fields that differ between them.
    flats = [_flat_config(t.config.to_dict()) for t in trials if t.config is not None]
    skip = {"name", "output_dir", "created_at", "git_commit", "notes", "description"}
    return sorted(k for k in (flats[0] if flats else {})
                  if k not in skip and len({json.dumps(f.get(k)) for f in flats}) > 1)


def _point_of(t: TrialRecord, keys: list[str]) -> dict:
    flat = _flat_config(t.config.to_dict()) if t.config is not None else {}
    return {k: t.point.get(k, flat.get(k)) for k in keys}


def rank_experiment(experiment_dir: Union[str, Path], top_k: Optional[int] = None,
                    split: Optional[str] = None,
                    data_files: Optional[Sequence[Union[str, Path]]] = None, *,
                    data: Optional[ESPData] = None, metric: Optional[str] = None,
                    mode: Optional[str] = None, batch_size: int = 16,
                    write: bool = True) -> pd.DataFrame:
    """Ranks the trials of a sweep by their best validation metric and re-evaluates the
    top_k on held-out data; writes the report (see the module docstring).

    Args:
      experiment_dir: <storage_path>/<name> of a sweep (or a directory of training runs).
      top_k: Trials to re-evaluate and list (default: the spec's rank.top_k, else 5).
      split: "test" (default: the spec's rank.split) or "valid".
      data_files: The sweep's data files, if they moved (default: each trial's own
        data.data_files, empty = the bundled demo set). Checked by checksum.
      data: The sweep's full dataset, if already in memory (the sweep passes it).
      metric, mode: Selection metric (default: the spec's run.metric/run.mode, else
        valid_esp_rmse/min). Must be a validation metric.
      write: Write ranking.csv, ranking.json, report.md, plots and best_model/.

    Returns:
      The ranking: top_k rows ordered by the validation metric (rank 1 = winner), with the
      searched hyper-parameters, validation metrics at the chosen epoch and `{split}_*`
      metrics re-evaluated from the checkpoint. `df.attrs` holds the winner, the excluded
      trials, the baselines and the written files.

    Raises:
      RankError: one line naming the path, for every problem with the input (directory,
        trials, checkpoints, data).
    """
    try:
        return _rank_experiment(Path(experiment_dir), top_k, split, data_files, data, metric,
                                mode, batch_size, write)
    except RankError:
        raise
    except (AnalysisError, ckpt.CheckpointError, DataError, ConfigError) as e:
        raise RankError(str(e)) from None


def _rank_experiment(exp: Path, top_k, split, data_files, data, metric, mode, batch_size,
                     write) -> pd.DataFrame:
    spec = _spec_settings(exp) if exp.is_dir() else {}
    run, rank_spec = spec.get("run", {}), spec.get("rank", {})
    metric = metric or run.get("metric") or "valid_esp_rmse"
    mode = mode or run.get("mode") or "min"
    top_k = int(top_k if top_k is not None else rank_spec.get("top_k", 5))
    split = split or rank_spec.get("split") or "test"
    if not metric.startswith("valid_"):
        raise RankError(f"metric: the winner is chosen on the validation split, so expected a "
                        f"valid_* metric, got {metric!r}")
    if mode not in ("min", "max"):
        raise RankError(f"mode: expected min or max, got {mode!r}")
    if top_k < 1:
        raise RankError(f"top_k: expected at least 1, got {top_k}")
    if split not in ("test", "valid"):
        raise RankError(f"split: expected test or valid, got {split!r}")

    # 1. Trials at their best checkpoints; the eligible ones ordered by the validation metric.
    trials = discover_trials(exp, metric, mode)
    eligible = [t for t in trials if t.eligible]
    excluded = [t for t in trials if not t.eligible]
    if not eligible:
        listing = "; ".join(f"{t.trial_id}: {t.reason}" for t in excluded[:3])
        raise RankError(f"{exp}: no trial can be ranked ({len(trials)} trials; {listing})")
    sign = 1.0 if mode == "min" else -1.0
    eligible.sort(key=lambda t: (sign * t.value, t.trial_id))
    top = eligible[:top_k]
    if len(top) < top_k:
        log.warning("%s: only %d rankable trials for top_k = %d", exp, len(top), top_k)
    keys = _searched_keys(spec, trials)

    for t in top:
        rec = _read_json(t.path / "split.json") or {}
        if split in rec.get("indices", {}) and not rec["indices"][split]:
            raise RankError(f"{t.path}: the {split} split is empty (data.{split}_fraction = 0 "
                            f"in the sweep); rank with --split "
                            f"{'valid' if split == 'test' else 'test'}")

    # 2. Re-evaluate the top trials on their saved split (checksum-checked).
    cache = _DataCache(data, [str(f) for f in data_files] if data_files else None)
    rows, analyses, checks = [], [], []
    for rank, t in enumerate(top, start=1):
        c = load_checkpoint(t.checkpoint)
        full = cache.full(c.config)
        sub = checkpoint_data(c, split, data=full)
        idx = np.asarray(c.split_record["indices"][split]) if c.split_record else None
        a = analyze_checkpoint(c, sub, batch_size=batch_size, indices=idx)
        a.split = split
        analyses.append((t, c, a))
        if split == "test":  # the checkpoint is the one that scored the recorded value
            short = metric[len("valid_"):]
            v = analyze_checkpoint(c, checkpoint_data(c, "valid", data=full),
                                   batch_size=batch_size)
            if short in v.metrics:
                checks.append({"trial_id": t.trial_id, "metric": metric, "recorded": t.value,
                               "re_evaluated": v.metrics[short]})
                if not math.isclose(v.metrics[short], t.value, rel_tol=1e-4, abs_tol=1e-9):
                    log.warning("trial %s: %s re-evaluated as %.6g, recorded %.6g", t.trial_id,
                                metric, v.metrics[short], t.value)
        row = {"rank": rank, "trial_id": t.trial_id, "status": t.status, "epochs": t.epochs,
               "max_epochs": t.max_epochs, "checkpoint_epoch": t.checkpoint_epoch,
               **_point_of(t, keys), metric: t.value}
        row.update({k: v for k, v in t.valid.items() if k not in row})
        for name in EVAL_COLUMNS:
            col = f"{split}_{name}"
            if col not in row:
                row[col] = a.metrics.get(name, float("nan"))
        row["n_params"] = a.metrics["n_params"]
        row["checkpoint"] = str(t.checkpoint)
        rows.append(row)
    df = pd.DataFrame(rows)

    # 3. Baselines on the winner's split.
    winner_t, winner_c, winner_a = analyses[0]
    full = cache.full(winner_c.config)
    files = cache.files_of(winner_c.config)
    if data is not None and not data_files and not _files_hold(files, winner_c, data):
        files = None  # the in-memory data is not these files: no Mulliken charges from them
    baselines, baseline_mse = ([], {})
    if winner_c.split_record is not None:
        baselines, baseline_mse = _baselines(full, winner_c.split_record, split, files)
    splits_differ = len({json.dumps(c.split_record.get("indices") if c.split_record else None)
                         for _, c, _ in analyses}) > 1
    if splits_differ:
        log.warning("%s: the ranked trials were evaluated on different %s splits; their %s "
                    "metrics are not directly comparable", exp, split, split)

    info = {
        "experiment": str(exp.resolve()), "name": spec.get("name", exp.name),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "metric": metric, "mode": mode, "split": split, "top_k": top_k,
        "data": _data_info(winner_c, full, files),
        "winner": {**rows[0], "best_model": str(exp / BEST_MODEL)},
        "trials": [_trial_summary(t, keys) for t in trials],
        "excluded": [{"trial_id": t.trial_id, "status": t.status, "reason": t.reason}
                     for t in excluded],
        "baselines": baselines, "checks": checks, "searched": keys,
        "splits_differ": splits_differ,
    }
    df.attrs.update({k: info[k] for k in ("winner", "excluded", "baselines", "metric", "split")})
    if not write:
        return df

    # 4. Files.
    exp_res = exp.resolve()
    _write_best_model(exp_res, winner_t, winner_c, winner_a, info)
    plots = _plots(exp_res, spec, trials, top, analyses, keys, metric, mode, split,
                   baseline_mse)
    info["plots"] = plots
    info["versions"] = ckpt.package_versions()
    _write_csv(df, exp_res / "ranking.csv")
    ckpt.write_json_atomic(exp_res / "ranking.json", {**info, "ranking": rows})
    _atomic_text(exp_res / "report.md", _report(info, df, keys, plots, winner_a))
    df.attrs["files"] = [str(exp_res / f) for f in ("ranking.csv", "ranking.json",
                                                    "report.md", *plots, BEST_MODEL)]
    return df


def _files_hold(files: list[str], c, data: ESPData) -> bool:
    """Whether `files` (a run's data_files) load to exactly `data`."""
    try:
        return load_dataset(files, c.config.model.max_atomic_number,
                            c.config.data.dipole_units).checksum() == data.checksum()
    except DataError:
        return False


def _trial_summary(t: TrialRecord, keys: list[str]) -> dict:
    return {"trial_id": t.trial_id, "status": t.status, "epochs": t.epochs,
            "checkpoint_epoch": t.checkpoint_epoch, "value": t.value,
            "eligible": t.eligible, "reason": t.reason, "point": _point_of(t, keys),
            "path": str(t.path)}


def _data_info(c, full: ESPData, files: Optional[list[str]]) -> dict:
    rec = c.split_record or {}
    sizes = {}
    for s, idx in rec.get("indices", {}).items():
        idx = np.asarray(idx, np.int64)
        sizes[s] = {"conformers": int(len(idx)),
                    "molecules": sorted(set(full.mol_id[idx].tolist())) if len(idx) else []}
    elements = {s: set(int(z) for z in np.unique(full.Z[np.asarray(idx, np.int64)]) if z > 0)
                for s, idx in rec.get("indices", {}).items() if len(idx)}
    unseen = {s: sorted(e - elements.get("train", set())) for s, e in elements.items()
              if s != "train" and e - elements.get("train", set())}
    return {"files": files if files is not None else "(passed in memory)",
            "checksum": rec.get("checksum") or c.meta.get("data_checksum"),
            "split_by": c.config.data.split_by, "split_seed": c.config.data.split_seed,
            "splits": sizes, "elements_not_in_train": unseen}


# --------------------------------------------------------------------------- writing


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _write_best_model(exp: Path, t: TrialRecord, c, a: CheckpointAnalysis, info: dict) -> Path:
    """<exp>/best_model/: the winner's checkpoint files, config, split, history, evaluation."""
    target = exp / BEST_MODEL
    with ckpt.atomic_directory(target) as tmp:
        for name in (ckpt.STATE_FILE, ckpt.META_FILE):
            shutil.copy2(c.path / name, tmp / name)
        ckpt.write_json_atomic(tmp / "config.json", c.config.to_dict())
        if c.split_record is not None:
            ckpt.write_json_atomic(tmp / "split.json", c.split_record)
        if (t.path / "history.csv").is_file():
            shutil.copy2(t.path / "history.csv", tmp / "history.csv")
        ckpt.write_json_atomic(tmp / "evaluation.json", {
            "trial_id": t.trial_id, "source_checkpoint": str(c.path), "epoch": c.epoch,
            "selected_by": {"metric": info["metric"], "mode": info["mode"], "value": t.value},
            "split": info["split"], "metrics": {f"{info['split']}_{k}": v
                                                for k, v in a.metrics.items()},
            "data_checksum": info["data"]["checksum"],
            "reproduce": f"python -m dcmtune.analysis {target} --split {info['split']}"})
    return target


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "–"
        return f"{v:.{digits}g}"
    return str(v)


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _label(name: str) -> str:
    unit = metric_unit(name)
    return f"{name} [{unit}]" if unit else name


_PRETTY = {"esp_rmse": "ESP RMSE", "esp_mae": "ESP MAE", "loss": "loss",
           "mono_mae": "monopole MAE", "mono_rmse": "monopole RMSE",
           "dipole_mae": "dipole MAE"}


def _axis_label(metric: str) -> str:
    """`valid_esp_rmse` -> `ESP RMSE (kcal/mol/e)` for plot axes."""
    short = metric.split("_", 1)[1] if metric.startswith(("valid_", "train_", "test_")) \
        else metric
    unit = metric_unit(metric)
    name = _PRETTY.get(short, short)
    return f"{name} ({unit})" if unit else name


def _files_text(files) -> str:
    if not isinstance(files, list):
        return str(files)
    return ", ".join(f"`{f}`" for f in files) if files else "the bundled demo set"


def _report(info: dict, df: pd.DataFrame, keys: list[str], plots: list[str],
            winner: CheckpointAnalysis) -> str:
    metric, split = info["metric"], info["split"]
    w = info["winner"]
    d = info["data"]
    trials = info["trials"]
    n_stopped = sum(t["status"] == "stopped early" for t in trials)
    n_rankable = sum(t["eligible"] for t in trials)
    lines = [
        f"# Ranking of sweep `{info['name']}`", "",
        f"Experiment: `{info['experiment']}`  ",
        f"Ranked: {info['created']}", "",
        "## How the winner was chosen", "",
        f"Trials are ranked by their best **{metric}** ({info['mode']}) on the validation split, "
        "each at the epoch whose checkpoint was saved (trials stopped early by ASHA compete at "
        "their best epoch). The winner is rank 1. The top trials' checkpoints were then "
        f"re-evaluated on the **{split}** split saved with each trial"
        + (": those molecules played no part in training or in choosing the model."
           if split == "test" else " (the validation split also chose the model: these "
           "numbers are not an unbiased estimate).")
        + " Diverged and failed trials are excluded.", "",
        f"{len(trials)} trials: {n_rankable} rankable ({n_stopped} stopped early by the "
        f"scheduler), {len(info['excluded'])} excluded.", "",
        "## Data", "",
        f"Files: {_files_text(d['files'])}  ",
        f"Checksum: `{(d['checksum'] or '')[:16]}`; split by {d['split_by']} "
        f"(split_seed {d['split_seed']})", "",
    ]
    lines.append(_md_table(
        ["split", "conformers", "molecules"],
        [[s, v["conformers"], f"{len(v['molecules'])}: " + ", ".join(v["molecules"][:12])
          + (" …" if len(v["molecules"]) > 12 else "")] for s, v in d["splits"].items()]))
    for s_, z in d.get("elements_not_in_train", {}).items():
        lines += ["", f"**Note:** the {s_} split holds elements the training split never shows "
                  f"(atomic numbers {', '.join(map(str, z))}); the model has to guess their "
                  "charges, so expect large errors on those molecules."]
    lines += ["", "## Winner", "",
              f"Trial **{w['trial_id']}** ({w['status']}, {w['epochs']} of {w['max_epochs']} "
              f"epochs trained), checkpoint of epoch {w['checkpoint_epoch']}, "
              f"{w['n_params']} parameters, copied to `{BEST_MODEL}/`.", ""]
    if keys:
        lines.append(_md_table(["hyper-parameter", "value"], [[k, w.get(k)] for k in keys]))
        lines.append("")
    m = winner.metrics
    metric_rows = []
    for name in ("esp_rmse", "esp_mae", "esp_max_abs_error", "esp_abs_error_p95", "esp_r2",
                 "esp_pearson_r", "mono_mae", "mono_rmse", "dipole_mae",
                 "dipole_magnitude_mae"):
        unit = metric_unit(name)
        metric_rows.append([name, unit or "–", w.get(f"valid_{name}"), m.get(name)])
    lines.append(_md_table(["metric", "unit", "valid (recorded at that epoch)",
                            f"{split} (re-evaluated)"], metric_rows))
    lines += ["", f"## Top {len(df)} trials", ""]
    cols = (["rank", "trial_id", "status", "epochs", "checkpoint_epoch"] + keys + [metric]
            + [c for c in (f"{split}_esp_rmse", f"{split}_esp_mae", f"{split}_mono_mae",
                           f"{split}_dipole_mae") if c != metric and c in df])
    lines.append(_md_table([_label(c) for c in cols], df[cols].values.tolist()))
    lines += ["", "ESP in kcal/mol/e, charges in e, dipoles in Debye. "
              "Full table: `ranking.csv`; everything: `ranking.json`.", ""]
    if info["baselines"]:
        lines += [f"## Classical baselines on the same {split} conformers", ""]
        brows = [["DCMNet (winner)", "train split (selected on valid)", "prediction",
                  m["esp_rmse"]]]
        brows += [[b["method"], b["fitted_on"], b["kind"], b[f"{split}_esp_rmse"]]
                  for b in info["baselines"]]
        lines.append(_md_table(["method", "fitted on", "kind", f"{split} ESP RMSE [kcal/mol/e]"],
                               brows))
        lines += ["", "Fits to the evaluated ESP itself are not predictions: they show what "
                  "fixed atom-centred charges can reach on these molecules at best. ESP RMSE "
                  "is defined as for the model (root of the mean over conformers of each "
                  "conformer's mean squared error).", ""]
        notes = [f"- {b['method']}: {b['note']}" for b in info["baselines"] if b.get("note")]
        lines += notes + [""]
    if info["excluded"]:
        lines += ["## Excluded trials", ""]
        lines.append(_md_table(["trial", "status", "reason"],
                               [[e["trial_id"], e["status"], e["reason"]]
                                for e in info["excluded"]]))
        lines.append("")
    if info.get("splits_differ"):
        lines += [f"**Warning:** the ranked trials used different {split} splits; their "
                  f"{split} metrics are not directly comparable.", ""]
    lines += ["## Plots", ""]
    captions = {
        "learning_curves.png": "Learning curves of the top trials",
        "esp_parity.png": f"Winner: predicted vs reference ESP on the {split} split",
        "per_molecule_rmse.png": f"ESP RMSE per {split} molecule, winner and baselines",
        "hyperparameters.png": f"Searched hyper-parameters vs {metric}",
    }
    for p in plots:
        lines += [f"![{captions.get(p, p)}]({p})", ""]
    lines += ["## Reproduce", "", "```",
              f"python -m dcmtune.analysis {Path(info['experiment']) / BEST_MODEL} --split {split}",
              "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def _plots(exp: Path, spec: dict, trials, top, analyses, keys, metric, mode, split,
           baseline_mse) -> list[str]:
    out = []
    _plot_learning_curves(exp / PLOT_FILES[0], top, metric, spec.get("name", exp.name))
    out.append(PLOT_FILES[0])
    t, _, a = analyses[0]
    _plot_parity(exp / PLOT_FILES[1], a, t, split)
    out.append(PLOT_FILES[1])
    _plot_per_molecule(exp / PLOT_FILES[2], a, t, split, baseline_mse)
    out.append(PLOT_FILES[2])
    if keys:
        _plot_hparams(exp / PLOT_FILES[3], spec, trials, top, keys, metric, mode)
        out.append(PLOT_FILES[3])
    return out


def _plot_learning_curves(path: Path, top, metric: str, name: str) -> None:
    fig = _figure(10, 5)
    ax = fig.add_subplot()
    train_metric = "train_" + metric[len("valid_"):]
    colors = [f"C{i % 10}" for i in range(len(top))]
    positive = True
    for i, (t, color) in enumerate(zip(top, colors), start=1):
        df = t.history.history_df
        ep = df["epoch"].to_numpy()
        v = pd.to_numeric(df[metric], errors="coerce").to_numpy(np.float64)
        positive &= bool(np.all(v[np.isfinite(v)] > 0))
        ax.plot(ep, v, "-o", ms=3, color=color, label=f"#{i} {t.trial_id} (valid)")
        if train_metric in df:
            tr = pd.to_numeric(df[train_metric], errors="coerce").to_numpy(np.float64)
            positive &= bool(np.all(tr[np.isfinite(tr)] > 0))
            ax.plot(ep, tr, "--", color=color, alpha=0.6, label=f"#{i} {t.trial_id} (train)")
        ax.plot([t.checkpoint_epoch], [t.value], marker="*", ms=14, color=color, mec="k",
                ls="none", label="selected checkpoint" if i == 1 else None)
    if positive:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(_axis_label(metric))
    ax.set_title(f"Learning curves of the top {len(top)} trials of {name}\n"
                 f"solid: validation, dashed: training; star: checkpoint ranked")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    _save(fig, path)


def _plot_parity(path: Path, a: CheckpointAnalysis, t: TrialRecord, split: str) -> None:
    ref, pred = a.esp_points()
    fig = _figure(6.5, 6)
    ax = fig.add_subplot()
    lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
    pad = 0.03 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    if len(ref) > 3000:
        hb = ax.hexbin(ref, pred, gridsize=70, bins="log", mincnt=1, cmap="viridis",
                       extent=(lo, hi, lo, hi))
        fig.colorbar(hb, ax=ax, label="grid points per bin")
    else:
        ax.scatter(ref, pred, s=6, alpha=0.5, label="grid points")
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel("reference ESP (kcal/mol/e)")
    ax.set_ylabel("predicted ESP (kcal/mol/e)")
    m = a.metrics
    ax.set_title(f"Winner {t.trial_id} (epoch {a.epoch}): ESP on the {split} split\n"
                 f"{m['n_conformers']} conformers of {m['n_molecules']} molecules, "
                 f"{m['n_grid_points']} grid points")
    ax.text(0.03, 0.97, f"RMSE {m['esp_rmse']:.3f} kcal/mol/e\nMAE {m['esp_mae']:.3f} "
            f"kcal/mol/e\nR² {m['esp_r2']:.4f}", transform=ax.transAxes, va="top",
            bbox=dict(boxstyle="round", fc="white", alpha=0.8))
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def _per_molecule_rmse(mol_id: np.ndarray, mse: np.ndarray) -> pd.Series:
    s = pd.Series(mse).groupby(pd.Series(mol_id)).mean()
    return np.sqrt(s) * HARTREE_TO_KCAL


def _plot_per_molecule(path: Path, a: CheckpointAnalysis, t: TrialRecord, split: str,
                       baseline_mse: dict) -> None:
    model = a.per_molecule.set_index("mol_id")["esp_rmse"].sort_values()
    mols = list(model.index)
    fig = _figure(10.5, max(3.0, 0.45 * len(mols) + 1.8))
    ax = fig.add_subplot()
    y = np.arange(len(mols))
    ax.barh(y, model.to_numpy(), color="C0", alpha=0.8, label=f"DCMNet winner {t.trial_id}")
    markers = ["o", "s", "D", "^", "v"]
    for i, (method, mse) in enumerate(baseline_mse.items()):
        per = _per_molecule_rmse(a.data.mol_id, mse).reindex(mols)
        ax.plot(per.to_numpy(), y, ls="none", marker=markers[i % len(markers)],
                color=f"C{i + 1}", mec="k", label=method.replace("`", ""))
    ax.set_yticks(y)
    ax.set_yticklabels(mols)
    ax.set_xlabel("ESP RMSE over the molecule's conformers (kcal/mol/e)")
    ax.set_title(f"ESP RMSE per {split} molecule ({a.metrics['n_conformers']} conformers of "
                 f"{len(mols)} molecules)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    _save(fig, path)


def _plot_hparams(path: Path, spec: dict, trials, top, keys: list[str], metric: str,
                  mode: str) -> None:
    search = spec.get("search") or {}
    n = len(keys)
    ncol = min(n, 3)
    nrow = math.ceil(n / ncol)
    fig = _figure(4.3 * ncol, 3.6 * nrow + 0.9)
    top_ids = {t.trial_id for t in top}
    winner = top[0].trial_id
    finite = [t for t in trials if math.isfinite(t.value)]
    for j, key in enumerate(keys):
        ax = fig.add_subplot(nrow, ncol, j + 1)
        kind = next(iter(search.get(key, {})), None)
        vals = [t.point.get(key, _point_of(t, [key])[key]) for t in finite]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
        if kind == "choice" or not numeric:
            cats = list(search[key]["choice"]) if kind == "choice" else sorted(
                {json.dumps(v) for v in vals})
            cats = [c if kind == "choice" else json.loads(c) for c in cats]
            pos = {json.dumps(c): i for i, c in enumerate(cats)}
            rng = np.random.default_rng(0)
            xs = [pos.get(json.dumps(v), np.nan) + rng.uniform(-0.12, 0.12) for v in vals]
            ax.set_xticks(range(len(cats)))
            ax.set_xticklabels([str(c) for c in cats])
        else:
            xs = [float(v) for v in vals]
            positive = all(x > 0 for x in xs)
            bounds = search.get(key, {}).get(kind) if kind else None
            log_x = kind == "loguniform" or (kind is None and positive and xs
                                             and max(xs) / min(xs) > 20)
            if log_x:
                from matplotlib.ticker import NullFormatter

                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
            if bounds and len(bounds) >= 2:  # the searched range, a little margin
                lo, hi = float(bounds[0]), float(bounds[1])
                if log_x:
                    ax.set_xlim(lo / 1.2, hi * 1.2)
                else:
                    ax.set_xlim(lo - 0.04 * (hi - lo), hi + 0.04 * (hi - lo))
        groups = {
            "other trials": [i for i, t in enumerate(finite) if t.eligible
                             and t.trial_id not in top_ids],
            f"top {len(top)}": [i for i, t in enumerate(finite) if t.trial_id in top_ids
                                and t.trial_id != winner],
            "winner": [i for i, t in enumerate(finite) if t.trial_id == winner],
            "excluded (diverged/failed)": [i for i, t in enumerate(finite) if not t.eligible],
        }
        style = {"other trials": dict(marker="o", color="0.6"),
                 f"top {len(top)}": dict(marker="o", color="C0", mec="k"),
                 "winner": dict(marker="*", color="C3", ms=14, mec="k"),
                 "excluded (diverged/failed)": dict(marker="x", color="C1")}
        for label, idx in groups.items():
            if idx:
                ax.plot([xs[i] for i in idx], [finite[i].value for i in idx], ls="none",
                        label=label, **{"ms": 7, **style[label]})
        ax.set_xlabel(key + (f" ({kind})" if kind else ""))
        ax.set_ylabel(f"best validation {_axis_label(metric)}")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    handles = {}
    for ax in fig.axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.suptitle(f"Searched hyper-parameters vs best {metric} "
                 f"({'lower' if mode == 'min' else 'higher'} is better); "
                 f"{len(finite)} trials, each at its best epoch")
    fig.legend(list(handles.values()), list(handles), loc="lower center",
               ncol=len(handles), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    _save(fig, path)


# --------------------------------------------------------------------------- CLI


def format_ranking(df: pd.DataFrame) -> str:
    """The ranking as a console table, the winner, the baselines and the report path."""
    metric, split = df.attrs["metric"], df.attrs["split"]
    cols = [c for c in ("rank", "trial_id", "status", "checkpoint_epoch", metric,
                        f"{split}_esp_rmse", f"{split}_esp_mae", f"{split}_mono_mae")
            if c in df]
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        lines = [df[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}")]
    w = df.attrs["winner"]
    lines.append(f"\nwinner: trial {w['trial_id']} ({metric} {w[metric]:.4g}; {split}_esp_rmse "
                 f"{w[f'{split}_esp_rmse']:.4g} kcal/mol/e) -> {w['best_model']}")
    for b in df.attrs["baselines"]:
        lines.append(f"  baseline {b['method']:<36} {split}_esp_rmse "
                     f"{b[f'{split}_esp_rmse']:.4g}")
    if df.attrs["excluded"]:
        lines.append("excluded: " + ", ".join(f"{e['trial_id']} ({e['reason']})"
                                              for e in df.attrs["excluded"]))
    report = [f for f in df.attrs.get("files") or [] if f.endswith("report.md")]
    if report:
        lines.append(f"report: {report[0]}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m dcmtune.rank EXPERIMENT_DIR`: exit 0 done, 2 bad input (one line)."""
    from dcmtune.cli import OneLineParser

    p = OneLineParser(prog="python -m dcmtune.rank",
                description="Rank the best checkpoints of a dcmtune sweep on its held-out "
                            "test split and write ranking.csv/json, report.md, plots and "
                            "best_model/ into the experiment directory.")
    p.add_argument("experiment_dir", type=Path, help="<storage_path>/<name> of a sweep")
    p.add_argument("--top-k", type=int, help="trials to re-evaluate (default: the spec's "
                                             "rank.top_k, else 5)")
    p.add_argument("--split", choices=("test", "valid"),
                   help="held-out split to report (default: the spec's rank.split, else test)")
    p.add_argument("--data", nargs="+", metavar="FILE",
                   help="the sweep's .npz files, if they moved (checked by checksum)")
    p.add_argument("--batch-size", type=int, default=16, help="conformers per forward pass")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        df = rank_experiment(args.experiment_dir, top_k=args.top_k, split=args.split,
                             data_files=args.data, batch_size=args.batch_size)
    except RankError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_ranking(df))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
