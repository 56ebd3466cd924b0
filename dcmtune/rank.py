"""`python -m dcmtune.rank EXPERIMENT_DIR`: rank the best checkpoints of a sweep on held-out data.

Reads a sweep experiment as Ray Tune left it under its storage path (`<storage>/<name>/`: one
directory per trial holding the trainer's `config.json`, `split.json`, `history.csv`, its own
`checkpoints/` and Tune's `checkpoint_NNNNNN/` copies, plus `sweep_spec.json`). Only plain
files are read (JSON, CSV, msgpack): no Ray session, no pickle. A directory of plain training
runs (`python -m dcmtune.train` output) ranks the same way. An experiment in an object store
(`s3://bucket/path/name?endpoint_override=...`, see `dcmtune.storage`) is read into a local
copy without the checkpoints' state files; only those of the top_k checkpoints re-evaluated are
downloaded, and the outputs below are uploaded into the experiment.

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

Written into the experiment directory: ranking.csv, ranking.json, best_model/ (the winner's
checkpoint, config.json, split.json, history.csv, evaluation.json; `python -m dcmtune.analysis
<experiment>/best_model` re-evaluates it), and, drawn by `dcmtune.report`, report.md and the
PNG plots (learning_curves.png, esp_parity.png, per_molecule_rmse.png, hyperparameters.png,
param_importances.png: Optuna's importances of the searched hyper-parameters).
Metric names and units are those of `dcmtune.metrics`; the baselines are `dcmtune.baselines`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import pandas as pd

from dcmtune import _io
from dcmtune import checkpoint as ckpt
from dcmtune import metrics, report, storage, study
from dcmtune.analysis import (AnalysisError, CheckpointAnalysis, DataCache, LoadedCheckpoint,
                              TrainingHistory, analyze_checkpoint, analyze_training_history,
                              checkpoint_data, load_checkpoint, split_summary)
from dcmtune.baselines import split_baselines
from dcmtune.config import ConfigError, ExperimentConfig, flat_dict
from dcmtune.data import DataError, ESPData
from dcmtune.cli import OneLineParser, run_cli
from dcmtune.report import PLOT_FILES, format_ranking

__all__ = ["RankError", "RankSettings", "rank_experiment", "discover_trials", "TrialRecord",
           "main", "OUTPUT_FILES", "PLOT_FILES"]

log = logging.getLogger(__name__)

OUTPUT_FILES = ("ranking.csv", "ranking.json", "report.md") + PLOT_FILES
BEST_MODEL = "best_model"
SPEC_RECORD = "sweep_spec.json"
# Validation metrics copied from the selected epoch into the ranking, beside the sweep metric:
# every validation metric a sweep may select on.
VALID_COLUMNS = tuple(m for m in metrics.SWEEP_METRICS if metrics.split_of(m) == "valid")
# Re-evaluated metrics reported for the ranking split (`{split}_` + name).
EVAL_COLUMNS = metrics.EVAL_METRICS
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
      skipped: Checkpoints of the trial that failed their checksums or could not be read
        ("path: reason"), passed over for the next candidate.
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
    skipped: list = dataclasses.field(default_factory=list)

    @property
    def eligible(self) -> bool:
        return not self.reason


def _read_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _is_trial_dir(d: Path) -> bool:
    if not d.is_dir() or d.name.startswith(".") or d.name in _NOT_TRIALS:
        return False
    if (d / "config.json").is_file() and ((d / "history.csv").is_file()
                                          or (d / "checkpoints").is_dir()):
        return True
    # A Tune trial dir: params.json; holds dcmtune files unless it failed before training.
    return (d / "params.json").is_file()


def _error_line(trial_dir: Path) -> str:
    err = trial_dir / "error.txt"
    if not err.is_file():
        return ""
    lines = [ln.strip() for ln in err.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "error.txt present"


def _read_trial(d: Path, metric: str, mode: str, lazy: bool = False) -> TrialRecord:
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
    cands = ckpt.checkpoint_candidates(d, rec.skipped, verify_state=not lazy)
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
                    mode: str = "min", lazy: bool = False) -> list[TrialRecord]:
    """The trials of an experiment directory, each at its best checkpoint by `metric`
    (`lazy`: checkpoints are chosen by their meta.json; their state files come later).

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
    return [_read_trial(d, metric, mode, lazy) for d in trial_dirs]


# --------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class RankSettings:
    """How one experiment is ranked, resolved once from the arguments and the sweep spec.

    Attributes:
      experiment: The experiment directory.
      name: The sweep's name (the directory's name without a spec).
      search: The spec's search space (dotted key -> {kind: arguments}); {} without a spec.
      metric, mode: Selection metric on the validation split (`valid_*`) and "min"/"max".
      top_k: Trials re-evaluated and listed (>= 1).
      split: The held-out split re-evaluated, "test" or "valid".
      batch_size: Conformers per forward pass.
      data_files: The sweep's data files if they moved (None: each run's own).
    """

    experiment: Path
    name: str
    search: dict
    metric: str = "valid_esp_rmse"
    mode: str = "min"
    top_k: int = 5
    split: str = "test"
    batch_size: int = 16
    data_files: Optional[tuple[str, ...]] = None

    def __post_init__(self):
        if not self.metric.startswith("valid_"):
            raise RankError(f"metric: the winner is chosen on the validation split, so expected "
                            f"a valid_* metric, got {self.metric!r}")
        if self.mode not in ("min", "max"):
            raise RankError(f"mode: expected min or max, got {self.mode!r}")
        if self.top_k < 1:
            raise RankError(f"top_k: expected at least 1, got {self.top_k}")
        if self.split not in ("test", "valid"):
            raise RankError(f"split: expected test or valid, got {self.split!r}")


def _settings(exp: Path, top_k: Optional[int], split: Optional[str],
              data_files: Optional[Sequence[Union[str, Path]]], metric: Optional[str],
              mode: Optional[str], batch_size: int) -> RankSettings:
    """Arguments first, then the spec's run/rank sections, then the defaults."""
    spec = _read_json(exp / SPEC_RECORD) if exp.is_dir() else None
    spec = spec if isinstance(spec, dict) else {}
    run, rank_spec = spec.get("run", {}), spec.get("rank", {})
    search = spec.get("search")
    return RankSettings(
        experiment=exp, name=spec.get("name", exp.resolve().name),
        search=search if isinstance(search, dict) else {},
        metric=metric or run.get("metric") or "valid_esp_rmse",
        mode=mode or run.get("mode") or "min",
        top_k=int(top_k if top_k is not None else rank_spec.get("top_k", 5)),
        split=split or rank_spec.get("split") or "test", batch_size=batch_size,
        data_files=tuple(str(f) for f in data_files) if data_files else None)


# --------------------------------------------------------------------------- ranking


@dataclasses.dataclass(frozen=True)
class Evaluated:
    """One of the top trials with its checkpoint re-evaluated on the ranking split."""

    trial: TrialRecord
    checkpoint: LoadedCheckpoint
    analysis: CheckpointAnalysis


@dataclasses.dataclass(frozen=True)
class Ranking:
    """Everything a ranking decided and measured (what `dcmtune.report` presents).

    Attributes:
      settings: How it was ranked.
      top: The top_k eligible trials, re-evaluated, in rank order (top[0] is the winner).
      keys: The searched hyper-parameters (dotted keys).
      rows: One ranking row per top trial (the columns of ranking.csv).
      baseline_mse: {baseline method: per-conformer ESP MSE on the split, (Hartree/e)^2}.
      info: The body of ranking.json (winner, excluded, baselines, data, checks, ...).
      df: The ranking as a DataFrame; its attrs hold the winner, excluded trials, baselines.
      best_model: Where the winner is copied (<experiment>/best_model, absolute).
    """

    settings: RankSettings
    top: list[Evaluated]
    keys: list[str]
    rows: list[dict]
    baseline_mse: dict[str, np.ndarray]
    info: dict
    df: pd.DataFrame
    best_model: Path


def _searched_keys(search: dict, trials: list[TrialRecord]) -> list[str]:
    if search:
        return sorted(search)
    keys = sorted({k for t in trials for k in t.point})
    if keys:
        return keys
    # Plain runs: the config fields that differ between them.
    flats = [flat_dict(t.config.to_dict()) for t in trials if t.config is not None]
    skip = {"name", "output_dir", "created_at", "git_commit", "notes", "description"}
    return sorted(k for k in (flats[0] if flats else {})
                  if k not in skip and len({json.dumps(f.get(k)) for f in flats}) > 1)


def _point_of(t: TrialRecord, keys: list[str]) -> dict:
    flat = flat_dict(t.config.to_dict()) if t.config is not None else {}
    return {k: t.point.get(k, flat.get(k)) for k in keys}


def _competitors(s: RankSettings, fetch: Optional[Callable[[Path], None]] = None
                 ) -> tuple[list[TrialRecord], list[TrialRecord]]:
    """(all trials, the top_k eligible ones by the validation metric, ties by id); RankError
    without an eligible trial or for a top trial whose ranking split is empty. With `fetch`
    (a remote experiment), only the top trials' checkpoints are fetched and verified."""
    trials = discover_trials(s.experiment, s.metric, s.mode, lazy=fetch is not None)
    eligible = [t for t in trials if t.eligible]
    if not eligible:
        listing = "; ".join(f"{t.trial_id}: {t.reason}" for t in trials[:3])
        raise RankError(f"{s.experiment}: no trial can be ranked ({len(trials)} trials; "
                        f"{listing})")
    sign = 1.0 if s.mode == "min" else -1.0
    top = []
    for t in sorted(eligible, key=lambda t: (sign * t.value, t.trial_id)):
        if len(top) < s.top_k and (fetch is None or _fetched(t, fetch)):
            top.append(t)
    if not top:
        raise RankError(f"{s.experiment}: no trial can be ranked (every top checkpoint is "
                        "damaged)")
    if len(top) < s.top_k:
        log.warning("%s: only %d rankable trials for top_k = %d", s.experiment, len(top),
                    s.top_k)
    other = "valid" if s.split == "test" else "test"
    for t in top:
        rec = _read_json(t.path / "split.json") or {}
        if s.split in rec.get("indices", {}) and not rec["indices"][s.split]:
            raise RankError(f"{t.path}: the {s.split} split is empty (data.{s.split}_fraction "
                            f"= 0 in the sweep); rank with --split {other}")
    return trials, top


def _fetched(t: TrialRecord, fetch: Callable[[Path], None]) -> bool:
    """Fetches the state of the trial's chosen checkpoint and verifies it; a damaged one
    excludes the trial (listed, like a damaged checkpoint of a local experiment)."""
    fetch(t.checkpoint)
    try:
        ckpt.verify_checkpoint(t.checkpoint)
        return True
    except ckpt.CheckpointError as e:
        log.warning("skipping a damaged checkpoint: %s", e)
        t.skipped.append(f"{t.checkpoint}: {e}")
        t.reason = f"its checkpoint is damaged ({e})"
        return False


def _evaluate(s: RankSettings, t: TrialRecord, cache: DataCache
              ) -> tuple[Evaluated, Optional[dict]]:
    """Re-evaluates a trial's checkpoint on the ranking split of its saved split record
    (checksum-checked); with split "test", also re-checks the recorded validation value
    (returned as a check row, None otherwise)."""
    c = load_checkpoint(t.checkpoint)
    full = cache.full(c.config)
    idx = np.asarray(c.split_record["indices"][s.split]) if c.split_record else None
    a = analyze_checkpoint(c, checkpoint_data(c, s.split, data=full), batch_size=s.batch_size,
                           indices=idx)
    a.split = s.split
    check = _recheck_valid(s, t, c, full) if s.split == "test" else None
    return Evaluated(t, c, a), check


def _recheck_valid(s: RankSettings, t: TrialRecord, c: LoadedCheckpoint,
                   full: ESPData) -> Optional[dict]:
    """Whether the checkpoint ranked is the one that scored the recorded validation value."""
    short = metrics.base_name(s.metric)
    v = analyze_checkpoint(c, checkpoint_data(c, "valid", data=full), batch_size=s.batch_size)
    if short not in v.metrics:
        return None
    if not math.isclose(v.metrics[short], t.value, rel_tol=1e-4, abs_tol=1e-9):
        log.warning("trial %s: %s re-evaluated as %.6g, recorded %.6g", t.trial_id, s.metric,
                    v.metrics[short], t.value)
    return {"trial_id": t.trial_id, "metric": s.metric, "recorded": t.value,
            "re_evaluated": v.metrics[short]}


def _row(s: RankSettings, rank: int, e: Evaluated, keys: list[str]) -> dict:
    """One ranking row: the trial, its searched point, its validation metrics at the chosen
    epoch and the `{split}_*` metrics re-evaluated (names of `metrics.EVAL_METRICS`)."""
    t = e.trial
    row = {"rank": rank, "trial_id": t.trial_id, "status": t.status, "epochs": t.epochs,
           "max_epochs": t.max_epochs, "checkpoint_epoch": t.checkpoint_epoch,
           **_point_of(t, keys), s.metric: t.value}
    row.update({k: v for k, v in t.valid.items() if k not in row})
    for name in metrics.EVAL_METRICS:
        row.setdefault(f"{s.split}_{name}", e.analysis.metrics.get(name, float("nan")))
    row["n_params"] = e.analysis.metrics["n_params"]
    row["checkpoint"] = str(t.checkpoint)
    return row


def _trial_summary(t: TrialRecord, keys: list[str]) -> dict:
    return {"trial_id": t.trial_id, "status": t.status, "epochs": t.epochs,
            "checkpoint_epoch": t.checkpoint_epoch, "value": t.value,
            "eligible": t.eligible, "reason": t.reason, "point": _point_of(t, keys),
            "path": str(t.path), "skipped_checkpoints": list(t.skipped)}


def _rank(s: RankSettings, data: Optional[ESPData],
          fetch: Optional[Callable[[Path], None]] = None) -> Ranking:
    """Rules 1-3 of the module docstring: competitors, re-evaluation, baselines."""
    trials, top = _competitors(s, fetch)
    keys = _searched_keys(s.search, trials)
    cache = DataCache(data, s.data_files)
    evaluated, checks = [], []
    for t in top:
        e, check = _evaluate(s, t, cache)
        evaluated.append(e)
        checks += [check] if check else []
    rows = [_row(s, rank, e, keys) for rank, e in enumerate(evaluated, start=1)]
    winner = evaluated[0].checkpoint
    full, files = cache.full(winner.config), cache.files(winner.config)
    baselines, baseline_mse = ([], {}) if winner.split_record is None else split_baselines(
        full, winner.split_record["indices"], s.split, files)
    splits_differ = len({json.dumps(e.checkpoint.split_record.get("indices")
                                    if e.checkpoint.split_record else None)
                         for e in evaluated}) > 1
    if splits_differ:
        log.warning("%s: the ranked trials were evaluated on different %s splits; their %s "
                    "metrics are not directly comparable", s.experiment, s.split, s.split)
    info = {
        "experiment": str(s.experiment.resolve()), "name": s.name,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "metric": s.metric, "mode": s.mode, "split": s.split, "top_k": s.top_k,
        "data": {"files": files if files is not None else "(passed in memory)",
                 **split_summary(winner, full)},
        "winner": {**rows[0], "best_model": str(s.experiment / BEST_MODEL)},
        "trials": [_trial_summary(t, keys) for t in trials],
        "excluded": [{"trial_id": t.trial_id, "status": t.status, "reason": t.reason}
                     for t in trials if not t.eligible],
        "skipped_checkpoints": [s_ for t in trials for s_ in t.skipped],
        "baselines": baselines, "checks": checks, "searched": keys,
        "splits_differ": splits_differ, "importances": _importances(s, trials, keys),
    }
    df = pd.DataFrame(rows)
    df.attrs.update({k: info[k] for k in ("winner", "excluded", "baselines", "metric", "split")})
    return Ranking(settings=s, top=evaluated, keys=keys, rows=rows,
                   baseline_mse=baseline_mse, info=info, df=df,
                   best_model=s.experiment.resolve() / BEST_MODEL)


def _importances(s: RankSettings, trials: list[TrialRecord], keys: list[str]) -> dict:
    """Optuna's parameter importances over the rankable trials, each at its best epoch."""
    ok = [t for t in trials if t.eligible and math.isfinite(t.value)]
    if not s.search:
        return {}
    return study.param_importances([_point_of(t, keys) for t in ok], [t.value for t in ok],
                                   s.search, s.mode)


def rank_experiment(experiment_dir: Union[str, Path], top_k: Optional[int] = None,
                    split: Optional[str] = None,
                    data_files: Optional[Sequence[Union[str, Path]]] = None, *,
                    data: Optional[ESPData] = None, metric: Optional[str] = None,
                    mode: Optional[str] = None, batch_size: int = 16,
                    write: bool = True, local_copy: Optional[Path] = None) -> pd.DataFrame:
    """Ranks the trials of a sweep by their best validation metric and re-evaluates the
    top_k on held-out data; writes the report (see the module docstring).

    Args:
      experiment_dir: <storage_path>/<name> of a sweep (or a directory of training runs), a
        path or an object-store URI (s3://bucket/path/name?endpoint_override=...).
      top_k: Trials to re-evaluate and list (default: the spec's rank.top_k, else 5).
      split: "test" (default: the spec's rank.split) or "valid".
      data_files: The sweep's data files, if they moved (default: each trial's own
        data.data_files, empty = the bundled demo set). Checked by checksum.
      data: The sweep's full dataset, if already in memory (the sweep passes it).
      metric, mode: Selection metric (default: the spec's run.metric/run.mode, else
        valid_esp_rmse/min). Must be a validation metric.
      batch_size: Conformers per forward pass.
      write: Write ranking.csv, ranking.json, report.md, plots and best_model/.
      local_copy: For a remote experiment, the local directory it is read into (default
        ./ray_results/<scheme>-<hash>/<bucket>/<path>); the outputs are written there and
        uploaded into the experiment.

    Returns:
      The ranking: top_k rows ordered by the validation metric (rank 1 = winner), with the
      searched hyper-parameters, validation metrics at the chosen epoch and `{split}_*`
      metrics re-evaluated from the checkpoint (ESP in kcal/mol/e, charges in e, dipoles in
      Debye; see `dcmtune.metrics`). `df.attrs` holds the winner, the excluded trials, the
      baselines and the written files.

    Raises:
      RankError: one line naming the path, for every problem with the input (directory,
        trials, checkpoints, data).
    """
    try:
        remote = _RemoteExperiment.open(str(experiment_dir), local_copy) \
            if storage.is_remote(str(experiment_dir)) else None
        exp = remote.local if remote else Path(experiment_dir)
        s = _settings(exp, top_k, split, data_files, metric, mode, batch_size)
        ranking = _rank(s, data, remote.fetch if remote else None)
        if write:
            ranking.df.attrs["files"] = _write(ranking)
            if remote:
                remote.upload(ranking.df.attrs["files"])
        return ranking.df
    except RankError:
        raise
    except storage.StorageError as e:
        raise RankError(str(e)) from None
    except (AnalysisError, ckpt.CheckpointError, DataError, ConfigError) as e:
        raise RankError(str(e)) from None


# --------------------------------------------------------------------------- object storage


@dataclasses.dataclass(frozen=True)
class _RemoteExperiment:
    """An experiment in an object store, read into a local copy: everything but the
    checkpoints' state files (and Tune's pickles and event streams) at once, the state of a
    checkpoint only when it is evaluated (`fetch`)."""

    loc: storage.Location
    local: Path

    @classmethod
    def open(cls, uri: str, local_copy: Optional[Path]) -> "_RemoteExperiment":
        loc = storage.resolve(uri, "experiment")
        storage.probe(loc, "experiment")
        if not loc.exists():
            raise RankError(f"{uri}: not found; expected a dcmtune sweep experiment")
        local = Path(local_copy) if local_copy else storage.local_copy_dir(uri, Path(
            "ray_results").resolve())

        def skip(rel: str) -> bool:
            name = rel.rsplit("/", 1)[-1]
            return (rel.startswith((".", BEST_MODEL + "/")) or name == ckpt.STATE_FILE
                    or name.endswith(".pkl") or name.startswith("events.out.tfevents"))

        n = len(loc.download("", local, skip=skip))
        log.info("%s: %d files read into %s", uri, n, local)
        return cls(loc, local)

    def fetch(self, checkpoint: Path) -> None:
        rel = Path(checkpoint).relative_to(self.local).as_posix()
        self.loc.download(f"{rel}/{ckpt.STATE_FILE}", Path(checkpoint) / ckpt.STATE_FILE)

    def upload(self, files: Sequence[str]) -> None:
        for f in files:
            p = Path(f)
            if p.exists():
                self.loc.upload(p, p.relative_to(self.local.resolve()).as_posix())


# --------------------------------------------------------------------------- writing


def _write(r: Ranking) -> list[str]:
    """Writes best_model/, the plots, ranking.csv, ranking.json and report.md into the
    experiment directory; returns their paths."""
    exp = r.settings.experiment.resolve()
    _write_best_model(r.best_model, r.top[0], r.info)
    plots = report.write_plots(exp, r)
    _io.write_csv(exp / "ranking.csv", r.df)
    _io.write_json(exp / "ranking.json", {**r.info, "plots": plots, "ranking": r.rows,
                                          "versions": ckpt.package_versions()})
    _io.write_text(exp / "report.md", report.markdown(r, plots))
    return [str(exp / f) for f in ("ranking.csv", "ranking.json", "report.md", *plots,
                                   BEST_MODEL)]


def _write_best_model(target: Path, e: Evaluated, info: dict) -> Path:
    """`target` (best_model/): the winner's checkpoint files, config, split, history and
    evaluation, swapped in as a whole."""
    t, c, split = e.trial, e.checkpoint, info["split"]
    with _io.atomic_directory(target) as tmp:
        for name in (ckpt.STATE_FILE, ckpt.META_FILE):
            shutil.copy2(c.path / name, tmp / name)
        if (t.path / "history.csv").is_file():
            shutil.copy2(t.path / "history.csv", tmp / "history.csv")
        _io.write_json(tmp / "config.json", c.config.to_dict())
        if c.split_record is not None:
            _io.write_json(tmp / "split.json", c.split_record)
        _io.write_json(tmp / "evaluation.json", {
            "trial_id": t.trial_id, "source_checkpoint": str(c.path), "epoch": c.epoch,
            "selected_by": {"metric": info["metric"], "mode": info["mode"], "value": t.value},
            "split": split, "metrics": {f"{split}_{k}": v for k, v in e.analysis.metrics.items()},
            "data_checksum": info["data"]["checksum"],
            "reproduce": f"python -m dcmtune.analysis {target} --split {split}"})
    return target


# --------------------------------------------------------------------------- CLI


def _parser() -> OneLineParser:
    p = OneLineParser(prog="python -m dcmtune.rank",
                      description="Rank the best checkpoints of a dcmtune sweep on its held-out "
                                  "test split and write ranking.csv/json, report.md, plots and "
                                  "best_model/ into the experiment directory.")
    p.add_argument("experiment_dir", help="<storage_path>/<name> of a sweep: a directory or a "
                                          "URI such as s3://bucket/path/name")
    p.add_argument("--local-copy", type=Path, help="where a remote experiment is read into "
                                                   "(default ./ray_results/<scheme>-<hash>/...)")
    p.add_argument("--top-k", type=int, help="trials to re-evaluate (default: the spec's "
                                             "rank.top_k, else 5)")
    p.add_argument("--split", choices=("test", "valid"),
                   help="held-out split to report (default: the spec's rank.split, else test)")
    p.add_argument("--data", nargs="+", metavar="FILE",
                   help="the sweep's .npz files, if they moved (checked by checksum)")
    p.add_argument("--batch-size", type=int, default=16, help="conformers per forward pass")
    return p


def _main(args) -> int:
    df = rank_experiment(args.experiment_dir, top_k=args.top_k, split=args.split,
                         data_files=args.data, batch_size=args.batch_size,
                         local_copy=args.local_copy)
    print(format_ranking(df))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m dcmtune.rank EXPERIMENT_DIR`: exit 0 done, 2 bad input (one line)."""
    return run_cli(_main, _parser(), argv, bad_input=(RankError,))


if __name__ == "__main__":
    raise SystemExit(main())
