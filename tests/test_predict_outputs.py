"""Output that goes into a simulation: charge sites in local frames (closed-form values,
invariance under rigid motions, exact reconstruction, spread over conformers) and PQR files
(written and parsed back).

Frames are pure numpy; the PQR and sites files use conftest's `tiny_predict_run` model.
"""

import json

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule

from dcmtune.predict import load_model, smiles_molecules, to_global, to_local, write_pqr
from dcmtune.predict.commands import main as cli_main
from dcmtune.predict.frames import frame_atoms, frame_kinds
from dcmtune.predict.outputs import write_sites


def _rotation(seed=5):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _water():
    angle = np.deg2rad(104.5)
    R = np.array([[0, 0, 0], [0.96, 0, 0], [0.96 * np.cos(angle), 0.96 * np.sin(angle), 0]])
    return np.array([8, 1, 1]), R


@pytest.fixture(scope="module")
def predictor(tiny_predict_run):
    return load_model(tiny_predict_run)


# --------------------------------------------------------------------------- frames


def test_frames_follow_the_stated_convention_in_closed_form():
    Z, R = _water()
    frame = frame_atoms(Z, R)
    # O: its two neighbours; H: its neighbour O, then O's other neighbour.
    assert frame.tolist() == [[0, 1, 2], [1, 0, 2], [2, 0, 1]]
    offset = np.array([0.1, 0.2, 0.3])
    sites = (R + offset)[:, None, :]  # one site per atom, displaced by `offset`
    local = to_local(R, frame, sites)
    # O: e1 = x, e3 = x cross (H2 - O) = +z, e2 = y.  H1: e1 = -x, e3 = -z, e2 = +y.
    np.testing.assert_allclose(local[0, 0], [0.1, 0.2, 0.3], atol=1e-12)
    np.testing.assert_allclose(local[1, 0], [-0.1, 0.2, -0.3], atol=1e-12)
    # Heavier neighbours first: ethanol's methyl hydrogens use C-C, not C-H.
    eth = molecule("CH3CH2OH")
    f = frame_atoms(eth.numbers, eth.positions)
    for h in np.flatnonzero(eth.numbers == 1):
        assert eth.numbers[f[h, 1]] == 6 or eth.numbers[f[h, 1]] == 8
        assert eth.numbers[f[h, 2]] > 1


def test_local_coordinates_are_invariant_under_rigid_motion_and_reconstruct_exactly():
    mol = molecule("CH3CH2OCH3")
    Z, R = mol.numbers, mol.positions
    rng = np.random.default_rng(0)
    sites = R[:, None, :] + rng.normal(scale=0.3, size=(len(Z), 3, 3))
    frame = frame_atoms(Z, R)
    assert frame_kinds(frame) == ["plane"] * len(Z)
    local = to_local(R, frame, sites)
    np.testing.assert_allclose(to_global(R, frame, local), sites, rtol=0, atol=1e-12)
    rot, shift = _rotation(), np.array([3.0, -1.0, 7.5])
    moved_R, moved_sites = R @ rot.T + shift, sites @ rot.T + shift
    moved_frame = frame_atoms(Z, moved_R)
    np.testing.assert_array_equal(moved_frame, frame)
    np.testing.assert_allclose(to_local(moved_R, moved_frame, moved_sites), local, atol=1e-12)
    np.testing.assert_allclose(to_global(moved_R, frame, local), moved_sites, atol=1e-12)


def test_degenerate_frames_are_marked_and_still_reconstruct():
    co2 = molecule("CO2")
    frame = frame_atoms(co2.numbers, co2.positions)
    assert frame_kinds(frame) == ["axis"] * 3 and np.all(frame[:, 2] == -1)
    sites = co2.positions[:, None, :] + np.array([[[0.2, 0.1, -0.3]]])
    local = to_local(co2.positions, frame, sites)
    np.testing.assert_allclose(to_global(co2.positions, frame, local), sites, atol=1e-12)
    # Along the axis and the distance from it: unchanged by a rotation.
    rot = _rotation(1)
    moved = to_local(co2.positions @ rot.T, frame, sites @ rot.T)
    np.testing.assert_allclose(moved[..., 0], local[..., 0], atol=1e-12)
    np.testing.assert_allclose(
        np.linalg.norm(moved[..., 1:], axis=-1), np.linalg.norm(local[..., 1:], axis=-1), atol=1e-12
    )
    lone = frame_atoms(np.array([10]), np.zeros((1, 3)))
    assert frame_kinds(lone) == ["none"]
    site = np.array([[[0.5, -0.5, 0.25]]])
    np.testing.assert_allclose(to_local(np.zeros((1, 3)), lone, site), site)


# --------------------------------------------------------------------------- files


def _read_pqr(path):
    """[(names, xyz, charge, radius) per MODEL] parsed from whitespace-separated ATOM lines."""
    models, current = [], None
    for line in path.read_text().splitlines():
        if line.startswith("MODEL"):
            current = ([], [], [], [])
        elif line.startswith("ATOM"):
            f = line.split()
            current[0].append(f[2])
            current[1].append([float(v) for v in f[-5:-2]])
            current[2].append(float(f[-2]))
            current[3].append(float(f[-1]))
        elif line.startswith("ENDMDL"):
            models.append(tuple(np.array(v) for v in current))
    return models


def test_pqr_written_and_parsed_back(predictor, tmp_path):
    cation = smiles_molecules(["C[NH3+]"])
    preds = predictor.predict([molecule("H2O"), *cation], batch_size=2)
    path = write_pqr(preds, tmp_path / "mols.pqr")
    models = _read_pqr(path)
    assert len(models) == 2 and path.read_text().endswith("END\n")
    for p, (names, xyz, q, r) in zip(preds, models, strict=True):
        n, k = p.charges.shape
        sites = np.char.startswith(names.astype(str), "X")
        assert sites.sum() == n * k and (~sites).sum() == n
        np.testing.assert_allclose(q.sum(), p.total_charge, atol=1e-5)
        assert np.all(r[sites] == 0.0) and np.all(r[~sites] > 1.0) and np.all(q[~sites] == 0.0)
        np.testing.assert_allclose(q[sites], p.charges.reshape(-1), atol=1e-7)
        np.testing.assert_allclose(xyz[~sites], p.positions, atol=1e-5)
        np.testing.assert_allclose(xyz[sites], p.charge_positions.reshape(-1, 3), atol=1e-5)
    assert models[1][2].sum() == pytest.approx(1.0, abs=1e-5)
    assert models[0][0][:3].tolist() == ["O1", "H2", "H3"]


def test_sites_file_groups_conformers_with_their_spread(predictor, tmp_path):
    rng = np.random.default_rng(2)
    water = molecule("H2O")
    frames = [Atoms(water.numbers, water.positions + rng.normal(scale=0.03, size=(3, 3)))]
    frames += [Atoms(water.numbers, water.positions + rng.normal(scale=0.03, size=(3, 3)))]
    frames += [molecule("CH4"), frames[0].copy()]
    preds = predictor.predict(frames, batch_size=4)
    doc = json.loads(write_sites(preds, tmp_path / "s.sites.json", model="m").read_text())
    assert doc["format"] == "dcmtune-sites-1" and "LocalCoordinatesSite" in doc["convention"]
    water_doc, methane = doc["molecules"]
    assert water_doc["conformers"] == 3 and methane["conformers"] == 1
    assert water_doc["sources"] == ["molecules[0]", "molecules[1]", "molecules[3]"]
    assert water_doc["bonds"] == [[0, 1], [0, 2]]
    assert len(water_doc["sites"]) == 3 * predictor.n_dcm
    group = [preds[i] for i in (0, 1, 3)]
    frame = np.array([s["frame"] for s in water_doc["sites"][:: predictor.n_dcm]])
    local = to_local(
        np.stack([p.positions for p in group]), frame, np.stack([p.charge_positions for p in group])
    )
    for s in water_doc["sites"]:
        a, k = s["atom"], s["site"]
        np.testing.assert_allclose(s["local"], local[:, a, k].mean(axis=0), atol=1e-12)
        np.testing.assert_allclose(s["local_std"], local[:, a, k].std(axis=0), atol=1e-12)
        assert max(s["local_std"]) > 0 and s["frame_kind"] == "plane"
    total = sum(s["charge"] for s in water_doc["sites"])
    assert total == pytest.approx(0.0, abs=1e-5)
    assert all(s["local_std"] == [0.0, 0.0, 0.0] for s in methane["sites"])
    # One conformer's sites, rebuilt from its frame and its own local coordinates.
    p = preds[2]
    f = np.array([s["frame"] for s in methane["sites"][:: predictor.n_dcm]])
    rebuilt = to_global(
        p.positions, f, np.array([s["local"] for s in methane["sites"]]).reshape(5, -1, 3)
    )
    np.testing.assert_allclose(rebuilt, p.charge_positions, atol=1e-5)


def test_cli_writes_pqr_and_sites_next_to_the_results(tiny_predict_run, tmp_path, capsys):
    ase.io.write(tmp_path / "water.xyz", molecule("H2O"))
    out = tmp_path / "w.npz"
    assert cli_main([str(tiny_predict_run), str(tmp_path / "water.xyz"), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "w.pqr" in stdout and "w.sites.json" in stdout
    [(names, _, q, r)] = _read_pqr(tmp_path / "w.pqr")
    np.testing.assert_allclose(q.sum(), 0.0, atol=1e-5)
    doc = json.loads((tmp_path / "w.sites.json").read_text())
    assert doc["molecules"][0]["formula"] == "H2O"
