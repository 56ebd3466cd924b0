"""Ensembles of trained models: the mean and the spread in closed form, the top-k of an
experiment, the distrust threshold from the members' validation conformers, the CLI's files and
its refusals.

Members: conftest's `tiny_predict_run` (1 epoch, seed 0, synthetic set) and two more runs of the
same tiny config with training seeds 1 and 2, trained here into one experiment directory
(the same compiled programs, so a few seconds).
"""

import json
import re
import shutil

import ase.io
import numpy as np
import pytest
from ase.build import molecule
from conftest import TINY_PREDICT

from dcmtune.config import ExperimentConfig, ModelConfig, TrainingConfig
from dcmtune.predict import PredictError, load_ensemble, load_model
from dcmtune.predict.commands import main as cli_main
from dcmtune.predict.ensemble import DEFAULT_QUANTILE, spread_of
from dcmtune.units import HARTREE_TO_KCAL


def _tiny_run(synthetic, run_dir, seed, **model):
    from dcmtune.train.loop import fit

    cfg = ExperimentConfig(
        name=run_dir.name,
        random_seed=seed,
        model=ModelConfig(**{**TINY_PREDICT, **model}),
        training=TrainingConfig(
            num_epochs=1, batch_size=4, learning_rate=1e-2, warmup_epochs=0, save_every_n_epochs=0
        ),
    )
    result = fit(cfg, synthetic, run_dir=run_dir)
    assert result.status == "completed"
    return result.run_dir


@pytest.fixture(scope="module")
def experiment(tiny_predict_run, synthetic, tmp_path_factory):
    """A directory of three training runs of one config: training seeds 0, 1, 2."""
    exp = tmp_path_factory.mktemp("ensemble") / "seeds"
    exp.mkdir()
    shutil.copytree(tiny_predict_run, exp / "seed0")
    for seed in (1, 2):
        _tiny_run(synthetic, exp / f"seed{seed}", seed)
    return exp


@pytest.fixture(scope="module")
def water_xyz(tmp_path_factory):
    path = tmp_path_factory.mktemp("ens_in") / "water.xyz"
    ase.io.write(path, [molecule("H2O"), molecule("CH4")])
    return path


def _valid_rmse(run_dir) -> float:
    meta = json.loads((run_dir / "checkpoints" / "best" / "meta.json").read_text())
    return float(meta["metrics"]["valid_esp_rmse"])


def test_identical_members_have_zero_spread_and_equal_the_member(experiment, synthetic):
    run = experiment / "seed1"
    ens = load_ensemble([run, run], calibrate=False)
    member = load_model(run).predict(synthetic)
    preds = ens.predict(synthetic)
    assert len(preds) == synthetic.num_conformers
    for p, m in zip(preds, member, strict=True):
        assert p.spread == 0.0 and p.distrust is None
        np.testing.assert_array_equal(p.esp_points, m.esp_points)
        np.testing.assert_allclose(p.esp, m.esp, rtol=1e-6, atol=0)
        np.testing.assert_allclose(p.monopoles, m.monopoles, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(p.dipole, m.dipole, rtol=1e-6, atol=1e-9)
        assert p.esp_rmse == pytest.approx(m.esp_rmse, rel=1e-5)


def test_two_members_mean_and_spread_in_closed_form(experiment, water_xyz):
    a, b = experiment / "seed1", experiment / "seed2"
    ens = load_ensemble([a, b], threshold=0.0)
    preds = ens.predict(water_xyz)  # no grid in the input: the vdW shells
    pa = load_model(a).predict(water_xyz, esp_points="shell")
    pb = load_model(b).predict(water_xyz, esp_points="shell")
    for p, x, y in zip(preds, pa, pb, strict=True):
        ea, eb = x.esp.astype(np.float64), y.esp.astype(np.float64)
        np.testing.assert_array_equal(p.esp_points, x.esp_points)
        np.testing.assert_allclose(p.esp, (ea + eb) / 2, rtol=1e-12)
        np.testing.assert_allclose(p.esp_std, np.abs(ea - eb) / 2, rtol=1e-9, atol=1e-15)
        expected = np.sqrt(np.mean(((ea - eb) / 2) ** 2)) * HARTREE_TO_KCAL
        assert p.spread == pytest.approx(expected, rel=1e-9) and p.spread > 0
        np.testing.assert_allclose(p.monopoles, (x.monopoles + y.monopoles) / 2, rtol=1e-6)
        np.testing.assert_allclose(p.dipole, (x.dipole + y.dipole) / 2, rtol=1e-6)
        assert p.distrust is True and "distrust threshold" in p.warnings[-1]
    assert spread_of(np.array([[1.0, 3.0], [3.0, 5.0]])) == pytest.approx(HARTREE_TO_KCAL)


def test_experiment_directory_gives_its_top_k_by_validation(experiment):
    runs = sorted(experiment.iterdir(), key=_valid_rmse)
    ens = load_ensemble([experiment], top_k=2, calibrate=False)
    assert [m.path for m in ens.members] == [r / "checkpoints" / "best" for r in runs[:2]]
    with pytest.raises(PredictError, match="at least 2"):
        load_ensemble([experiment], top_k=1)


def test_threshold_is_the_quantile_of_the_validation_spread(experiment, synthetic):
    runs = [experiment / "seed0", experiment / "seed1"]
    ens = load_ensemble(runs, data=synthetic)
    split = json.loads((runs[0] / "split.json").read_text())
    valid = synthetic.subset(np.array(sorted(split["indices"]["valid"])))
    spreads = [p.spread for p in ens.predict(valid)]
    assert ens.calibration["conformers"] == len(spreads) > 0
    assert ens.calibration["quantile"] == DEFAULT_QUANTILE
    assert ens.threshold == pytest.approx(np.quantile(spreads, DEFAULT_QUANTILE), rel=1e-9)
    flags = [p.distrust for p in ens.predict(valid)]
    assert flags == [s > ens.threshold for s in spreads] and any(flags) and not all(flags)
    # The members' files are not this data (in-memory synthetic set): no threshold, no error.
    assert load_ensemble(runs).threshold is None


def test_cli_writes_the_ensemble_mean_spread_and_flags(experiment, water_xyz, tmp_path, capsys):
    out = tmp_path / "ens.npz"
    argv = [str(experiment), str(water_xyz), "--top-k", "3", "--distrust-above", "0"]
    assert cli_main(argv + ["--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "ensemble of 3 models" in captured.out and "DISTRUST" in captured.out
    assert "distrust threshold" in captured.err
    with np.load(out) as f:
        member_esp = f["member_esp"][:, :, : f["n_grid"][0]]
        assert f["format"] == "dcmtune-ensemble-predictions-1" and len(f["members"]) == 3
        np.testing.assert_allclose(f["esp"][:, : f["n_grid"][0]], member_esp.mean(1), rtol=1e-6)
        np.testing.assert_allclose(f["spread"][0], spread_of(member_esp[0]), rtol=1e-5)
        assert f["distrust"].tolist() == [1, 1] and float(f["distrust_threshold"]) == 0.0
    assert not (tmp_path / "ens.xyz").exists()  # no site-by-site mean: no charge-site files
    js = tmp_path / "ens.json"
    assert cli_main([str(experiment / "seed0"), str(water_xyz), "--out", str(js), "--ensemble",
                     str(experiment / "seed1")]) == 0  # fmt: skip
    doc = json.loads(js.read_text())
    assert len(doc["members"]) == 2 and doc["molecules"][0]["spread"] > 0
    assert doc["molecules"][0]["distrust"] is None and doc["calibration"] is None


@pytest.fixture(scope="module")
def other_domain(synthetic, tmp_path_factory):
    """A member that knows elements up to Z = 12 (the others up to 10)."""
    return _tiny_run(synthetic, tmp_path_factory.mktemp("other") / "z12", 0, max_atomic_number=12)


@pytest.mark.parametrize(
    "extra, match",
    [
        ("other", "must share the element domain"),
        ("--plot", "not with --ensemble"),
        ("missing", "not found|no such|does not exist|missing"),
    ],
)
def test_cli_refuses_bad_ensembles_with_one_line(
    experiment, other_domain, water_xyz, tmp_path, capsys, extra, match
):
    out = tmp_path / "o.npz"
    argv = [str(experiment / "seed0"), str(water_xyz), "--out", str(out), "--ensemble"]
    argv += {
        "other": [str(other_domain)],
        "--plot": [str(experiment / "seed1"), "--plot"],
        "missing": [str(tmp_path / "nothing")],
    }[extra]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(match, err, flags=re.IGNORECASE), err
    assert not out.exists() and list(tmp_path.iterdir()) == []
