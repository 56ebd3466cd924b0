"""What a ranking holds, and the trials it reads: one record per trial directory.

A trial competes at its best epoch by the sweep's validation metric with the checkpoint saved
at that epoch (`discover_trials`, read from plain files: JSON, CSV and checkpoint metas; no Ray,
no pickle). `RankSettings` resolves how an experiment is ranked from the arguments and its spec
record; `Evaluated` and `Ranking` carry what `dcmtune.analysis.rank` decided and measured to the
report (`dcmtune.analysis.report`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dcmtune import metrics
from dcmtune.analysis import pareto
from dcmtune.analysis.checkpoints import AnalysisError, LoadedCheckpoint
from dcmtune.analysis.evaluate import CheckpointAnalysis
from dcmtune.analysis.history import TrainingHistory, analyze_training_history
from dcmtune.config import ConfigError, ExperimentConfig, flat_dict
from dcmtune.train import checkpoints as ckpt

__all__ = [
    "RankError",
    "RankSettings",
    "TrialRecord",
    "Evaluated",
    "Ranking",
    "discover_trials",
    "BEST_MODEL",
    "PARETO_DIR",
    "SPEC_RECORD",
    "VALID_COLUMNS",
    "EVAL_COLUMNS",
]

log = logging.getLogger(__name__)

BEST_MODEL = "best_model"
# Where every model of the front of a multi-objective sweep is copied (one directory each).
PARETO_DIR = "pareto"
# The resolved sweep spec a sweep writes into its experiment directory (ranking reads it).
SPEC_RECORD = "sweep_spec.json"
# Validation metrics copied from the selected epoch into the ranking, beside the sweep metric:
# every validation metric a sweep may select on.
VALID_COLUMNS = tuple(m for m in metrics.SWEEP_METRICS if metrics.split_of(m) == "valid")
# Re-evaluated metrics reported for the ranking split (`{split}_` + name).
EVAL_COLUMNS = metrics.EVAL_METRICS
_OBJECTIVES = metrics.OBJECTIVE_METRICS
_NOT_TRIALS = {BEST_MODEL, PARETO_DIR, "checkpoints"}


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
      costs: Its cost metrics (`dcmtune.model.cost`), computed from its config when the
        ranking has cost objectives.
    """

    trial_id: str
    path: Path
    status: str
    point: dict
    config: ExperimentConfig | None = None
    history: TrainingHistory | None = None
    epochs: int = 0
    max_epochs: int = 0
    checkpoint: Path | None = None
    checkpoint_epoch: int = 0
    value: float = float("nan")
    valid: dict = dataclasses.field(default_factory=dict)
    reason: str = ""
    skipped: list = dataclasses.field(default_factory=list)
    costs: dict = dataclasses.field(default_factory=dict)

    @property
    def eligible(self) -> bool:
        return not self.reason


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _is_trial_dir(d: Path) -> bool:
    if not d.is_dir() or d.name.startswith(".") or d.name in _NOT_TRIALS:
        return False
    if (d / "config.json").is_file() and (
        (d / "history.csv").is_file() or (d / "checkpoints").is_dir()
    ):
        return True
    # A Tune trial dir: params.json; holds dcmtune files unless it failed before training.
    return (d / "params.json").is_file()


def _error_line(trial_dir: Path) -> str:
    err = trial_dir / "error.txt"
    if not err.is_file():
        return ""
    lines = [ln.strip() for ln in err.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "error.txt present"


def _read_trial(d: Path, metric: str, lazy: bool = False) -> TrialRecord:
    """One trial directory: its config and history, its status, and the checkpoint it competes
    with (the one of its best epoch by `metric`, lower is better)."""
    params = _read_json(d / "params.json")
    trial_id = d.name[len("trial_") :] if d.name.startswith("trial_") else d.name
    rec = TrialRecord(
        trial_id=trial_id,
        path=d,
        status="failed",
        point=dict(params) if isinstance(params, dict) else {},
    )
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
    rec.epochs = rec.history.num_epochs
    _set_status(rec, err)
    if metric not in rec.history.history_df:
        rec.reason = rec.reason or f"history has no {metric}"
    chosen = _chosen_checkpoint(rec, metric, lazy)
    if chosen is None:
        rec.reason = rec.reason or "no checkpoint with a finite " + metric
        if rec.status != "diverged":
            rec.status = "failed"
        return rec
    rec.checkpoint, meta = chosen
    rec.checkpoint_epoch = int(meta.get("epoch", 0))
    m = meta.get("metrics", {})
    v = m.get(metric)
    rec.value = float(v) if v is not None else float("nan")
    if not math.isfinite(rec.value):
        rec.reason = rec.reason or f"{metric} is not finite"
    rec.valid = {
        k: float(m[k]) for k in (metric,) + VALID_COLUMNS if isinstance(m.get(k), (int, float))
    }
    return rec


def _set_status(rec: TrialRecord, err: str) -> None:
    """completed, stopped early (by the scheduler), errored or diverged (then also the reason)."""
    h = rec.history
    assert h is not None
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


def _chosen_checkpoint(rec: TrialRecord, metric: str, lazy: bool) -> tuple[Path, dict] | None:
    """(directory, meta) of the checkpoint of the trial's best epoch; else its checkpoint with
    the best finite `metric` (logged); None when there is none."""
    assert rec.history is not None
    best_epoch, _ = rec.history.best(metric)
    cands = ckpt.checkpoint_candidates(rec.path, rec.skipped, verify_state=not lazy)
    chosen = next(((c, m) for c, m in cands if int(m.get("epoch", -1)) == best_epoch), None)
    if chosen is not None or not cands:
        return chosen

    def score(cm) -> float:
        v = cm[1].get("metrics", {}).get(metric)
        return float(v) if v is not None and math.isfinite(float(v)) else math.inf

    chosen = min(cands, key=score)
    if not math.isfinite(score(chosen)) or rec.reason:
        return None
    log.warning(
        "trial %s: no checkpoint of its best epoch %d; using epoch %s",
        rec.trial_id,
        best_epoch,
        chosen[1].get("epoch"),
    )
    return chosen


def discover_trials(
    experiment_dir: str | Path, metric: str = "valid_esp_rmse", lazy: bool = False
) -> list[TrialRecord]:
    """The trials of an experiment directory, each at its best checkpoint by `metric`
    (`lazy`: checkpoints are chosen by their meta.json; their state files come later).

    Raises:
      RankError: missing, empty or foreign directory (one line saying what was expected).
    """
    exp = Path(experiment_dir)
    expected = (
        "a dcmtune sweep experiment (<storage_path>/<name>/ with trial directories "
        "holding config.json, history.csv and checkpoints)"
    )
    if not exp.exists():
        raise RankError(f"{exp}: not found; expected {expected}")
    if not exp.is_dir():
        raise RankError(f"{exp}: not a directory; expected {expected}")
    entries = [p for p in exp.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise RankError(f"{exp}: empty directory; expected {expected}")
    trial_dirs = sorted(p for p in entries if _is_trial_dir(p))
    if not trial_dirs:
        nested = sorted(
            p.name
            for p in entries
            if p.is_dir() and any(_is_trial_dir(q) for q in p.iterdir() if q.is_dir())
        )
        hint = f" (it holds experiments: {', '.join(nested)}; pass one of them)" if nested else ""
        raise RankError(f"{exp}: no dcmtune trials found; expected {expected}{hint}")
    return [_read_trial(d, metric, lazy) for d in trial_dirs]


# --------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class RankSettings:
    """How one experiment is ranked, resolved once from the arguments and the sweep spec.

    Attributes:
      experiment: The experiment directory.
      name: The sweep's name (the directory's name without a spec).
      search: The spec's search space (dotted key -> {kind: arguments}); {} without a spec.
      metric, mode: Selection metric on the validation split (`valid_*`); every metric is
        lower-is-better, so mode is "min".
      top_k: Trials re-evaluated and listed (>= 1).
      split: The held-out split re-evaluated, "test" or "valid".
      batch_size: Conformers per forward pass.
      data_files: The sweep's data files if they moved (None: each run's own).
      objectives: Several objectives (the spec's run.objectives; empty: one, `metric`): the
        ranking then lists their front, decided on validation values and costs.
      select: How best_model/ is chosen from the front (`dcmtune.analysis.pareto.select`).
    """

    experiment: Path
    name: str
    search: dict
    metric: str = "valid_esp_rmse"
    mode: str = "min"
    top_k: int = 5
    split: str = "test"
    batch_size: int = 16
    data_files: tuple[str, ...] | None = None
    objectives: tuple[str, ...] = ()
    select: Any = "most_accurate"

    def __post_init__(self):
        if not self.metric.startswith("valid_"):
            raise RankError(
                f"metric: the winner is chosen on the validation split, so expected "
                f"a valid_* metric, got {self.metric!r}"
            )
        if self.mode != "min":
            raise RankError(
                f"mode: every metric is lower-is-better, so expected min, got {self.mode!r}"
            )
        if self.top_k < 1:
            raise RankError(f"top_k: expected at least 1, got {self.top_k}")
        if self.split not in ("test", "valid"):
            raise RankError(f"split: expected test or valid, got {self.split!r}")
        if self.objectives and self.objectives[0] != self.metric:
            raise RankError(
                f"objectives: the first objective is the selection metric {self.metric}, "
                f"got {self.objectives[0]!r}"
            )
        unknown = [o for o in self.objectives[1:] if o not in _OBJECTIVES]
        if unknown:
            raise RankError(
                f"objectives: unknown metric {unknown[0]!r}; expected one of "
                f"{', '.join(_OBJECTIVES)}"
            )
        rules = ("most_accurate", "knee")
        if self.select not in rules and not (
            isinstance(self.select, dict) and set(self.select) == {"max_cost"}
        ):
            raise RankError(
                f"select: expected most_accurate, knee or {{max_cost: ...}}, got {self.select!r}"
            )
        if self.select != "most_accurate" and len(self.objectives) < 2:
            raise RankError(
                f"select: {self.select!r} chooses on cost, but the sweep has one objective"
            )
        try:
            pareto.check_rule(self.select, self.objectives or (self.metric,))
        except ValueError as e:
            raise RankError(str(e)) from None

    @property
    def costs(self) -> tuple[str, ...]:
        """The cost metrics among the objectives."""
        return tuple(o for o in self.objectives if o in metrics.COST_METRICS)


def _settings(
    exp: Path,
    top_k: int | None,
    split: str | None,
    data_files: Sequence[str | Path] | None,
    metric: str | None,
    mode: str | None,
    batch_size: int,
    objectives: Sequence[str] | None = None,
    select: Any = None,
) -> RankSettings:
    """Arguments first, then the spec's run/rank sections, then the defaults."""
    spec = _read_json(exp / SPEC_RECORD) if exp.is_dir() else None
    spec = spec if isinstance(spec, dict) else {}
    run, rank_spec = spec.get("run", {}), spec.get("rank", {})
    search = spec.get("search")
    return RankSettings(
        experiment=exp,
        name=spec.get("name", exp.resolve().name),
        search=search if isinstance(search, dict) else {},
        metric=metric or run.get("metric") or "valid_esp_rmse",
        mode=mode or run.get("mode") or "min",
        top_k=int(top_k if top_k is not None else rank_spec.get("top_k", 5)),
        split=split or rank_spec.get("split") or "test",
        batch_size=batch_size,
        data_files=tuple(str(f) for f in data_files) if data_files else None,
        objectives=tuple(objectives) if objectives else _spec_objectives(run),
        select=select if select is not None else rank_spec.get("select") or "most_accurate",
    )


def _spec_objectives(run: dict) -> tuple[str, ...]:
    """The objective metrics of a spec record's run section (none: one objective)."""
    listed = run.get("objectives") or []
    return tuple(str(o.get("metric")) for o in listed if isinstance(o, dict))


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
    return sorted(
        k
        for k in (flats[0] if flats else {})
        if k not in skip and len({json.dumps(f.get(k)) for f in flats}) > 1
    )


def _point_of(t: TrialRecord, keys: list[str]) -> dict:
    flat = flat_dict(t.config.to_dict()) if t.config is not None else {}
    return {k: t.point.get(k, flat.get(k)) for k in keys}
