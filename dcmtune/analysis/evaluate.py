"""Re-evaluation of trained checkpoints: metrics, per-conformer and per-molecule errors.

The model is rebuilt from the checkpoint's own config and evaluated with the trainer's one
evaluation step (`dcmtune.train.step.predict_batch`), so the numbers here mean exactly what the
training table and Tune report: `esp_rmse` is the square root of the mean over conformers of
each conformer's mean squared ESP error over its valid grid points, in kcal/mol/e; monopole
metrics count real atoms only; padding (atoms, grid points, dummy molecules) changes nothing.
Pooled metrics (max |error|, percentiles, R², Pearson r) are computed on the host in float64.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dcmtune import _io
from dcmtune import metrics as registry
from dcmtune.analysis.breakdown import Breakdown, esp_breakdown, smiles_from_provenance
from dcmtune.analysis.checkpoints import (
    AnalysisError,
    LoadedCheckpoint,
    _as_loaded,
    checkpoint_data,
    open_checkpoint,
)
from dcmtune.analysis.history import analyze_training_history
from dcmtune.config import ExperimentConfig
from dcmtune.data.batches import make_batch
from dcmtune.data.dataset import ESPData
from dcmtune.data.neighbors import pair_capacity, pair_counts
from dcmtune.units import HARTREE_TO_KCAL

__all__ = [
    "CheckpointAnalysis",
    "analyze_checkpoint",
    "print_analysis_summary",
    "compare_checkpoints",
    "batch_analysis_summary",
    "analysis_breakdown",
    "metric_unit",
    "METRIC_UNITS",
    "PERCENTILES",
]

_PERCENTILE_PREFIX = "esp_abs_error_p"
# The |ESP error| percentiles computed are the ones the metric registry names.
PERCENTILES = tuple(
    int(name[len(_PERCENTILE_PREFIX) :])
    for name in registry.METRICS
    if name.startswith(_PERCENTILE_PREFIX)
)
# Units of the metrics reported here, from the registry (ESP in kcal/mol/e, charges in e,
# dipoles in Debye).
METRIC_UNITS = {name: m.unit for name, m in registry.METRICS.items()}


def metric_unit(name: str) -> str:
    """The unit of a metric name, with or without a split prefix (`test_esp_rmse` ->
    `kcal/mol/e`); "" when dimensionless or unknown. `dcmtune.metrics.unit`, which also
    knows this module's split "all"."""
    return registry.unit(name[len("all_") :] if name.startswith("all_") else name)


# --------------------------------------------------------------------------- evaluation


def _predict(c: LoadedCheckpoint, data: ESPData, batch_size: int) -> dict[str, np.ndarray]:
    """Per-conformer model outputs over all of `data` (host numpy) and the summed metric sums
    (float64)."""
    import jax

    from dcmtune.train.hparams import Hparams
    from dcmtune.train.step import predict_batch

    hp = Hparams.of(c.config.training)
    params = jax.device_put(c.params)  # once, not per batch
    n, cutoff = data.num_conformers, c.config.model.cutoff
    pairs = pair_capacity(int(pair_counts(data.R, data.Z > 0, cutoff).max(initial=0)), exact=True)
    parts: list[dict] = []
    sums: dict[str, float] = {}
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        out = jax.device_get(
            predict_batch(
                params,
                make_batch(data, idx, batch_size, cutoff=cutoff, num_pairs=pairs),
                hp,
                c.config.model,
            )
        )
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
        return (
            self.data.esp[mask].astype(np.float64) * HARTREE_TO_KCAL,
            self.esp_pred[mask].astype(np.float64) * HARTREE_TO_KCAL,
        )

    def to_dict(self) -> dict:
        """A JSON-able summary (no arrays)."""
        return {
            "checkpoint": str(self.checkpoint),
            "epoch": self.epoch,
            "split": self.split,
            "metrics": dict(self.metrics),
            "units": {k: metric_unit(k) for k in self.metrics},
            "per_molecule": self.per_molecule.to_dict(orient="records"),
            "config": self.config.to_dict(),
        }


def _grid_mask(data: ESPData) -> np.ndarray:
    return np.arange(data.num_grid)[None, :] < data.n_grid[:, None]


def analyze_checkpoint(
    checkpoint,
    data: ESPData | str = "test",
    *,
    batch_size: int = 16,
    data_files=None,
    indices: np.ndarray | None = None,
) -> CheckpointAnalysis:
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
    split, data, indices = _evaluated(c, data, data_files, indices)
    if batch_size < 1:
        raise ValueError(f"batch_size: expected at least 1, got {batch_size}")
    out = _predict(c, data, batch_size)
    mono_pred = np.where(data.Z > 0, out["mono"], 0.0)
    metrics = _metrics(c, data, out, mono_pred)
    per_conf = _per_conformer(data, out, mono_pred, indices)
    return CheckpointAnalysis(
        checkpoint=c.path,
        epoch=c.epoch,
        config=c.config,
        split=split,
        metrics=metrics,
        per_conformer=per_conf,
        per_molecule=_per_molecule(per_conf),
        data=data,
        esp_pred=out["esp"],
        charges=out["charges"],
        positions=out["positions"],
        mono_pred=mono_pred,
        dipole_pred=out["dipole"],
    )


def _evaluated(
    c: LoadedCheckpoint, data: ESPData | str, data_files, indices
) -> tuple[str, ESPData, np.ndarray | None]:
    """(split name or "data", the conformers, their dataset indices) to evaluate."""
    split = "data"
    if isinstance(data, str):
        split = data
        data = checkpoint_data(c, split, data_files=data_files)
        record = c.split_record
        has = split != "all" and record is not None
        indices = np.asarray(record["indices"][split], dtype=np.int64) if has else None
    if not isinstance(data, ESPData):
        raise TypeError(f"data: expected an ESPData or a split name, got {type(data).__name__}")
    if data.num_atoms and int(data.Z.max()) > c.config.model.max_atomic_number:
        raise AnalysisError(
            f"{c.path}: the data holds atomic number {int(data.Z.max())}, above "
            f"this model's max_atomic_number {c.config.model.max_atomic_number}"
        )
    return split, data, indices


def _metrics(c: LoadedCheckpoint, data: ESPData, out: dict, mono_pred: np.ndarray) -> dict:
    """The trainer's metrics (same definitions) and the pooled, charge, dipole and count ones."""
    from dcmtune.model.loss import finalize_metrics
    from dcmtune.train.hparams import Hparams

    metrics = finalize_metrics(out["sums"], Hparams.of(c.config.training))
    metrics.update(_pooled_esp_metrics(data, out["esp"]))
    metrics.update(_charge_and_dipole_metrics(data, mono_pred, out["dipole"]))
    metrics.update(
        n_conformers=data.num_conformers,
        n_molecules=int(len(np.unique(data.mol_id))),
        n_grid_points=int(_grid_mask(data).sum()),
        n_params=c.num_params,
    )
    return metrics


def _pooled_esp_metrics(data: ESPData, esp_pred: np.ndarray) -> dict[str, float]:
    """Metrics over all valid grid points pooled (float64 on the host), kcal/mol/e."""
    mask = _grid_mask(data)
    ref = data.esp[mask].astype(np.float64) * HARTREE_TO_KCAL
    pred = esp_pred[mask].astype(np.float64) * HARTREE_TO_KCAL
    abs_err = np.abs(pred - ref)
    ss_tot = float(np.sum((ref - ref.mean()) ** 2))
    out = {
        "esp_max_abs_error": float(abs_err.max()),
        "esp_r2": 1.0 - float(np.sum((pred - ref) ** 2)) / ss_tot if ss_tot > 0 else float("nan"),
        "esp_pearson_r": (
            float(np.corrcoef(pred, ref)[0, 1])
            if len(ref) > 1 and pred.std() > 0 and ref.std() > 0
            else float("nan")
        ),
    }
    for p, v in zip(PERCENTILES, np.percentile(abs_err, PERCENTILES), strict=True):
        out[f"esp_abs_error_p{p}"] = float(v)
    return out


def _charge_and_dipole_metrics(
    data: ESPData, mono_pred: np.ndarray, dipole_pred: np.ndarray
) -> dict[str, float]:
    """Total-charge error (real atoms only) and dipole errors (NaN without reference)."""
    out = {"total_charge_max_error": float(np.max(np.abs(mono_pred.sum(axis=1) - data.Q)))}
    if data.dipole is None:
        out["dipole_magnitude_mae"] = out["dipole_error_norm_mean"] = float("nan")
        return out
    dp, dr = dipole_pred.astype(np.float64), data.dipole.astype(np.float64)
    out["dipole_magnitude_mae"] = float(
        np.mean(np.abs(np.linalg.norm(dp, axis=1) - np.linalg.norm(dr, axis=1)))
    )
    out["dipole_error_norm_mean"] = float(np.mean(np.linalg.norm(dp - dr, axis=1)))
    return out


def _per_conformer(
    data: ESPData, out: dict, mono_pred: np.ndarray, indices: np.ndarray | None
) -> pd.DataFrame:
    """One row per conformer, from the predicted ESP in float64 (the definitions above)."""
    mask = _grid_mask(data)
    err = np.where(mask, out["esp"].astype(np.float64) - data.esp.astype(np.float64), 0.0)
    n_grid = data.n_grid.astype(np.float64)
    mse = np.sum(err**2, axis=1) / n_grid
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
        dq = np.where(data.Z > 0, mono_pred - data.mono, 0.0)
        rows["mono_mae"] = np.sum(np.abs(dq), axis=1) / data.N
        rows["mono_rmse"] = np.sqrt(np.sum(dq**2, axis=1) / data.N)
    for i, ax in enumerate("xyz"):
        rows[f"dipole_pred_{ax}"] = out["dipole"][:, i].astype(np.float64)
    if data.dipole is not None:
        for i, ax in enumerate("xyz"):
            rows[f"dipole_ref_{ax}"] = data.dipole[:, i].astype(np.float64)
        rows["dipole_error_norm"] = np.linalg.norm(out["dipole"] - data.dipole, axis=1)
    return pd.DataFrame(rows)


def _per_molecule(per_conf: pd.DataFrame) -> pd.DataFrame:
    """One row per mol_id: ESP RMSE over its conformers (sqrt of the mean of their MSEs)."""
    per_mol = (
        per_conf.groupby("mol_id", sort=False)
        .agg(
            n_conformers=("esp_rmse", "size"),
            esp_mse=("esp_mse_hartree2", "mean"),
            esp_max_abs_error=("esp_max_abs_error", "max"),
        )
        .reset_index()
    )
    per_mol.insert(2, "esp_rmse", np.sqrt(per_mol.pop("esp_mse")) * HARTREE_TO_KCAL)
    return per_mol


# Sections of the summary: the registry's metrics whose names start with these prefixes.
_SUMMARY_SECTIONS = (
    ("ESP", ("esp_",)),
    ("Monopoles (real atoms)", ("mono_", "total_charge_")),
    ("Dipole", ("dipole_",)),
)
_SUMMARY_ROWS = tuple(
    (title, tuple(n for n in registry.METRICS if n.startswith(prefixes)))
    for title, prefixes in _SUMMARY_SECTIONS
)


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
            lines.append(
                f"  {str(r['mol_id']):<16}{r['esp_rmse']:>10.4f}  "
                f"({int(r['n_conformers'])} conformers)"
            )
    return "\n".join(lines)


def compare_checkpoints(
    paths: Sequence[str | Path],
    data: ESPData | str = "test",
    labels: Sequence[str] | None = None,
    *,
    batch_size: int = 16,
) -> pd.DataFrame:
    """Evaluates several checkpoints on the same data (or each on its own split) and returns
    one row per checkpoint: label, path, epoch, n_params and the metrics of
    `analyze_checkpoint`, sorted as given."""
    paths = list(paths)
    if labels is None:
        labels = [
            Path(p).name
            if Path(p).name not in ("best", "latest")
            else f"{Path(p).parent.parent.name}/{Path(p).name}"
            for p in paths
        ]
    if len(labels) != len(paths):
        raise ValueError(f"labels: expected {len(paths)} labels (one per path), got {len(labels)}")
    rows = []
    for label, path in zip(labels, paths, strict=True):
        a = analyze_checkpoint(path, data, batch_size=batch_size)
        rows.append(
            {
                "label": label,
                "checkpoint": str(a.checkpoint),
                "epoch": a.epoch,
                "split": a.split,
                **a.metrics,
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- summaries


def analysis_breakdown(
    analysis: CheckpointAnalysis, data_files: Sequence[str | Path] | None = None
) -> Breakdown:
    """`esp_breakdown` of a checkpoint analysis, with SMILES from the provenance of
    `data_files` (default: the run's own data files; none when data was passed in memory)."""
    if data_files is None and analysis.split != "data":
        data_files = list(analysis.config.data.data_files)
    smiles = smiles_from_provenance(data_files) if data_files is not None else None
    return esp_breakdown(analysis.data, analysis.esp_pred, smiles)


def batch_analysis_summary(
    exp_dir: str | Path,
    data: ESPData | str | None = None,
    output_dir: str | Path | None = None,
    *,
    batch_size: int = 16,
    data_files=None,
) -> dict:
    """Analyses a run's best checkpoint and history and writes the results.

    Writes into `output_dir` (default `<exp_dir>/analysis`):
      best_analysis.json    metrics of the best checkpoint (units, per-molecule RMSE, config)
                            and the history summary;
      predictions.csv       one row per evaluated conformer (ESP errors, monopole errors,
                            predicted and reference dipoles);
      training_history.csv  the per-epoch history in numeric epoch order;
      breakdown.csv         the ESP RMSE per grid shell, nearest element, molecule size and
                            functional class (`dcmtune.analysis.breakdown`).

    Args:
      exp_dir: A run (or trial) directory, or a checkpoint directory.
      data: What to evaluate on: an ESPData, a split name, or None for the run's test split
        (the validation split when the run has no test split).
      data_files: The run's data files, if they moved (checked by checksum).

    Returns:
      {"analysis": CheckpointAnalysis, "history": TrainingHistory, "breakdown": Breakdown,
      "files": {name: path}}.
    """
    exp = Path(exp_dir)
    history = analyze_training_history(exp)
    c = open_checkpoint(exp, which="best")
    if data is None:
        has_test = bool((c.split_record or {}).get("indices", {}).get("test"))
        data = "test" if has_test or c.split_record is None else "valid"
    analysis = analyze_checkpoint(c, data, batch_size=batch_size, data_files=data_files)
    out = Path(output_dir) if output_dir is not None else exp / "analysis"
    files = {
        "best_analysis.json": out / "best_analysis.json",
        "predictions.csv": out / "predictions.csv",
        "training_history.csv": out / "training_history.csv",
        "breakdown.csv": out / "breakdown.csv",
    }
    breakdown = analysis_breakdown(analysis, data_files)
    _io.write_json(
        files["best_analysis.json"], {**analysis.to_dict(), "history": history.to_dict()}
    )
    _io.write_csv(files["predictions.csv"], analysis.per_conformer)
    _io.write_csv(files["training_history.csv"], history.history_df)
    _io.write_csv(files["breakdown.csv"], breakdown.to_frame())
    return {"analysis": analysis, "history": history, "breakdown": breakdown, "files": files}
