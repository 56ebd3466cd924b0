"""The Optuna study of a sweep: where it is stored.

`searcher.storage` in a spec takes

  optuna.log                      a journal file (any path ending .log)      default
  journal:///study.log            a journal file, written as a URL
  sqlite:///study.db              an SQL database (any SQLAlchemy URL: sqlite, postgresql, ...)
  null                            no file: the study lives in memory (saved with the experiment)

Relative paths resolve in the experiment directory (<storage_path>/<name>/), so the study stays
with the sweep it belongs to; an absolute path is written with one more slash, as in SQLAlchemy
(`sqlite:////data/study.db`, `journal:////data/study.log`) or plainly (`/data/study.log`).
Watch a study live with `optuna-dashboard <experiment>/optuna.log` (the `viz` extra).
Nothing here imports Optuna until it is needed. (Which hyper-parameters mattered is the
ranking's business: `dcmtune.analysis.importances`.)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_STORAGE",
    "StudyError",
    "check_storage",
    "resolve_storage",
    "open_storage",
    "is_journal",
]

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "optuna.log"
_JOURNAL = "journal:///"
_SQLITE = "sqlite:///"


class StudyError(ValueError):
    """`searcher.storage` is not a storage; one line naming the key."""


def check_storage(
    value: Any, key: str = "searcher.storage", error: type[ValueError] = StudyError
) -> str | None:
    """Validates a storage as written in a spec (None = in memory); returns it unchanged.

    Raises:
      `error` (StudyError by default): one line naming `key`.
    """
    if value is None:
        return None
    ok = (
        isinstance(value, str)
        and value.strip() == value
        and (
            (value.startswith(_JOURNAL) and len(value) > len(_JOURNAL))
            or ("://" in value and not value.startswith("journal:"))
            or (value.endswith(".log") and "://" not in value and len(value) > 4)
        )
    )
    if not ok:
        raise error(
            f"{key}: expected an Optuna storage URL such as sqlite:///study.db, "
            f"a journal file such as optuna.log or journal:///optuna.log, or "
            f"null (in memory), got {value!r}"
        )
    return value


def resolve_storage(value: str | None, experiment_dir: str | Path) -> str | None:
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
        return str(absolute(value[len(_JOURNAL) :]))
    if "://" not in value:
        return str(absolute(value))
    if (
        value.startswith(_SQLITE)
        and len(value) > len(_SQLITE)
        and not value.startswith(_SQLITE + "/")
        and not value[len(_SQLITE) :].startswith(":memory:")
    ):
        return _SQLITE + str(absolute(value[len(_SQLITE) :]))
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
        Path(resolved[len(_SQLITE) :]).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(resolved)
