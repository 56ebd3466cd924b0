"""The one metric registry: every metric's name, unit and label, and where it may appear.

The trainer's table, `tune.report`, the sweep spec's `metric:`, analysis and the ranking CSV all
use these names and derive their rows, units and columns from here. Plain Python: the sweep
driver reads it without importing JAX.
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "Metric",
    "METRICS",
    "TRAINED",
    "TABLE_ROWS",
    "SWEEP_METRICS",
    "COST_METRICS",
    "OBJECTIVE_METRICS",
    "EVAL_METRICS",
    "SPLITS",
    "unit",
    "label",
    "axis_label",
    "table_rows",
    "split_of",
    "base_name",
]

SPLITS = ("train", "valid", "test")


@dataclasses.dataclass(frozen=True)
class Metric:
    """One metric.

    Attributes:
      name: The split-free name (`esp_rmse`); per split it is `valid_esp_rmse` etc.
      unit: Unit string ("" when dimensionless).
      label: Human name for plots and reports.
      trained: Computed every epoch by the trainer (loss.finalize_metrics) for train and valid.
      in_table: A row of the per-epoch Train/Valid table.
      sweepable: Allowed as a sweep's `run.metric` (lower is better).
      ranked: A column of the ranking's re-evaluation on the ranking split.
      cost: A deterministic cost of a model, split-free, computed from its config
        (`dcmtune.model.cost`): allowed as a further objective in a sweep's `run.objectives`.
    """

    name: str
    unit: str
    label: str
    trained: bool = False
    in_table: bool = False
    sweepable: bool = False
    ranked: bool = False
    cost: bool = False


_KCAL = "kcal/mol/e"
_PERCENTILES = (50, 90, 95, 99)

METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("loss", "", "loss", trained=True, in_table=True, sweepable=True),
        Metric(
            "esp_rmse", _KCAL, "ESP RMSE", trained=True, in_table=True, sweepable=True, ranked=True
        ),
        Metric(
            "esp_mae", _KCAL, "ESP MAE", trained=True, in_table=True, sweepable=True, ranked=True
        ),
        Metric(
            "mono_mae",
            "e",
            "monopole MAE",
            trained=True,
            in_table=True,
            sweepable=True,
            ranked=True,
        ),
        Metric(
            "mono_rmse",
            "e",
            "monopole RMSE",
            trained=True,
            in_table=True,
            sweepable=True,
            ranked=True,
        ),
        Metric("mono_mean", "e", "mean monopole", trained=True, in_table=True),
        Metric("mono_std", "e", "monopole std", trained=True, in_table=True),
        Metric(
            "dipole_mae",
            "D",
            "dipole MAE",
            trained=True,
            in_table=True,
            sweepable=True,
            ranked=True,
        ),
        # Analysis-only (re-evaluation of a checkpoint on a split).
        Metric("esp_max_abs_error", _KCAL, "ESP max |error|", ranked=True),
        *(
            Metric(f"esp_abs_error_p{p}", _KCAL, f"ESP |error| p{p}", ranked=p == 95)
            for p in _PERCENTILES
        ),
        Metric("esp_r2", "", "ESP R²", ranked=True),
        Metric("esp_pearson_r", "", "ESP Pearson r"),
        Metric("total_charge_max_error", "e", "max total-charge error"),
        Metric("dipole_magnitude_mae", "D", "dipole magnitude MAE"),
        Metric("dipole_error_norm_mean", "D", "mean |dipole error|"),
        Metric("n_conformers", "", "conformers", ranked=True),
        Metric("n_molecules", "", "molecules", ranked=True),
        Metric("n_grid_points", "", "grid points"),
        # Costs of a model (dcmtune.model.cost): the same for every epoch of a trial. Prediction
        # time is measured by benches, never optimised: it is noisy and would break --resume.
        Metric("charges_per_atom", "", "charges per atom", cost=True),
        Metric("n_params", "", "parameters", cost=True),
        Metric("flops_per_molecule", "", "XLA FLOPs per molecule", cost=True),
    )
}

TRAINED = tuple(n for n, m in METRICS.items() if m.trained)
TABLE_ROWS = tuple(n for n, m in METRICS.items() if m.in_table)
SWEEP_METRICS = tuple(
    f"{split}_{n}" for split in ("valid", "train") for n, m in METRICS.items() if m.sweepable
)
EVAL_METRICS = tuple(n for n, m in METRICS.items() if m.ranked)
COST_METRICS = tuple(n for n, m in METRICS.items() if m.cost)
# What `run.objectives` may name: a validation metric (lower is better) or a cost.
OBJECTIVE_METRICS = tuple(m for m in SWEEP_METRICS if m.startswith("valid_")) + COST_METRICS


def split_of(name: str) -> str | None:
    """`valid_esp_rmse` -> `valid`; a split-free name -> None."""
    head = name.split("_", 1)[0]
    return head if head in SPLITS and "_" in name else None


def base_name(name: str) -> str:
    """`valid_esp_rmse` -> `esp_rmse`."""
    return name.split("_", 1)[1] if split_of(name) else name


def unit(name: str) -> str:
    """Unit of a metric, with or without a split prefix ("" if unknown or dimensionless)."""
    m = METRICS.get(base_name(name))
    return m.unit if m else ""


def label(name: str) -> str:
    """`esp_rmse [kcal/mol/e]`: the name with its unit, for tables."""
    u = unit(name)
    return f"{name} [{u}]" if u else name


def table_rows() -> tuple[tuple[str, str], ...]:
    """(name, label) of the per-epoch table's rows, in order."""
    return tuple((n, label(n)) for n in TABLE_ROWS)


def axis_label(name: str) -> str:
    """`valid_esp_rmse` -> `ESP RMSE (kcal/mol/e)`, for plot axes."""
    m = METRICS.get(base_name(name))
    text = m.label if m else base_name(name)
    return f"{text} ({m.unit})" if m and m.unit else text
