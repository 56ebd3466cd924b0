"""Checkpoint analysis: metrics against an independent float64 evaluation, padding invariance,
agreement with the trainer, training history without parameters, summaries and the CLI."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from dcmtune.analysis import commands as analysis
from dcmtune.analysis.checkpoints import AnalysisError, checkpoint_data
from dcmtune.analysis.checkpoints import open_checkpoint as load_checkpoint
from dcmtune.analysis.evaluate import (
    analyze_checkpoint,
    batch_analysis_summary,
    compare_checkpoints,
    print_analysis_summary,
)
from dcmtune.analysis.history import analyze_training_history
from dcmtune.config import ExperimentConfig, ModelConfig, TrainingConfig
from dcmtune.data import load_dataset, pad_to
from dcmtune.train import checkpoints as ckpt

TINY = dict(n_dcm=2, features=4, max_degree=1, num_iterations=1, num_basis_functions=4)
EPOCHS = 12
# Independent constants (not imported from dcmtune): a0 in Angstrom, kcal/mol per Hartree.
A0, KCAL = 0.529177210903, 627.509474


@pytest.fixture(scope="module")
def run_dir(tiny_data_file, tmp_path_factory):
    """A 12-epoch run of a tiny model on the tiny synthetic file, with a checkpoint every
    epoch (epoch_1 ... epoch_12 kept)."""
    from dcmtune.train.loop import fit

    out = tmp_path_factory.mktemp("analysis_runs")
    cfg = ExperimentConfig(
        name="tiny",
        output_dir=str(out),
        random_seed=1,
        model=ModelConfig(**TINY),
        training=TrainingConfig(
            num_epochs=EPOCHS,
            batch_size=4,
            learning_rate=1e-2,
            warmup_epochs=1,
            save_every_n_epochs=1,
            keep_top_k_checkpoints=EPOCHS,
        ),
    ).replace(**{"data.data_files": [str(tiny_data_file)], "data.num_valid": 6, "data.num_test": 6})
    result = fit(cfg)
    assert result.status == "completed"
    return result.run_dir


@pytest.fixture(scope="module")
def best(run_dir):
    return load_checkpoint(run_dir)


@pytest.fixture(scope="module")
def analysis_on_test(best):
    return analyze_checkpoint(best, "test", batch_size=4)


def _numpy_esp(charges, positions, R, N, grid, n_grid):
    """ESP (Hartree/e) of point charges at the valid grid points, float64, per conformer."""
    out = []
    for i in range(len(N)):
        n, g = int(N[i]), int(n_grid[i])
        q = charges[i, :n].astype(np.float64).reshape(-1)
        p = positions[i, :n].astype(np.float64).reshape(-1, 3)
        r = np.linalg.norm(grid[i, :g, None, :].astype(np.float64) - p[None], axis=-1) / A0
        out.append((q[None, :] / r).sum(axis=1))
    return out


def test_esp_rmse_matches_an_independent_float64_evaluation(analysis_on_test):
    a = analysis_on_test
    d = a.data
    assert a.charges.shape == (d.num_conformers, d.num_atoms, TINY["n_dcm"])
    esp = _numpy_esp(a.charges, a.positions, d.R, d.N, d.grid, d.n_grid)
    errors = [v - d.esp[i, : d.n_grid[i]].astype(np.float64) for i, v in enumerate(esp)]
    per_conf_mse = np.array([np.mean(e**2) for e in errors])
    pooled = np.abs(np.concatenate(errors)) * KCAL
    np.testing.assert_allclose(
        a.metrics["esp_rmse"], np.sqrt(per_conf_mse.mean()) * KCAL, rtol=1e-5
    )
    np.testing.assert_allclose(
        a.metrics["esp_mae"], np.mean([np.mean(np.abs(e)) for e in errors]) * KCAL, rtol=1e-5
    )
    np.testing.assert_allclose(a.metrics["esp_max_abs_error"], pooled.max(), rtol=1e-5)
    np.testing.assert_allclose(a.metrics["esp_abs_error_p95"], np.percentile(pooled, 95), rtol=1e-5)
    ref = np.concatenate([d.esp[i, : d.n_grid[i]] for i in range(d.num_conformers)]) * KCAL
    pred = np.concatenate(esp) * KCAL
    r2 = 1 - np.sum((pred - ref) ** 2) / np.sum((ref - ref.mean()) ** 2)
    np.testing.assert_allclose(a.metrics["esp_r2"], r2, rtol=1e-5)
    np.testing.assert_allclose(a.metrics["esp_pearson_r"], np.corrcoef(pred, ref)[0, 1], rtol=1e-5)
    np.testing.assert_allclose(a.per_conformer["esp_rmse"], np.sqrt(per_conf_mse) * KCAL, rtol=1e-5)


def test_monopole_and_dipole_metrics_count_real_atoms_only(analysis_on_test):
    a = analysis_on_test
    d = a.data
    real = d.Z > 0
    assert np.all(a.charges[~real] == 0) and np.all(a.mono_pred[~real] == 0)
    q = a.charges.astype(np.float64).sum(axis=-1)
    per_mol_mae = [
        np.mean(np.abs(q[i, real[i]] - d.mono[i, real[i]])) for i in range(d.num_conformers)
    ]
    np.testing.assert_allclose(a.metrics["mono_mae"], np.mean(per_mol_mae), rtol=1e-5)
    np.testing.assert_allclose(a.metrics["mono_std"], np.std(q[real]), rtol=1e-4)
    np.testing.assert_allclose(q.sum(axis=1), d.Q, atol=1e-5)
    dip = (
        np.stack(
            [
                (
                    a.charges[i, : d.N[i]].astype(np.float64)[..., None]
                    * (a.positions[i, : d.N[i]].astype(np.float64) - d.com[i])
                ).sum(axis=(0, 1))
                for i in range(d.num_conformers)
            ]
        )
        * 4.80320471
    )
    np.testing.assert_allclose(a.metrics["dipole_mae"], np.mean(np.abs(dip - d.dipole)), rtol=1e-4)


def test_metrics_equal_the_trainers_on_the_validation_split(best):
    a = analyze_checkpoint(best, "valid")
    recorded = best.meta["metrics"]
    for name in ("loss", "esp_rmse", "esp_mae", "mono_mae", "mono_rmse", "dipole_mae"):
        np.testing.assert_allclose(
            a.metrics[name], recorded[f"valid_{name}"], rtol=1e-5, err_msg=name
        )
    assert a.epoch == best.meta["epoch"]


def test_padding_does_not_change_any_metric(best):
    data = checkpoint_data(best, "test")
    padded = pad_to(data, data.num_atoms + 5, data.num_grid + 37)
    a = analyze_checkpoint(best, data, batch_size=4)
    b = analyze_checkpoint(best, padded, batch_size=5)  # also other dummy-molecule padding
    assert a.metrics.keys() == b.metrics.keys()
    for k, v in a.metrics.items():
        np.testing.assert_allclose(b.metrics[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    pd.testing.assert_frame_equal(a.per_molecule, b.per_molecule, rtol=1e-5)
    pd.testing.assert_frame_equal(a.per_conformer, b.per_conformer, rtol=1e-5, atol=1e-6)


def test_split_names_use_the_saved_split_and_check_the_data(best, run_dir, tmp_path):
    split = json.loads((run_dir / "split.json").read_text())
    a = analyze_checkpoint(best, "test")
    assert a.per_conformer["conformer"].tolist() == split["indices"]["test"]
    assert set(a.per_molecule["mol_id"]) == set(split["mol_ids"]["test"])
    other = load_dataset([])  # the bundled demo set is not this run's data
    with pytest.raises(AnalysisError, match="not the data this run was trained on"):
        checkpoint_data(best, "test", data=other)


def test_history_is_numeric_and_reads_no_parameters(run_dir, tmp_path, monkeypatch):
    def no_params(*args, **kwargs):
        raise AssertionError("reading a history must not load parameters")

    monkeypatch.setattr(ckpt, "load_checkpoint", no_params)
    monkeypatch.setattr("dcmtune.analysis.evaluate.open_checkpoint", no_params)
    expected = list(range(1, EPOCHS + 1))

    h = analyze_training_history(run_dir)
    assert h.history_df["epoch"].tolist() == expected
    valid = h.history_df["valid_loss"].to_numpy()
    assert h.best_epoch == int(np.argmin(valid)) + 1
    assert h.best_valid_loss == pytest.approx(valid.min())
    assert h.num_epochs == EPOCHS and not h.diverged
    assert h.final_valid_loss == pytest.approx(valid[-1])

    # Rows out of order in history.csv.
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    df = pd.read_csv(run_dir / "history.csv")
    df.sample(frac=1.0, random_state=0).to_csv(shuffled / "history.csv", index=False)
    assert analyze_training_history(shuffled).history_df["epoch"].tolist() == expected

    # Only the periodic checkpoints epoch_1 .. epoch_12 (as the reference's epoch files).
    periodic = tmp_path / "periodic"
    (periodic / "checkpoints").mkdir(parents=True)
    for e in expected:
        src = run_dir / "checkpoints" / f"epoch_{e}"
        (periodic / "checkpoints" / src.name).mkdir()
        shutil.copy(src / ckpt.META_FILE, periodic / "checkpoints" / src.name)
        meta = json.loads((src / ckpt.META_FILE).read_text())
        meta["history"] = []  # force the per-checkpoint rows
        meta["meta_sha256"] = ckpt._meta_digest(meta)  # re-sealed: meta.json is checksummed
        (periodic / "checkpoints" / src.name / ckpt.META_FILE).write_text(json.dumps(meta))
    h2 = analyze_training_history(periodic)
    assert h2.history_df["epoch"].tolist() == expected
    assert h2.best_epoch == h.best_epoch


def test_compare_checkpoints(run_dir, analysis_on_test):
    paths = [run_dir / "checkpoints" / n for n in ("best", "latest", "epoch_1")]
    df = compare_checkpoints(paths, "test", labels=["best", "last", "first"])
    assert df["label"].tolist() == ["best", "last", "first"]
    assert df["epoch"].tolist()[2] == 1
    np.testing.assert_allclose(
        df.loc[0, "esp_rmse"], analysis_on_test.metrics["esp_rmse"], rtol=1e-5
    )
    with pytest.raises(ValueError, match="labels"):
        compare_checkpoints(paths, "test", labels=["a"])


def test_batch_analysis_summary_writes_its_files(run_dir, tmp_path, analysis_on_test):
    res = batch_analysis_summary(run_dir, "test", tmp_path / "out")
    report = json.loads((tmp_path / "out" / "best_analysis.json").read_text())
    assert report["metrics"]["esp_rmse"] == pytest.approx(
        analysis_on_test.metrics["esp_rmse"], rel=1e-5
    )
    assert report["units"]["esp_rmse"] == "kcal/mol/e"
    pred = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert len(pred) == analysis_on_test.data.num_conformers
    hist = pd.read_csv(tmp_path / "out" / "training_history.csv")
    assert hist["epoch"].tolist() == list(range(1, EPOCHS + 1))
    assert set(res["files"]) == {
        "best_analysis.json",
        "predictions.csv",
        "training_history.csv",
        "breakdown.csv",
    }
    shells = pd.read_csv(tmp_path / "out" / "breakdown.csv").query("kind == 'shell'")
    assert shells["n_points"].sum() == analysis_on_test.metrics["n_grid_points"]


def test_summary_text(analysis_on_test):
    text = print_analysis_summary(analysis_on_test)
    assert "esp_rmse" in text and "kcal/mol/e" in text and "Worst molecules" in text
    assert f"{analysis_on_test.metrics['esp_rmse']:.5g}" in text


@pytest.mark.parametrize("kind", ["missing", "empty", "foreign"])
def test_cli_bad_directory_exits_2_with_one_line(kind, tmp_path, capsys):
    path = tmp_path / "x"
    if kind != "missing":
        path.mkdir()
    if kind == "foreign":
        (path / "notes.txt").write_text("hello")
    assert analysis.main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "expected" in err[0]
    with pytest.raises(AnalysisError):
        analyze_training_history(path)


def test_cli_prints_the_summary(run_dir, capsys):
    assert analysis.main([str(run_dir), "--split", "valid"]) == 0
    out = capsys.readouterr().out
    assert "Evaluated on: valid" in out and "esp_rmse" in out
