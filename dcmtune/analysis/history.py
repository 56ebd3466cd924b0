"""A run's training history: per-epoch metrics read without loading any parameters.

Reads `history.csv`, or the `meta.json` files of its checkpoints, and orders epochs
numerically; finds the best epoch and whether the run diverged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from dcmtune.analysis.checkpoints import AnalysisError
from dcmtune.train import checkpoints as ckpt

__all__ = ["TrainingHistory", "analyze_training_history"]


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

    def best(self, metric: str = "valid_loss") -> tuple[int, float]:
        """(epoch, value) of the lowest finite `metric`; ties go to the earliest epoch.
        (0, NaN) when no epoch has a finite value."""
        df = self.history_df
        if metric not in df:
            return 0, float("nan")
        vals = pd.to_numeric(df[metric], errors="coerce")
        ok = np.isfinite(vals.to_numpy(dtype=np.float64))
        if not ok.any():
            return 0, float("nan")
        v = vals.to_numpy(dtype=np.float64)
        v = np.where(ok, v, np.inf)
        i = int(np.argmin(v))  # first occurrence of the minimum = earliest epoch
        return int(df["epoch"].iloc[i]), float(vals.iloc[i])

    def to_dict(self) -> dict:
        return {
            "best_epoch": self.best_epoch,
            "best_valid_loss": self.best_valid_loss,
            "final_train_loss": self.final_train_loss,
            "final_valid_loss": self.final_valid_loss,
            "num_epochs": self.num_epochs,
            "diverged": self.diverged,
            "source": self.source,
        }


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
        raise AnalysisError(
            f"{path}: no training history (expected history.csv, {ckpt.META_FILE}"
            " or checkpoints/*/meta.json of a dcmtune run)"
        )
    # The most complete history any checkpoint carries, plus each checkpoint's own epoch row
    # (covers runs whose latest/ is gone but whose epoch_N/ checkpoints remain).
    d, meta = max(metas, key=lambda dm: int(dm[1].get("epoch", 0)))
    rows = {int(r["epoch"]): r for r in meta.get("history", []) if "epoch" in r}
    for _, m in metas:
        if "metrics" in m and "epoch" in m:
            rows.setdefault(int(m["epoch"]), dict(m["metrics"], epoch=int(m["epoch"])))
    return list(rows.values()), f"{root}/*/{ckpt.META_FILE}"


def analyze_training_history(exp_dir: str | Path) -> TrainingHistory:
    """The per-epoch history of a run (or trial, or checkpoint) directory, in numeric epoch
    order, with the best epoch and final losses. Never loads parameters.

    Raises:
      AnalysisError: the directory is missing or holds no dcmtune history.
    """
    path = Path(exp_dir)
    if not path.is_dir():
        raise AnalysisError(
            f"{path}: not found; expected a dcmtune run directory (config.json, "
            "history.csv, checkpoints/)"
        )
    rows, source = _history_rows(path)
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    if df.empty or "epoch" not in df:
        raise AnalysisError(f"{source}: no epochs recorded (expected rows with an 'epoch' column)")
    df = _numeric_epochs(df)
    last = df.iloc[-1]
    h = TrainingHistory(
        history_df=df,
        best_epoch=0,
        best_valid_loss=float("nan"),
        final_train_loss=_number(last, "train_loss"),
        final_valid_loss=_number(last, "valid_loss"),
        num_epochs=int(last["epoch"]),
        diverged=_diverged(df),
        source=source,
    )
    best_epoch, best_loss = h.best("valid_loss")
    return dataclasses.replace(h, best_epoch=best_epoch, best_valid_loss=best_loss)


def _numeric_epochs(df: pd.DataFrame) -> pd.DataFrame:
    """One row per epoch (the last of repeats), in numeric epoch order, number columns as
    numbers."""
    df = df.copy()
    df["epoch"] = pd.to_numeric(df["epoch"], errors="coerce")
    df = df[df["epoch"].notna()]
    df["epoch"] = df["epoch"].astype(int)
    df = df.drop_duplicates("epoch", keep="last").sort_values("epoch", kind="stable")
    df = df.reset_index(drop=True)
    for col in df.columns:
        if col != "epoch" and df[col].dtype == object:
            converted = pd.to_numeric(df[col], errors="coerce")
            if converted.notna().sum() == df[col].notna().sum():
                df[col] = converted
    return df


def _number(row, key: str) -> float:
    v = row.get(key) if hasattr(row, "get") else None
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _diverged(df: pd.DataFrame) -> bool:
    """Whether an epoch was flagged diverged or reported a non-finite loss."""
    flags = "diverged" in df and pd.to_numeric(df["diverged"], errors="coerce").fillna(0)
    diverged = bool(flags is not False and flags.astype(bool).any())
    for col in ("train_loss", "valid_loss"):
        if col in df:
            values = pd.to_numeric(df[col], errors="coerce").to_numpy(np.float64)
            diverged |= bool((~np.isfinite(values)).any())
    return diverged
