"""The one metric registry: the table, the sweep, analysis and ranking all derive from it."""

import numpy as np
from conftest import loss_weights as LossWeights

from dcmtune import metrics
from dcmtune.cli import format_epoch_table
from dcmtune.model.loss import METRIC_NAMES, SUM_KEYS, finalize_metrics
from dcmtune.sweep.spec import SWEEP_METRICS


def test_trainer_reports_exactly_the_registry_trained_metrics():
    sums = {k: 1.0 for k in SUM_KEYS}
    assert set(finalize_metrics(sums, LossWeights())) == set(metrics.TRAINED) == set(METRIC_NAMES)


def test_sweep_metrics_come_from_the_registry():
    assert SWEEP_METRICS == metrics.SWEEP_METRICS
    for name in SWEEP_METRICS:
        assert metrics.METRICS[metrics.base_name(name)].sweepable
    assert "valid_esp_rmse" in SWEEP_METRICS and "valid_mono_mean" not in SWEEP_METRICS


def test_table_rows_and_units_come_from_the_registry():
    m = {"epoch": 1, "step": 1, "lr": 1e-3, "batch_time": 0.1, "epoch_time": 1.0}
    for split in ("train", "valid"):
        m.update({f"{split}_{n}": 1.0 for n in metrics.TRAINED})
    table = format_epoch_table(1, 1, m, metrics.table_rows())
    labels = [
        line.split()[0] + (" " + line.split()[1] if "[" in line else "")
        for line in table.splitlines()[2:-1]
    ]
    assert labels == [metrics.label(n) for n in metrics.TABLE_ROWS]
    assert "esp_rmse [kcal/mol/e]" in table and "dipole_mae [D]" in table


def test_units_and_labels():
    assert metrics.unit("valid_esp_rmse") == metrics.unit("esp_rmse") == "kcal/mol/e"
    assert metrics.unit("test_mono_mae") == "e" and metrics.unit("loss") == ""
    assert metrics.axis_label("valid_esp_rmse") == "ESP RMSE (kcal/mol/e)"
    assert metrics.split_of("valid_loss") == "valid" and metrics.split_of("esp_r2") is None
    assert np.all([metrics.unit(f"esp_abs_error_p{p}") == "kcal/mol/e" for p in (50, 95)])
