"""The PySCF ESP generator (dcmtune.qm) and the data CLI (dcmtune.data_cli)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from ase.build import molecule
from pyscf.data import nist

from dcmtune import qm
from dcmtune.data import bundled_dataset_path, load_npz
from dcmtune.data.__main__ import main
from dcmtune.data.grids import VDW_RADII, shell_grid, shell_grid_with_shells
from dcmtune.units import BOHR

SMALL = dict(conformers=2, basis="sto-3g", max_grid=60, seed=0)


pytestmark = pytest.mark.usefixtures("one_pyscf_thread")  # conftest.py


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """H2O, two conformers, STO-3G, made by the CLI with one worker process."""
    out = tmp_path_factory.mktemp("qm") / "h2o.npz"
    rc = main(
        [
            "generate",
            "--molecules",
            "H2O",
            "--conformers",
            "2",
            "--basis",
            "sto-3g",
            "--max-grid",
            "60",
            "--workers",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    with np.load(out, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    return out, arrays


def _scf(arrays, c):
    """Recomputes conformer `c` in this process: (mol, mf, dm)."""
    n = int(arrays["N"][c])
    mol = qm.build_mol(arrays["Z"][c, :n], arrays["R"][c, :n].astype(np.float64), "sto-3g")
    mf, dm = qm.run_scf(mol)
    return mol, mf, dm


def _esp_rinv(mol, dm, grid_angstrom):
    """Reference ESP, one `int1e_rinv` integral per point (origin in Bohr)."""
    out = []
    for p in np.asarray(grid_angstrom, np.float64) / BOHR:
        mol.set_rinv_origin(p)
        electrons = np.einsum("ij,ij->", mol.intor("int1e_rinv"), dm)
        nuclei = np.sum(mol.atom_charges() / np.linalg.norm(mol.atom_coords() - p, axis=1))
        out.append(nuclei - electrons)
    return np.array(out)


def test_shapes_dtypes_and_units(generated):
    out, a = generated
    M, A, G = 2, 3, a["esp"].shape[1]
    assert G <= 60
    assert a["R"].shape == (M, A, 3) and a["R"].dtype == np.float32
    assert a["Z"].shape == (M, A) and a["Z"].dtype.kind == "i"
    assert a["Z"].tolist() == [[8, 1, 1]] * 2 and a["N"].tolist() == [3, 3]
    assert a["esp"].shape == (M, G) and a["esp"].dtype == np.float32
    assert a["vdw_surface"].shape == (M, G, 3) and a["vdw_surface"].dtype == np.float32
    assert a["mono"].shape == a["mulliken"].shape == (M, A)
    assert a["Dxyz"].shape == a["com"].shape == (M, 3)
    assert a["Q"].tolist() == [0.0, 0.0] and a["mol_id"].tolist() == ["H2O", "H2O"]
    assert np.all(a["n_grid"] <= G)
    # Angstrom: every point sits between 1.4 and 2.0 vdW radii from its nearest atoms.
    radii = np.array([VDW_RADII[z] for z in a["Z"][0]])
    for c in range(M):
        g = a["vdw_surface"][c, : a["n_grid"][c]]
        ratio = np.linalg.norm(g[:, None] - a["R"][c][None], axis=-1) / radii
        assert ratio.min() >= 1.4 - 1e-4 and ratio.min(axis=1).max() <= 2.0 + 1e-4
    # ESP of water in Hartree/e is a few hundredths.
    assert 0.005 < np.abs(a["esp"]).max() < 0.2
    load_npz([out])  # the loader accepts the file
    prov = json.loads(qm.provenance_path(out).read_text())
    assert "--basis sto-3g" in prov["command"] and "--conformers 2" in prov["command"]
    assert "ESP-fitted" in prov["keys"]["mono"] and "constrained" in prov["keys"]["mono"]
    assert prov["versions"]["pyscf"] and prov["molecules"][0]["seconds"] > 0


def test_first_conformer_is_equilibrium_and_others_differ(generated):
    _, a = generated
    np.testing.assert_allclose(a["R"][0], molecule("H2O").positions, atol=1e-6)
    rmsd = np.sqrt(np.mean(np.sum((a["R"][1] - a["R"][0]) ** 2, axis=-1)))
    assert 0.01 < rmsd < 0.1


def test_batched_esp_matches_per_point_rinv(generated):
    _, a = generated
    mol, _, dm = _scf(a, 0)
    pts = a["vdw_surface"][0, :5].astype(np.float64)
    ref = _esp_rinv(mol, dm, pts)
    np.testing.assert_allclose(qm.esp_on_grid(mol, dm, pts, block_size=2), ref, atol=1e-10)
    np.testing.assert_allclose(a["esp"][0, :5], ref, atol=1e-6)  # stored float32 values


def test_dipole_matches_pyscf(generated):
    _, a = generated
    for c in range(2):
        mol, mf, dm = _scf(a, c)
        ref = mf.dip_moment(origin=a["com"][c].astype(np.float64) / BOHR, verbose=0)
        np.testing.assert_allclose(a["Dxyz"][c], ref, atol=1e-3)
    assert qm.EBOHR_TO_DEBYE == pytest.approx(nist.AU2DEBYE, rel=1e-6)


def test_mono_are_esp_fitted_and_sum_to_q(generated):
    _, a = generated
    np.testing.assert_allclose(a["mono"].sum(axis=1), a["Q"], atol=1e-5)
    n = a["n_grid"][0]
    q = qm.fit_esp_charges(
        a["R"][0].astype(np.float64), a["vdw_surface"][0, :n], a["esp"][0, :n], 0.0
    )
    np.testing.assert_allclose(a["mono"][0], q, atol=1e-5)
    assert a["mono"][0, 0] < -0.3 and np.all(a["mono"][0, 1:] > 0.15)  # O negative, H positive


def test_fits_recover_known_charges_with_total_constraint():
    rng = np.random.default_rng(1)
    spec = qm.load_molecules(["CH3OH"])[0]
    q_true = rng.normal(scale=0.4, size=len(spec.numbers))
    q_true += (1.0 - q_true.sum()) / len(q_true)  # total charge +1
    Rs = qm.make_conformers(spec.positions, 3, 0.05, rng)
    grids = [shell_grid(R, spec.numbers, rng, max_grid=200) for R in Rs]
    esps = [qm.esp_design_matrix(R, g) @ q_true for R, g in zip(Rs, grids, strict=True)]
    q = qm.fit_esp_charges(Rs[1], grids[1], esps[1], Q=1.0)
    np.testing.assert_allclose(q, q_true, atol=1e-8)
    q_shared = qm.fit_esp_charges_shared(Rs, grids, esps, Q=1.0)
    np.testing.assert_allclose(q_shared, q_true, atol=1e-8)
    # With noise the constraint still holds exactly.
    noisy = esps[0] + rng.normal(scale=1e-3, size=esps[0].shape)
    assert qm.fit_esp_charges(Rs[0], grids[0], noisy, Q=-2.0).sum() == pytest.approx(-2.0)


def test_grid_and_conformers_are_seeded_and_valid():
    spec = qm.load_molecules(["C6H6"])[0]
    g1 = shell_grid(spec.positions, spec.numbers, np.random.default_rng(3), max_grid=300)
    g2 = shell_grid(spec.positions, spec.numbers, np.random.default_rng(3), max_grid=300)
    assert g1.shape == (300, 3) and np.array_equal(g1, g2)
    R = qm.make_conformers(spec.positions, 20, 0.3, np.random.default_rng(0))
    d = np.linalg.norm(R[:, :, None] - R[:, None], axis=-1)
    d[:, np.arange(12), np.arange(12)] = np.inf
    assert d.min() >= 0.7
    with pytest.raises(qm.QMError, match="no conformer"):
        qm.make_conformers(np.zeros((2, 3)), 2, 0.0, np.random.default_rng(0))


def test_in_process_run_reproduces_the_worker_run(generated, tmp_path):
    _, a = generated
    specs = qm.load_molecules(["H2O"])
    qm.generate_dataset(tmp_path / "w0.npz", specs, qm.GenerationSettings(**SMALL), workers=0)
    with np.load(tmp_path / "w0.npz") as b:
        assert np.array_equal(a["R"], b["R"]) and np.array_equal(a["vdw_surface"], b["vdw_surface"])
        np.testing.assert_allclose(a["esp"], b["esp"], atol=1e-7)


def test_open_shell_with_spin(tmp_path):
    """OH radical: odd electron count, UHF; the total density gives the dipole PySCF gives."""
    specs = qm.load_molecules(["OH"])
    settings = qm.GenerationSettings(conformers=1, basis="sto-3g", max_grid=30, spin=1)
    qm.generate_dataset(tmp_path / "oh.npz", specs, settings, workers=0)
    with np.load(tmp_path / "oh.npz") as a:
        mol = qm.build_mol(a["Z"][0], a["R"][0].astype(np.float64), "sto-3g", spin=1)
        mf, _ = qm.run_scf(mol)
        assert mf.__class__.__name__.startswith("UHF")
        ref = mf.dip_moment(origin=a["com"][0].astype(np.float64) / BOHR, verbose=0)
        np.testing.assert_allclose(a["Dxyz"][0], ref, atol=1e-3)
        assert abs(a["mono"][0].sum()) < 1e-5


def test_missing_pyscf_is_a_clear_error_only_when_generating(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyscf", None)  # `import pyscf` now raises ImportError
    spec = qm.load_molecules(["H2O"])[0]
    with pytest.raises(qm.QMError, match=r"pip install 'dcmtune\[qm\]'"):
        qm.build_mol(spec.numbers, spec.positions, "sto-3g")


def test_xyz_input(tmp_path):
    xyz = tmp_path / "water.xyz"
    xyz.write_text("3\nwater\nO 0 0 0.119\nH 0 0.763 -0.477\nH 0 -0.763 -0.477\n")
    (spec,) = qm.load_molecules([], [xyz])
    assert spec.name == "water" and spec.numbers.tolist() == [8, 1, 1]
    assert spec.source == str(xyz)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--molecules", "H2O", "NOPE"], "unknown molecule name 'NOPE'"),
        (["--molecules", "h2o"], "did you mean H2O"),
        (["--xyz", "{tmp}/missing.xyz"], "not found"),
        (["--xyz", "{tmp}/garbage.xyz"], "not a readable .xyz"),
        (["--molecules", "H2O", "--charge", "1"], "odd electron count 9"),
        (["--molecules", "H2O", "--spin", "1"], "cannot have spin"),
        (["--molecules", "H2O", "--basis", "no-such-basis"], "basis 'no-such-basis'"),
        (["--molecules", "H2O", "--method", "NOT-A-XC"], "method"),
        (["--molecules", "H2O", "--density-fit", "no-such-fit"], "auxiliary basis 'no-such-fit'"),
        (["--molecules", "H2O", "--conformers", "0"], "conformers"),
        (["--molecules", "H2O", "--out", "{tmp}/no/such/dir.npz"], "does not exist"),
        (["--molecules", "H2O", "--out", "{tmp}/x.npy"], "must end in .npz"),
        ([], "no molecules"),
    ],
)
def test_generate_bad_inputs_exit_2_one_line_nothing_written(tmp_path, capsys, args, match):
    (tmp_path / "garbage.xyz").write_text("three\nnot a molecule\nX 1 2\n")
    args = [s.format(tmp=tmp_path) for s in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out.npz")]
    assert main(["generate", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.xyz"]


def test_cli_process_prints_exactly_one_line(tmp_path):
    """The real entry point: no warning, progress bar or traceback beside the error line."""
    out = tmp_path / "x.npz"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dcmtune.data",
            "generate",
            "--molecules",
            "H2O",
            "--basis",
            "no-such-basis",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert not out.exists()


@pytest.mark.parametrize("command", ["inspect", "validate"])
def test_inspect_validate_bad_files_exit_2(tmp_path, capsys, command, generated):
    assert main([command, str(tmp_path / "missing.npz")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    _, a = generated
    broken = dict(a, N=a["N"] + 1)
    np.savez(tmp_path / "broken.npz", **broken)
    assert main([command, str(tmp_path / "broken.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "broken.npz: N:" in err


def test_inspect_and_validate_bundled_set(capsys):
    path = bundled_dataset_path()
    assert main(["validate", str(path)]) == 0
    assert "240 conformers of 24 molecules" in capsys.readouterr().out
    assert main(["inspect"]) == 0  # default: the bundled set
    out = capsys.readouterr().out
    assert "24 molecules, 240 conformers" in out
    assert "elements: H C N O F S Cl\n" in out
    assert "Angstrom as expected" in out


def test_each_point_stores_the_shell_it_was_drawn_on(generated):
    """The generator's `shell` key: every real point is exactly its shell factor x vdW radius
    from some atom (the closed form of a sphere), the loader keeps it, padding is 0."""
    out, a = generated
    radii = np.array([VDW_RADII[z] for z in a["Z"][0]])
    for c in range(2):
        n = int(a["n_grid"][c])
        g, s = a["vdw_surface"][c, :n].astype(np.float64), a["shell"][c, :n]
        assert (np.abs(s[:, None] - np.array([1.4, 1.6, 1.8, 2.0])).min(axis=1) < 1e-6).all()
        scaled = np.linalg.norm(g[:, None] - a["R"][c][None], axis=-1) / radii  # (n, A)
        assert np.abs(scaled - s[:, None]).min(axis=1).max() < 1e-4
        assert not a["shell"][c, n:].any()
    d = load_npz([out])
    assert d.shell is not None and np.array_equal(d.shell, a["shell"][:, : d.num_grid])


def test_shell_grid_with_shells_matches_shell_grid():
    R = molecule("CH3CH2OH").positions
    Z = molecule("CH3CH2OH").numbers
    pts, shell = shell_grid_with_shells(R, Z, np.random.default_rng(3), max_grid=150)
    assert np.array_equal(pts, shell_grid(R, Z, np.random.default_rng(3), max_grid=150))
    assert pts.shape == (150, 3) and shell.shape == (150,)
    assert np.isin(np.round(shell, 5), [1.4, 1.6, 1.8, 2.0]).all()
    assert len(np.unique(shell)) == 4  # the subsample keeps points of every shell


def test_density_fitting_matches_exact_integrals_and_is_recorded(tmp_path):
    """RI-JK changes the ESP of water (6-31G*) by far less than any model error; the setting
    is in the provenance and the rebuild command; an unknown auxiliary basis is one line."""
    h2o = molecule("H2O")
    mol = qm.build_mol(h2o.numbers, h2o.positions, "6-31G*")
    grid = shell_grid(h2o.positions, h2o.numbers, np.random.default_rng(0), max_grid=100)
    _, dm = qm.run_scf(mol)
    _, dm_df = qm.run_scf(mol, density_fit="cc-pVDZ-JKFIT")
    exact, fitted = qm.esp_on_grid(mol, dm, grid), qm.esp_on_grid(mol, dm_df, grid)
    diff = np.abs(fitted - exact).max() * 627.509  # kcal/mol/e
    assert 0 < diff < 0.05, diff  # measured 0.003 rms on a 38-atom dipeptide
    out = tmp_path / "h2o.npz"
    args = ["generate", "--molecules", "H2O", "--conformers", "1", "--basis", "sto-3g"]
    fit = ["--density-fit", "def2-universal-jkfit"]
    assert main([*args, "--max-grid", "30", "--workers", "0", *fit, "--out", str(out)]) == 0
    prov = json.loads(qm.provenance_path(out).read_text())
    assert "--density-fit def2-universal-jkfit" in prov["command"]
    assert "def2-universal-jkfit" in prov["qm"]["integrals"]
    assert prov["settings"]["density_fit"] == "def2-universal-jkfit"
