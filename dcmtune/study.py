"""The Optuna study of a sweep: where it is stored, and which hyper-parameters mattered.

`searcher.storage` in a spec takes

  optuna.log                      a journal file (any path ending .log)      default
  journal:///study.log            a journal file, written as a URL
  sqlite:///study.db              an SQL database (any SQLAlchemy URL: sqlite, postgresql, ...)
  null                            no file: the study lives in memory (saved with the experiment)

Relative paths resolve in the experiment directory (<storage_path>/<name>/), so the study stays
with the sweep it belongs to; an absolute path is written with one more slash, as in SQLAlchemy
(`sqlite:////data/study.db`, `journal:////data/study.log`) or plainly (`/data/study.log`).
Watch a study live with `optuna-dashboard <experiment>/optuna.log` (the `viz` extra).

`param_importances` rebuilds a study from the ranked trials (each at its best epoch, as the
ranking sees them) and asks Optuna's default evaluator (PED-ANOVA) how much of the spread of the
metric each searched hyper-parameter explains. Nothing here imports Optuna until it is needed.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

__all__ = ["DEFAULT_STORAGE", "StorageError", "check_storage", "resolve_storage",
           "open_storage", "is_journal", "distributions", "param_importances"]

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "optuna.log"
_JOURNAL = "journal:///"
_SQLITE = "sqlite:///"


class StorageError(ValueError):
    """`searcher.storage` is not a storage; one line naming the key."""


def check_storage(value: Any, key: str = "searcher.storage",
                  error: type[ValueError] = StorageError) -> Optional[str]:
    """Validates a storage as written in a spec (None = in memory); returns it unchanged.

    Raises:
      `error` (StorageError by default): one line naming `key`.
    """
    if value is None:
        return None
    ok = isinstance(value, str) and value.strip() == value and (
        (value.startswith(_JOURNAL) and len(value) > len(_JOURNAL))
        or ("://" in value and not value.startswith("journal:"))
        or (value.endswith(".log") and "://" not in value and len(value) > 4))
    if not ok:
        raise error(f"{key}: expected an Optuna storage URL such as sqlite:///study.db, "
                           f"a journal file such as optuna.log or journal:///optuna.log, or "
                           f"null (in memory), got {value!r}")
    return value


def resolve_storage(value: Optional[str], experiment_dir: str | Path) -> Optional[str]:
    """The storage with relative paths made absolute in `experiment_dir`.

    Returns:
      None (in memory), an SQLAlchemy URL, or the absolute path of a journal file (never
      containing "://", see `is_journal`).
    """
    if value is None:
        return None
    exp = Path(experiment_dir)

    def absolute(p: str) -> Path:
        path = Path(p).expanduser()
        return (path if path.is_absolute() else exp / path).resolve()

    if value.startswith(_JOURNAL):
        return str(absolute(value[len(_JOURNAL):]))
    if "://" not in value:
        return str(absolute(value))
    if value.startswith(_SQLITE) and len(value) > len(_SQLITE) and not value.startswith(
            _SQLITE + "/") and not value[len(_SQLITE):].startswith(":memory:"):
        return _SQLITE + str(absolute(value[len(_SQLITE):]))
    return value


def is_journal(resolved: str) -> bool:
    """Whether a resolved storage is a journal file (else an SQL URL)."""
    return "://" not in resolved


def open_storage(resolved: str):
    """The Optuna storage object of a resolved storage (creates the directory of a journal or
    sqlite file)."""
    import optuna

    if is_journal(resolved):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        Path(resolved).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(resolved))
    if resolved.startswith(_SQLITE + "/"):
        Path(resolved[len(_SQLITE):]).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(resolved)


# --------------------------------------------------------------------------- importances


def distributions(search: Mapping[str, Mapping[str, Sequence]]) -> dict:
    """Optuna distributions of a spec's search space as recorded ({key: {kind: args}})."""
    from optuna.distributions import (CategoricalDistribution, FloatDistribution,
                                      IntDistribution)

    out = {}
    for key, d in search.items():
        (kind, args), = d.items()
        if kind == "choice":
            out[key] = CategoricalDistribution(list(args))
        elif kind == "randint":
            out[key] = IntDistribution(int(args[0]), int(args[1]))
        elif kind == "quniform" and all(isinstance(a, int) for a in args):
            out[key] = IntDistribution(args[0], args[1], step=args[2])
        elif kind == "quniform":
            out[key] = FloatDistribution(args[0], args[1], step=args[2])
        else:
            out[key] = FloatDistribution(args[0], args[1], log=kind == "loguniform")
    return out


def param_importances(points: Sequence[Mapping[str, Any]], values: Sequence[float],
                      search: Mapping[str, Mapping[str, Sequence]], mode: str = "min"
                      ) -> dict[str, float]:
    """How much each searched hyper-parameter explains of the metric, summing to 1.

    Args:
      points: Each trial's searched point (dotted key -> value).
      values: Each trial's metric (its best epoch's, as ranked); non-finite ones are skipped.
      search: The spec's search space as recorded ({key: {kind: args}}).
      mode: "min" or "max", the direction of the metric.

    Returns:
      {key: importance}, most important first (Optuna's default evaluator, PED-ANOVA); empty
      with fewer than 3 usable trials or nothing searched.
    """
    import optuna

    dists = distributions(search)
    trials = []
    for point, value in zip(points, values):
        if value is None or not math.isfinite(float(value)) or not set(dists) <= set(point):
            continue
        params = {k: point[k] for k in dists}
        try:
            trials.append(optuna.trial.create_trial(params=params, distributions=dists,
                                                    value=float(value)))
        except ValueError as e:  # a value outside the recorded space (an edited spec)
            log.info("importances: trial point %s skipped (%s)", params, e)
    if not dists or len(trials) < 3:
        return {}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" line
    try:
        study = optuna.create_study(direction="minimize" if mode == "min" else "maximize")
        study.add_trials(trials)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-feature and few-trials warnings
            result = optuna.importance.get_param_importances(study)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return {k: float(v) for k, v in result.items()}
