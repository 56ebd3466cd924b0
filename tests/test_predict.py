"""Prediction with a trained model: agreement with the analysis, equivariance, total charge,
typed one-line errors, compiled-program count, and the CLI's files.

One tiny checkpoint (`tiny_predict_run` of conftest: 1 epoch of a tiny DCMNet on the session's
synthetic set) serves the module.
Shapes are chosen so most calls reuse the program the trainer compiled for validation: the 16
synthetic conformers in batches of 4 (A = 8 atoms, G = 64 grid points).
"""

import dataclasses
import json
import shutil
import subprocess
import sys

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule

import dcmtune
from dcmtune.analysis import analyze_checkpoint
from dcmtune.data import group_by_bucket, size_bucket
from dcmtune.data.synthetic import make_synthetic
from dcmtune.predict import PredictError, Predictor, load_model
from dcmtune.predict.commands import main as cli_main

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tiny_predict_run):
    return tiny_predict_run


@pytest.fixture(scope="module")
def predictor(run_dir):
    return load_model(run_dir)


@pytest.fixture(scope="module")
def synthetic_file(synthetic, tmp_path_factory):
    """The synthetic set as a dcmtune .npz data file."""
    d = synthetic
    path = tmp_path_factory.mktemp("predict_data") / "syn.npz"
    np.savez(
        path,
        R=d.R,
        Z=d.Z,
        N=d.N,
        esp=d.esp,
        vdw_surface=d.grid,
        n_grid=d.n_grid,
        mono=d.mono,
        Dxyz=d.dipole,
        com=d.com,
        Q=d.Q,
        mol_id=d.mol_id,
    )
    return path


def _grids(data):
    return [data.grid[i, : data.n_grid[i]] for i in range(data.num_conformers)]


def _rotation(seed=3):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


# --------------------------------------------------------------------------- buckets


def test_size_buckets_are_powers_of_two_at_least_the_minimum():
    assert [size_bucket(n) for n in (1, 8, 9, 16, 17, 1200)] == [8, 8, 16, 16, 32, 2048]
    assert size_bucket(3, minimum=1) == 4 and size_bucket(1, minimum=1) == 1
    groups = group_by_bucket([3, 12, 5, 20, 8])
    assert {k: v.tolist() for k, v in groups.items()} == {8: [0, 2, 4], 16: [1], 32: [3]}


# --------------------------------------------------------------------------- the predictor


def test_load_model_keeps_config_and_evaluation_params_only(predictor, run_dir, tmp_path):
    assert isinstance(predictor, dcmtune.Predictor) and dcmtune.load_model is load_model
    fields = {f.name for f in dataclasses.fields(Predictor)}
    assert fields == {"path", "config", "params", "epoch", "domain"}
    assert predictor.path == run_dir / "checkpoints" / "best" and predictor.n_dcm == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        predictor.epoch = 5
    # A sweep's best_model/ is a checkpoint; the sweep directory itself leads to it.
    best = tmp_path / "sweep" / "best_model"
    shutil.copytree(predictor.path, best)
    assert load_model(best).path == best
    assert load_model(tmp_path / "sweep").path == best


def test_predict_matches_analyze_checkpoint(predictor, run_dir, synthetic):
    a = analyze_checkpoint(run_dir, synthetic, batch_size=4)
    preds = predictor.predict(synthetic, batch_size=4)
    assert len(preds) == synthetic.num_conformers
    for i, p in enumerate(preds):
        n, g = synthetic.N[i], synthetic.n_grid[i]
        np.testing.assert_allclose(p.charges, a.charges[i, :n], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(p.charge_positions, a.positions[i, :n], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(p.monopoles, a.mono_pred[i, :n], rtol=1e-5, atol=1e-6)
        # Both about the data's com (the origin of its reference dipole).
        np.testing.assert_allclose(p.dipole, a.dipole_pred[i], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(p.esp, a.esp_pred[i, :g], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(p.esp_rmse, a.per_conformer["esp_rmse"][i], rtol=1e-5)


def test_rotation_and_translation_move_charges_and_dipole_only(predictor, synthetic):
    rot, shift = _rotation(), np.array([1.5, -2.0, 0.7])
    Z, R, grids = synthetic.Z, synthetic.R.astype(np.float64), _grids(synthetic)
    base = predictor.predict((Z, R), esp_points=grids, batch_size=4)
    moved = predictor.predict(
        (Z, np.where(Z[..., None] > 0, R @ rot.T + shift, 0.0)),
        esp_points=[g @ rot.T + shift for g in grids],
        batch_size=4,
    )
    for p, q in zip(base, moved, strict=True):
        np.testing.assert_allclose(q.monopoles, p.monopoles, atol=2e-5)
        np.testing.assert_allclose(q.charges, p.charges, atol=2e-5)
        np.testing.assert_allclose(
            q.charge_positions, p.charge_positions @ rot.T + shift, atol=2e-5
        )
        np.testing.assert_allclose(q.dipole_origin, p.dipole_origin @ rot.T + shift, atol=1e-5)
        np.testing.assert_allclose(q.dipole, p.dipole @ rot.T, atol=1e-4)
        np.testing.assert_allclose(q.esp, p.esp, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("total", [-1.0, 0.0, 1.0])
def test_charges_sum_to_the_requested_total(predictor, synthetic, total):
    for p in predictor.predict(synthetic, charge=total, batch_size=4):
        assert p.total_charge == total
        np.testing.assert_allclose(p.charges.sum(dtype=np.float64), total, atol=1e-5)
        np.testing.assert_allclose(p.monopoles.sum(dtype=np.float64), total, atol=1e-5)


def test_mixed_sizes_and_a_long_trajectory_need_few_programs(predictor, tmp_path):
    from dcmtune.train.step import predict_batch

    rng = np.random.default_rng(0)
    water = molecule("H2O")
    frames = [
        Atoms(water.numbers, water.positions + rng.normal(scale=0.02, size=(3, 3)))
        for _ in range(1000)
    ]
    ase.io.write(tmp_path / "traj.xyz", frames)
    big = make_synthetic(
        num_molecules=1, conformers=1, min_atoms=20, max_atoms=20, num_grid=8, seed=1
    )
    mixed = [water, molecule("C6H6"), Atoms(big.Z[0], big.R[0])]
    before = predict_batch._cache_size()
    preds = predictor.predict(mixed + [tmp_path / "traj.xyz"], batch_size=256)
    assert predict_batch._cache_size() - before <= 4
    assert [len(p.numbers) for p in preds[:3]] == [3, 12, 20] and len(preds) == 1003
    assert preds[3].source == "traj.xyz:0" and preds[-1].source == "traj.xyz:999"
    np.testing.assert_allclose(preds[-1].positions, frames[-1].positions, atol=1e-6)


def test_esp_grids_of_other_sizes_share_one_program(predictor):
    """Molecules of one size bucket with 5, 6 and 7 ESP points (one grid bucket) run through
    one compiled program: the validated chunk is padded back to the bucket's shapes."""
    from dcmtune.train.step import predict_batch

    rng = np.random.default_rng(3)
    water = molecule("H2O")
    points = rng.normal(scale=3.0, size=(7, 3))
    grids = [points[:n] for n in (5, 6, 7)]
    predictor.predict(water, esp_points=grids[0], batch_size=1)  # compiles (or reuses) one
    before = predict_batch._cache_size()
    preds = [predictor.predict(water, esp_points=g, batch_size=1)[0] for g in grids]
    assert predict_batch._cache_size() == before
    assert [p.esp.shape for p in preds] == [(5,), (6,), (7,)]
    np.testing.assert_allclose(preds[2].esp[:5], preds[0].esp, rtol=1e-5)  # padding is inert


# --------------------------------------------------------------------------- errors


def _hcl():
    return Atoms("HCl", positions=[[0, 0, 0], [0, 0, 1.27]])


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, run_dir):
    """{case: (model, input)} for the four refused cases."""
    d = tmp_path_factory.mktemp("bad")
    ase.io.write(d / "hcl.xyz", _hcl())
    (d / "garbage.xyz").write_text("this is not\na molecule file\n")
    (d / "empty.xyz").write_text("")
    ase.io.write(d / "water.xyz", molecule("H2O"))
    future = d / "future_model"
    shutil.copytree(run_dir / "checkpoints" / "best", future)
    meta = json.loads((future / "meta.json").read_text())
    (future / "meta.json").write_text(json.dumps(dict(meta, format="dcmtune-checkpoint-99")))
    return {
        "element": (run_dir, d / "hcl.xyz", "max_atomic_number"),
        "unreadable": (run_dir, d / "garbage.xyz", "ASE cannot read"),
        "empty": (run_dir, d / "empty.xyz", "empty"),
        "missing_model": (d / "no_such_model", d / "water.xyz", "not found"),
        "format": (future, d / "water.xyz", "dcmtune-checkpoint-99"),
    }


@pytest.mark.parametrize("case", ["element", "unreadable", "empty", "missing_model", "format"])
def test_bad_input_is_a_typed_error_in_the_api(bad_inputs, case):
    model, path, match = bad_inputs[case]
    with pytest.raises(PredictError, match=match) as e:
        load_model(model).predict(path)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["element", "unreadable", "empty", "missing_model", "format"])
def test_bad_input_is_one_line_and_exit_2_on_the_cli(bad_inputs, case, capsys, tmp_path):
    model, path, match = bad_inputs[case]
    code = cli_main([str(model), str(path), "--out", str(tmp_path / "out.npz")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out.npz").exists()


def test_api_refuses_bad_arguments(predictor):
    with pytest.raises(PredictError, match="Cl|max_atomic_number"):
        predictor.predict([molecule("H2O"), _hcl()])
    with pytest.raises(PredictError, match="real atoms must come first"):
        predictor.predict((np.array([[8, 0, 1]]), np.zeros((1, 3, 3))))
    with pytest.raises(PredictError, match="one per molecule"):
        predictor.predict([molecule("H2O")] * 2, charge=[0, 1, 2])
    with pytest.raises(PredictError, match="esp_points"):
        predictor.predict(molecule("H2O"), esp_points="everywhere")
    with pytest.raises(PredictError, match="dummy"):
        predictor.predict(Atoms("OX", positions=[[0, 0, 0], [1, 0, 0]]))


def test_cli_never_overwrites_its_input(run_dir, tmp_path, capsys):
    ase.io.write(tmp_path / "water.xyz", molecule("H2O"))
    before = (tmp_path / "water.xyz").read_bytes()
    assert (
        cli_main([str(run_dir), str(tmp_path / "water.xyz"), "--out", str(tmp_path / "water.npz")])
        == 2
    )
    assert "overwrite the input" in capsys.readouterr().err
    assert (tmp_path / "water.xyz").read_bytes() == before
    assert not (tmp_path / "water.npz").exists()


def test_module_entry_point_exits_2_with_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dcmtune.predict",
            str(tmp_path / "nothing"),
            str(tmp_path / "x.xyz"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr


# --------------------------------------------------------------------------- CLI files


def test_cli_writes_npz_extxyz_and_plot(predictor, run_dir, tmp_path, capsys):
    water = molecule("H2O")
    ase.io.write(tmp_path / "water.xyz", water)
    out = tmp_path / "water_dcm.npz"
    code = cli_main(
        [
            str(run_dir),
            str(tmp_path / "water.xyz"),
            "--esp-grid",
            "shell",
            "--out",
            str(out),
            "--plot",
        ]
    )
    stdout = capsys.readouterr().out
    assert code == 0 and "H2O" in stdout and "|mu| (D)" in stdout
    with np.load(out, allow_pickle=False) as f:
        assert str(f["format"]) == "dcmtune-predictions-1"
        units = json.loads(str(f["units"]))
        assert units["esp"] == "Hartree/e" and units["Dxyz"] == "Debye"
        charges, n_grid = f["charges"], f["n_grid"]
        assert charges.shape == (1, 3, 2) and n_grid[0] > 100
        assert f["esp"].shape[1] == n_grid[0]
    [frame] = ase.io.read(out.with_suffix(".xyz"), ":")
    sites = frame.numbers == 0
    assert sites.sum() == 3 * 2 and (~sites).sum() == 3
    q = frame.get_charges()
    np.testing.assert_allclose(q[sites], charges[0].reshape(-1), atol=1e-6)
    np.testing.assert_allclose(q.sum(), 0.0, atol=1e-5)
    np.testing.assert_allclose(frame.positions[:3], water.positions, atol=1e-6)
    png = out.with_suffix(".png").read_bytes()
    assert png.startswith(PNG) and len(png) > 10_000


def test_cli_json_with_charge(run_dir, tmp_path, capsys):
    ase.io.write(tmp_path / "c6h6.xyz", molecule("C6H6"))
    out = tmp_path / "benzene.json"
    assert (
        cli_main([str(run_dir), str(tmp_path / "c6h6.xyz"), "--charge", "1", "--out", str(out)])
        == 0
    )
    capsys.readouterr()
    doc = json.loads(out.read_text())
    assert doc["format"] == "dcmtune-predictions-1" and doc["units"]["charges"] == "e"
    [mol] = doc["molecules"]
    assert mol["formula"] == "C6H6" and mol["total_charge"] == 1.0
    np.testing.assert_allclose(np.sum(mol["charges"]), 1.0, atol=1e-5)
    assert len(ase.io.read(out.with_suffix(".xyz"))) == 12 + 12 * 2


def test_cli_on_a_data_file_reports_esp_rmse(run_dir, synthetic_file, synthetic, tmp_path, capsys):
    out = tmp_path / "syn.npz"
    assert (
        cli_main([str(run_dir), str(synthetic_file), "--out", str(out), "--batch-size", "4"]) == 0
    )
    stdout = capsys.readouterr().out
    assert "ESP RMSE" in stdout and "syn000" in stdout
    a = analyze_checkpoint(run_dir, synthetic, batch_size=4)
    with np.load(out) as f:
        np.testing.assert_allclose(f["esp_rmse"], a.per_conformer["esp_rmse"], rtol=1e-5)
