"""Ranking a sweep: the best checkpoints re-evaluated on held-out data (`python -m dcmtune.rank`).

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
With several objectives (a sweep's `run.objectives`: an error and costs such as charges per
atom), rule 2 becomes: the trials no other trial beats on every objective form the front,
decided on the validation error at each trial's chosen epoch and on costs computed from its
config (`dcmtune.model.cost`; `dcmtune.analysis.pareto`); the spec's `rank.select` picks the
winner from the front (most accurate, the knee, or the most accurate within a cost bound); every
front trial's checkpoint is re-evaluated on the test split (reported, never used to choose) and
copied under pareto/.

3. Classical baselines are evaluated on the same test conformers: one charge per element fitted
   on the training split (a prediction), and, where the data allow, the stored per-conformer
   ESP-fitted charges (`mono`), one charge set per molecule fitted across its test conformers,
   and Mulliken charges. The two fits to the test ESP itself are not predictions: they bound
   what fixed atom-centred charges can do on these molecules.

Written into the experiment directory: ranking.csv, ranking.json, breakdown.csv (the winner's
ESP error per grid shell, nearest element, molecule size and functional class on the ranking
split, `dcmtune.analysis.breakdown`), best_model/ (the winner's
checkpoint, config.json, split.json, history.csv, evaluation.json; `python -m dcmtune.analysis
<experiment>/best_model` re-evaluates it), and, drawn by `dcmtune.analysis.report`, report.md
and the PNG plots (learning_curves.png, esp_parity.png, per_molecule_rmse.png, hyperparameters.png,
param_importances.png: Optuna's importances of the searched hyper-parameters; with several
objectives pareto.png, the error against each cost, and pareto/<trial>/, each front model).
Metric names and units are those of `dcmtune.metrics`; the baselines are `dcmtune.data.baselines`;
which trials compete and what a ranking holds is `dcmtune.analysis.ranking`.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dcmtune import _io, metrics, storage
from dcmtune.analysis import pareto, plots, report
from dcmtune.analysis.breakdown import esp_breakdown, smiles_from_provenance
from dcmtune.analysis.checkpoints import (
    AnalysisError,
    DataCache,
    LoadedCheckpoint,
    checkpoint_data,
    open_checkpoint,
    split_summary,
)
from dcmtune.analysis.evaluate import analyze_checkpoint
from dcmtune.analysis.importances import param_importances
from dcmtune.analysis.ranking import (
    BEST_MODEL,
    PARETO_DIR,
    Evaluated,
    RankError,
    Ranking,
    RankSettings,
    TrialRecord,
    _point_of,
    _read_json,
    _searched_keys,
    _settings,
    discover_trials,
)
from dcmtune.analysis.remote import RemoteExperiment
from dcmtune.config import ConfigError
from dcmtune.data.baselines import split_baselines
from dcmtune.data.dataset import ESPData
from dcmtune.data.file_format import DataError
from dcmtune.train import checkpoints as ckpt

__all__ = ["rank_experiment", "top_checkpoints", "OUTPUT_FILES"]

log = logging.getLogger(__name__)

OUTPUT_FILES = ("ranking.csv", "ranking.json", "report.md", "breakdown.csv") + plots.PLOT_FILES


def _competitors(
    s: RankSettings, fetch: Callable[[Path], None] | None = None
) -> tuple[list[TrialRecord], list[TrialRecord]]:
    """(all trials, the top_k eligible ones by the validation metric, ties by id); RankError
    without an eligible trial or for a top trial whose ranking split is empty. With `fetch`
    (a remote experiment), only the top trials' checkpoints are fetched and verified."""
    trials = discover_trials(s.experiment, s.metric, lazy=fetch is not None)
    eligible = _eligible(s, trials)
    top = []
    for t in sorted(eligible, key=lambda t: (t.value, t.trial_id)):
        if len(top) < s.top_k and (fetch is None or _fetched(t, fetch)):
            top.append(t)
    if not top:
        raise RankError(f"{s.experiment}: no trial can be ranked (every top checkpoint is damaged)")
    if len(top) < s.top_k:
        log.warning("%s: only %d rankable trials for top_k = %d", s.experiment, len(top), s.top_k)
    _check_split_not_empty(s, top)
    return trials, top


def _eligible(s: RankSettings, trials: list[TrialRecord]) -> list[TrialRecord]:
    """The trials that may compete; RankError when there is none."""
    eligible = [t for t in trials if t.eligible]
    if not eligible:
        listing = "; ".join(f"{t.trial_id}: {t.reason}" for t in trials[:3])
        raise RankError(f"{s.experiment}: no trial can be ranked ({len(trials)} trials; {listing})")
    return eligible


def _check_split_not_empty(s: RankSettings, top: list[TrialRecord]) -> None:
    """RankError for a trial to re-evaluate whose ranking split is empty."""
    other = "valid" if s.split == "test" else "test"
    for t in top:
        rec = _read_json(t.path / "split.json") or {}
        if s.split in rec.get("indices", {}) and not rec["indices"][s.split]:
            raise RankError(
                f"{t.path}: the {s.split} split is empty (data.{s.split}_fraction "
                f"= 0 in the sweep); rank with --split {other}"
            )


def _front(
    s: RankSettings, cache: DataCache, fetch: Callable[[Path], None] | None = None
) -> tuple[list[TrialRecord], list[TrialRecord], dict]:
    """(all trials, the front with the selected trial first and the others by the validation
    error, what the report shows of the front). With `fetch`, a front trial whose checkpoint is
    damaged is excluded and the front decided again without it."""
    from dcmtune.model.cost import model_costs, reference_num_atoms  # JAX: not on import

    trials = discover_trials(s.experiment, s.metric, lazy=fetch is not None)
    eligible = _eligible(s, trials)
    for t in eligible:
        assert t.config is not None
        num_atoms = reference_num_atoms(cache.full(t.config).N)
        t.costs = model_costs(t.config.model, num_atoms, s.costs)
    fetched: set[str] = set()
    while True:
        cands = [t for t in eligible if t.eligible]
        points = [_objective_values(s, t) for t in cands]
        members = [cands[i] for i in pareto.front(points)]
        damaged = [
            t
            for t in members
            if fetch is not None and t.trial_id not in fetched and not _fetched(t, fetch)
        ]
        fetched.update(t.trial_id for t in members)
        if not damaged:
            break
    if not members:
        raise RankError(f"{s.experiment}: no trial has finite values of {', '.join(s.objectives)}")
    try:
        k = pareto.select([_objective_values(s, t) for t in members], s.select, s.objectives)
    except ValueError as e:
        raise RankError(f"{s.experiment}: {e}") from None
    rest = sorted((t for i, t in enumerate(members) if i != k), key=lambda t: (t.value, t.trial_id))
    ordered = [members[k], *rest]
    _check_split_not_empty(s, ordered)
    on_front = {t.trial_id for t in members}
    info = {
        "objectives": list(s.objectives),
        "select": s.select,
        "rule": pareto.describe_rule(s.select, s.objectives),
        "front": [t.trial_id for t in ordered],
        "points": [
            {
                "trial_id": t.trial_id,
                "status": t.status,
                **dict(zip(s.objectives, _objective_values(s, t), strict=True)),
                "on_front": t.trial_id in on_front,
            }
            for t in cands
        ],
    }
    return trials, ordered, info


def _objective_values(s: RankSettings, t: TrialRecord) -> list[float]:
    """The trial's objectives: validation metrics at its chosen epoch, then computed costs."""
    return [
        float(t.costs[o]) if o in t.costs else float(t.valid.get(o, float("nan")))
        for o in s.objectives
    ]


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


def _evaluate(s: RankSettings, t: TrialRecord, cache: DataCache) -> tuple[Evaluated, dict | None]:
    """Re-evaluates a trial's checkpoint on the ranking split of its saved split record
    (checksum-checked); with split "test", also re-checks the recorded validation value
    (returned as a check row, None otherwise)."""
    c = open_checkpoint(t.checkpoint)
    full = cache.full(c.config)
    idx = np.asarray(c.split_record["indices"][s.split]) if c.split_record else None
    a = analyze_checkpoint(
        c, checkpoint_data(c, s.split, data=full), batch_size=s.batch_size, indices=idx
    )
    a.split = s.split
    check = _recheck_valid(s, t, c, full) if s.split == "test" else None
    return Evaluated(t, c, a), check


def _recheck_valid(
    s: RankSettings, t: TrialRecord, c: LoadedCheckpoint, full: ESPData
) -> dict | None:
    """Whether the checkpoint ranked is the one that scored the recorded validation value."""
    short = metrics.base_name(s.metric)
    v = analyze_checkpoint(c, checkpoint_data(c, "valid", data=full), batch_size=s.batch_size)
    if short not in v.metrics:
        return None
    if not math.isclose(v.metrics[short], t.value, rel_tol=1e-4, abs_tol=1e-9):
        log.warning(
            "trial %s: %s re-evaluated as %.6g, recorded %.6g",
            t.trial_id,
            s.metric,
            v.metrics[short],
            t.value,
        )
    return {
        "trial_id": t.trial_id,
        "metric": s.metric,
        "recorded": t.value,
        "re_evaluated": v.metrics[short],
    }


def _row(s: RankSettings, rank: int, e: Evaluated, keys: list[str]) -> dict:
    """One ranking row: the trial, its searched point, its validation metrics at the chosen
    epoch and the `{split}_*` metrics re-evaluated (names of `metrics.EVAL_METRICS`)."""
    t = e.trial
    row = {
        "rank": rank,
        "trial_id": t.trial_id,
        "status": t.status,
        "epochs": t.epochs,
        "max_epochs": t.max_epochs,
        "checkpoint_epoch": t.checkpoint_epoch,
        **_point_of(t, keys),
        s.metric: t.value,
    }
    row.update(t.costs)
    row.update({k: v for k, v in t.valid.items() if k not in row})
    for name in metrics.EVAL_METRICS:
        row.setdefault(f"{s.split}_{name}", e.analysis.metrics.get(name, float("nan")))
    row["n_params"] = e.analysis.metrics["n_params"]
    row["checkpoint"] = str(t.checkpoint)
    return row


def _trial_summary(t: TrialRecord, keys: list[str]) -> dict:
    return {
        "trial_id": t.trial_id,
        "status": t.status,
        "epochs": t.epochs,
        "checkpoint_epoch": t.checkpoint_epoch,
        "value": t.value,
        "eligible": t.eligible,
        "reason": t.reason,
        "point": _point_of(t, keys),
        "path": str(t.path),
        "skipped_checkpoints": list(t.skipped),
    }


def _rank(
    s: RankSettings, data: ESPData | None, fetch: Callable[[Path], None] | None = None
) -> Ranking:
    """Rules 1-3 of the module docstring: competitors, re-evaluation, baselines."""
    cache = DataCache(data, s.data_files)
    front = None
    if s.objectives:
        trials, top, front = _front(s, cache, fetch)
    else:
        trials, top = _competitors(s, fetch)
    keys = _searched_keys(s.search, trials)
    evaluated, checks = [], []
    for t in top:
        e, check = _evaluate(s, t, cache)
        evaluated.append(e)
        checks += [check] if check else []
    rows = [_row(s, rank, e, keys) for rank, e in enumerate(evaluated, start=1)]
    winner = evaluated[0].checkpoint
    full, files = cache.full(winner.config), cache.files(winner.config)
    baselines, baseline_mse = (
        ([], {})
        if winner.split_record is None
        else split_baselines(
            full,
            winner.split_record["indices"],
            s.split,
            files,
            smiles_from_provenance(files) if files is not None else None,
        )
    )
    info = {
        **_info(s, trials, keys, rows),
        "data": {
            "files": files if files is not None else "(passed in memory)",
            **split_summary(winner, full),
        },
        "baselines": baselines,
        "breakdown": _breakdown(evaluated[0], files),
        "checks": checks,
        "splits_differ": _splits_differ(s, evaluated),
        **({"pareto": front} if front is not None else {}),
    }
    df = pd.DataFrame(rows)
    df.attrs.update({k: info[k] for k in ("winner", "excluded", "baselines", "metric", "split")})
    if front is not None:
        df.attrs["pareto"] = front
    return Ranking(
        settings=s,
        top=evaluated,
        keys=keys,
        rows=rows,
        baseline_mse=baseline_mse,
        info=info,
        df=df,
        best_model=s.experiment.resolve() / BEST_MODEL,
    )


def _breakdown(e: Evaluated, files: list[str] | None) -> dict:
    """The winner's ESP error per shell, element, size and class on the ranking split
    (`dcmtune.analysis.breakdown`; SMILES from the data files' provenance)."""
    a = e.analysis
    smiles = smiles_from_provenance(files) if files is not None else None
    return esp_breakdown(a.data, a.esp_pred, smiles).to_dict()


def _info(s: RankSettings, trials: list[TrialRecord], keys: list[str], rows: list[dict]) -> dict:
    """The parts of ranking.json that describe the experiment, its trials and the winner."""
    return {
        "experiment": str(s.experiment.resolve()),
        "name": s.name,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "metric": s.metric,
        "mode": s.mode,
        "split": s.split,
        "top_k": s.top_k,
        "winner": {**rows[0], "best_model": str(s.experiment / BEST_MODEL)},
        "trials": [_trial_summary(t, keys) for t in trials],
        "excluded": [
            {"trial_id": t.trial_id, "status": t.status, "reason": t.reason}
            for t in trials
            if not t.eligible
        ],
        "skipped_checkpoints": [s_ for t in trials for s_ in t.skipped],
        "searched": keys,
        "importances": _importances(s, trials, keys),
    }


def _splits_differ(s: RankSettings, evaluated: list[Evaluated]) -> bool:
    """Whether the ranked trials were evaluated on different splits (logged: their metrics
    are then not directly comparable)."""
    records = {
        json.dumps(e.checkpoint.split_record.get("indices") if e.checkpoint.split_record else None)
        for e in evaluated
    }
    if len(records) > 1:
        log.warning(
            "%s: the ranked trials were evaluated on different %s splits; their %s metrics are "
            "not directly comparable",
            s.experiment,
            s.split,
            s.split,
        )
    return len(records) > 1


def _importances(s: RankSettings, trials: list[TrialRecord], keys: list[str]) -> dict:
    """Optuna's parameter importances over the rankable trials, each at its best epoch."""
    ok = [t for t in trials if t.eligible and math.isfinite(t.value)]
    if not s.search:
        return {}
    return param_importances([_point_of(t, keys) for t in ok], [t.value for t in ok], s.search)


def rank_experiment(
    experiment_dir: str | Path,
    top_k: int | None = None,
    split: str | None = None,
    data_files: Sequence[str | Path] | None = None,
    *,
    data: ESPData | None = None,
    metric: str | None = None,
    mode: str | None = None,
    batch_size: int = 16,
    write: bool = True,
    local_copy: Path | None = None,
    objectives: Sequence[str] | None = None,
    select: Any = None,
) -> pd.DataFrame:
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
        ./ray_results/<scheme>-<hash>/<bucket>/<path>); outputs are written there, uploaded.
      objectives, select: Several objectives, `metric` first, and how best_model/ is chosen
        from their front (default: the spec's run.objectives and rank.select).

    Returns:
      The ranking: top_k rows by the validation metric (rank 1 = winner; several objectives:
      the front, the selected trial first), with the searched hyper-parameters, validation
      metrics at the chosen epoch and `{split}_*` metrics re-evaluated from the checkpoint
      (`dcmtune.metrics` units). `df.attrs`: winner, excluded trials, baselines, files.

    Raises:
      RankError: one line naming the path, for every problem with the input (directory,
        trials, checkpoints, data).
    """
    try:
        uri = str(experiment_dir)
        remote = RemoteExperiment.open(uri, local_copy) if storage.is_remote(uri) else None
        exp = remote.local if remote else Path(experiment_dir)
        s = _settings(exp, top_k, split, data_files, metric, mode, batch_size, objectives, select)
        ranking = _rank(s, data, remote.fetch if remote else None)
        if write:
            ranking.df.attrs["files"] = _write(ranking)
            if remote:
                remote.upload(ranking.df.attrs["files"])
        return ranking.df
    except RankError:
        raise
    except (storage.StorageError, AnalysisError, ckpt.CheckpointError, DataError, ConfigError) as e:
        raise RankError(str(e)) from None


def top_checkpoints(
    experiment_dir: str | Path, top_k: int | None = None, metric: str | None = None
) -> list[Path]:
    """The checkpoints of an experiment's top_k trials by rule 1 of the module docstring (each
    trial's best epoch by the validation metric; diverged and failed trials excluded; ties by
    trial id), best first; nothing is re-evaluated or written. Fewer when fewer trials are
    eligible (logged). A local directory of a sweep or of plain training runs.

    Args:
      experiment_dir: <storage_path>/<name> of a sweep, or a directory of training runs.
      top_k: How many (default: the spec's rank.top_k, else 5).
      metric: Selection metric (default: the spec's run.metric, else valid_esp_rmse).

    Raises:
      RankError: one line naming the path (missing or foreign directory, no eligible trial).
    """
    try:
        s = _settings(Path(experiment_dir), top_k, None, None, metric, None, 16)
        eligible = _eligible(s, discover_trials(s.experiment, s.metric))
    except RankError:
        raise
    except (AnalysisError, ckpt.CheckpointError, ConfigError) as e:
        raise RankError(str(e)) from None
    top = sorted(eligible, key=lambda t: (t.value, t.trial_id))[: s.top_k]
    if len(top) < s.top_k:
        log.warning("%s: only %d rankable trials for top_k = %d", s.experiment, len(top), s.top_k)
    return [t.checkpoint for t in top if t.checkpoint is not None]


# --------------------------------------------------------------------------- writing


def _write(r: Ranking) -> list[str]:
    """Writes best_model/, the plots, ranking.csv, ranking.json and report.md into the
    experiment directory; returns their paths."""
    exp = r.settings.experiment.resolve()
    _write_best_model(r.best_model, r.top[0], r.info)
    models = [BEST_MODEL]
    if "pareto" in r.info:
        with _io.atomic_directory(exp / PARETO_DIR) as tmp:
            for e in r.top:
                name = f"trial_{e.trial.trial_id}"
                _model_files(tmp / name, e, r.info, exp / PARETO_DIR / name)
        models.append(PARETO_DIR)
    written = plots.write_plots(exp, r)
    _io.write_csv(exp / "ranking.csv", r.df)
    _io.write_json(
        exp / "ranking.json",
        {**r.info, "plots": written, "ranking": r.rows, "versions": ckpt.package_versions()},
    )
    _io.write_text(exp / "report.md", report.markdown(r, written))
    tables = r.info["breakdown"]["tables"]
    _io.write_csv(
        exp / "breakdown.csv",
        [{"kind": kind, **row} for kind, rows in tables.items() for row in rows],
    )
    return [
        str(exp / f)
        for f in ("ranking.csv", "ranking.json", "report.md", "breakdown.csv", *written, *models)
    ]


def _write_best_model(target: Path, e: Evaluated, info: dict) -> Path:
    """`target` (best_model/): the winner's checkpoint files, config, split, history and
    evaluation, swapped in as a whole."""
    with _io.atomic_directory(target) as tmp:
        _model_files(tmp, e, info, target)
    return target


def _model_files(tmp: Path, e: Evaluated, info: dict, target: Path) -> None:
    """A trial's model written into directory `tmp` (created), which becomes `target`: its
    checkpoint files, config, split, history and evaluation."""
    t, c, split = e.trial, e.checkpoint, info["split"]
    tmp.mkdir(parents=True, exist_ok=True)
    for name in (ckpt.STATE_FILE, ckpt.META_FILE):
        shutil.copy2(c.path / name, tmp / name)
    if (t.path / "history.csv").is_file():
        shutil.copy2(t.path / "history.csv", tmp / "history.csv")
    _io.write_json(tmp / "config.json", c.config.to_dict())
    if c.split_record is not None:
        _io.write_json(tmp / "split.json", c.split_record)
    selected = {"metric": info["metric"], "mode": info["mode"], "value": t.value}
    if "pareto" in info:  # chosen from the front: by which rule, at which objective values
        front = info["pareto"]
        point = next(p for p in front["points"] if p["trial_id"] == t.trial_id)
        selected.update(
            select=front["select"],
            selected=front["front"][0] == t.trial_id,
            objectives={o: point[o] for o in front["objectives"]},
        )
    _io.write_json(
        tmp / "evaluation.json",
        {
            "trial_id": t.trial_id,
            "source_checkpoint": str(c.path),
            "epoch": c.epoch,
            "selected_by": selected,
            "split": split,
            "metrics": {f"{split}_{k}": v for k, v in e.analysis.metrics.items()},
            "data_checksum": info["data"]["checksum"],
            "reproduce": f"python -m dcmtune.analysis {target} --split {split}",
        },
    )
