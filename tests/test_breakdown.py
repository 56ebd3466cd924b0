"""Where the ESP error is: shells recovered exactly from the geometry, the nearest atom's element,
size bins, functional classes by SMARTS, per-group RMSE against hand computations, groups that
add up to the pooled RMSE, the bundled grids on the generator's shells, and the CLI's tables."""

import dataclasses
import types

import numpy as np
import pandas as pd
import pytest

from dcmtune.analysis import breakdown as bd
from dcmtune.analysis import commands as analysis
from dcmtune.analysis.report import _breakdown_section
from dcmtune.data import load_dataset
from dcmtune.data.dataset import ESPData
from dcmtune.data.grids import SHELLS, VDW_RADII
from dcmtune.data.synthetic import make_synthetic

KCAL = 627.509474  # kcal/mol per Hartree (independent of dcmtune.units)


def _points_on_shells(R, Z, per_sphere, rng):
    """Points on every atom's f x vdW sphere for f in SHELLS, those inside any atom's 1.4 x vdW
    sphere dropped (the generator's rule), with the factor each was placed on. Random
    directions, not the generator's lattice."""
    radii = np.array([VDW_RADII[z] for z in Z])
    pts, fac = [], []
    for f in SHELLS:
        for a in range(len(Z)):
            u = rng.normal(size=(per_sphere, 3))
            pts.append(R[a] + f * radii[a] * u / np.linalg.norm(u, axis=1, keepdims=True))
            fac += [f] * per_sphere
    pts, fac = np.concatenate(pts), np.array(fac)
    d = np.linalg.norm(pts[:, None] - R[None], axis=-1)
    keep = np.all(d >= 1.4 * radii[None] * (1 - 1e-9), axis=1)
    return pts[keep], fac[keep]


def _data(R, Z, grid, esp=None, mol_id=("m",), n_grid=None):
    """An ESPData of conformers (M, A, 3), (M, A), (M, G, 3) without validation."""
    R, Z, grid = (np.asarray(a) for a in (R, Z, grid))
    M, G = grid.shape[:2]
    return ESPData(
        R=R.astype(np.float32),
        Z=Z.astype(np.int32),
        N=(Z > 0).sum(axis=1).astype(np.int32),
        esp=np.zeros((M, G), np.float32) if esp is None else np.asarray(esp, np.float32),
        grid=grid.astype(np.float32),
        n_grid=np.full(M, G, np.int32) if n_grid is None else np.asarray(n_grid, np.int32),
        mono=None,
        dipole=None,
        com=np.zeros((M, 3), np.float32),
        Q=np.zeros(M, np.float32),
        mol_id=np.asarray(mol_id),
    )


def test_shells_are_recovered_exactly_where_the_nearest_surface_is_wrong():
    # Formaldehyde-like: C, O, 2 H (Angstrom).
    R = np.array([[0.0, 0, 0], [1.21, 0, 0], [-0.55, 0.94, 0], [-0.55, -0.94, 0]])
    Z = np.array([6, 8, 1, 1])
    pts, fac = _points_on_shells(R, Z, 60, np.random.default_rng(0))
    stray = R[0] + np.array([0.0, 0.0, 1.5 * VDW_RADII[6]])  # between shells 1.4 and 1.6
    grid = np.concatenate([pts, [stray], [[0.0, 0, 0]]])  # then one padding point
    idx, dev = bd.recover_shells(R[None], Z[None], grid[None], np.array([len(pts) + 1]))
    np.testing.assert_array_equal(np.asarray(SHELLS)[idx[0, : len(pts)]], fac)
    assert dev[0, : len(pts)].max() < 1e-9
    ratio = np.linalg.norm(stray - R, axis=1) / [VDW_RADII[z] for z in Z]
    off = np.abs(ratio[:, None] - np.asarray(SHELLS)).min()
    assert off > bd.SHELL_TOLERANCE
    assert idx[0, len(pts)] == -1 and dev[0, len(pts)] == pytest.approx(off)  # "other"
    assert idx[0, -1] == -1 and np.isnan(dev[0, -1])  # padding
    # The nearest scaled surface is not the shell: outer-shell points can lie inside another
    # atom's outer sphere (the generator only removes points within 1.4 x vdW).
    nearest = (np.linalg.norm(pts[:, None] - R[None], axis=-1) / [VDW_RADII[z] for z in Z]).min(1)
    assert np.mean(np.abs(nearest - fac) > 1e-3) > 0.1


def test_given_shells_are_preferred_and_off_factor_values_keep_their_own_label():
    R, Z = np.zeros((1, 1, 3)), np.array([[6]])
    grid = np.array([[[2.38, 0, 0], [0, 3.4, 0], [0, 0, 5.0]]])  # 1.4, 2.0, 2.94 x 1.7
    given = np.array([[2.0, 2.0, 2.5]])  # what a file says, whatever the geometry
    b = bd.esp_breakdown(_data(R, Z, grid), np.ones((1, 3)) / KCAL, shell=given)
    assert b.shell_source == "file"
    assert b.tables["shell"]["group"].tolist() == ["2.0", "2.5"]
    assert b.tables["shell"]["n_points"].tolist() == [2, 1]
    recovered = bd.esp_breakdown(_data(R, Z, grid), np.ones((1, 3)) / KCAL)
    assert recovered.tables["shell"]["group"].tolist() == ["1.4", "2.0", bd.OTHER]
    with pytest.raises(ValueError, match=r"shell: expected shape \(M, G\) = \(1, 3\)"):
        bd.esp_breakdown(_data(R, Z, grid), np.zeros((1, 3)), shell=given[:, :2])


def test_element_of_the_nearest_atom_ignores_padding():
    # C at x = 0, O at x = 3, a padding atom (Z = 0) at x = 2.9; the last point is padding.
    R = np.array([[[0.0, 0, 0], [3.0, 0, 0], [2.9, 0, 0]]])
    Z = np.array([[6, 8, 0]])
    grid = np.array([[[1.0, 0, 0], [1.6, 0, 0], [2.95, 2.0, 0], [-1.0, 0, 0], [0, 0, 0]]])
    z = bd.nearest_atom_numbers(R, Z, grid, np.array([4]))
    assert z.tolist() == [[6, 8, 8, 6, 0]]


def test_size_bins():
    got = {n: bd.size_label(n) for n in (1, 3, 4, 6, 7, 9, 10, 14, 15, 18, 19, 40)}
    assert got == {
        **{1: "1-3", 3: "1-3", 4: "4-6", 6: "4-6", 7: "7-9", 9: "7-9"},
        **{10: "10-14", 14: "10-14", 15: "15-18", 18: "15-18", 19: "19+", 40: "19+"},
    }


def test_grouped_errors_equal_the_hand_computation():
    err = np.array([1.0, -2.0, 3.0, 4.0, -1.0])
    t = bd.grouped_errors(
        err,
        np.array(["b", "b", "a", "a", "a"]),
        np.array([0, 1, 1, 2, 2]),
        np.array(["x", "y", "y", "y", "y"]),
        order=["b", "zz", "a"],
    )
    assert t["group"].tolist() == ["b", "a"]
    np.testing.assert_allclose(t["esp_rmse"], [np.sqrt((1 + 4) / 2), np.sqrt((9 + 16 + 1) / 3)])
    np.testing.assert_allclose(t["esp_mae"], [1.5, 8 / 3])
    assert t["n_points"].tolist() == [2, 3]
    assert t["n_conformers"].tolist() == [2, 2] and t["n_molecules"].tolist() == [2, 1]


@pytest.fixture(scope="module")
def synthetic_breakdown():
    """A breakdown of noisy predictions on a synthetic set (grids from the shell generator;
    n_grid differs between conformers)."""
    d = make_synthetic(num_molecules=6, conformers=3, max_atoms=7, num_grid=64, seed=3)
    rng = np.random.default_rng(1)
    pred = d.esp + rng.normal(scale=2e-3, size=d.esp.shape) * (d.esp != 0)
    return d, pred, bd.esp_breakdown(d, pred)


def test_partitions_add_up_to_the_pooled_rmse(synthetic_breakdown):
    d, pred, b = synthetic_breakdown
    valid = np.arange(d.num_grid)[None] < d.n_grid[:, None]
    err = (pred[valid].astype(np.float64) - d.esp[valid]) * KCAL
    assert b.n_points == err.size == int(d.n_grid.sum())
    assert b.esp_rmse == pytest.approx(np.sqrt(np.mean(err**2)), rel=1e-12)
    assert b.shell_max_deviation < 1e-5  # the synthetic grids come from the shell generator
    for kind in ("shell", "element", "size"):
        t = b.tables[kind]
        assert t["n_points"].sum() == b.n_points, kind
        pooled = np.sqrt((t["n_points"] * t["esp_rmse"] ** 2).sum() / t["n_points"].sum())
        assert pooled == pytest.approx(b.esp_rmse, rel=1e-12), kind
    assert b.tables["shell"]["group"].tolist() == ["1.4", "1.6", "1.8", "2.0"]
    assert set(b.tables["element"]["group"]) <= {"H", "C", "N", "O"}
    # No SMILES: every molecule's class is unknown.
    assert b.tables["class"]["group"].tolist() == [bd.UNKNOWN]
    long = b.to_frame()
    assert list(long.columns[:2]) == ["kind", "group"] and set(long["kind"]) == set(bd.KINDS)


def test_functional_classes_by_smarts_and_unknown_without_smiles():
    smiles = {"ethanol": "CCO", "methane": "C", "ester": "CC(=O)OC", "glycine": "NCC(=O)O"}
    got = bd.molecule_classes(["ethanol", "methane", "ester", "glycine", "mystery"], smiles)
    assert got == {
        "ethanol": ("alcohols",),
        "methane": (bd.NO_CLASS,),
        "ester": ("esters",),
        "glycine": ("acids", "amines"),
        "mystery": (bd.UNKNOWN,),
    }


def test_class_groups_count_a_molecule_in_each_of_its_classes():
    R = np.zeros((2, 1, 3))
    Z = np.array([[6], [6]])
    grid = np.array([[[2.38, 0, 0], [0, 2.72, 0]], [[3.06, 0, 0], [0, 0, 3.4]]])
    esp = np.zeros((2, 2))
    pred = np.array([[1.0, 1.0], [3.0, 0.0]]) / KCAL
    b = bd.esp_breakdown(
        _data(R, Z, grid, esp, mol_id=("gly", "x")), pred, {"gly": "NCC(=O)O", "x": "C"}
    )
    t = b.tables["class"].set_index("group")
    assert t.index.tolist() == ["acids", "amines", bd.NO_CLASS]
    np.testing.assert_allclose(t["esp_rmse"], [1.0, 1.0, np.sqrt(4.5)])
    assert b.tables["shell"]["group"].tolist() == ["1.4", "1.6", "1.8", "2.0"]


def test_bundled_organic_grids_sit_on_the_generators_shells():
    d = load_dataset(["organic"])
    sub = d.subset(np.arange(0, d.num_conformers, 10))  # every molecule's first conformer
    idx, dev = bd.recover_shells(sub.R, sub.Z, sub.grid, sub.n_grid)
    valid = np.arange(sub.num_grid)[None] < sub.n_grid[:, None]
    assert np.all(idx[valid] >= 0)
    assert np.nanmax(dev[valid]) < 1e-6  # float32 coordinates
    assert set(np.unique(idx[valid])) == {0, 1, 2, 3}
    smiles = bd.smiles_from_provenance(["organic"])
    assert smiles["water"] == "O" and set(np.unique(d.mol_id)) <= set(smiles)
    assert bd.smiles_from_provenance([]) == {}  # the demo set was built from ASE names


def test_report_section_shows_each_table(synthetic_breakdown):
    _, _, b = synthetic_breakdown
    r = types.SimpleNamespace(
        info={"breakdown": b.to_dict()}, settings=types.SimpleNamespace(split="test")
    )
    text = "\n".join(_breakdown_section(r))
    assert "## Where the error is" in text
    for title in bd.KIND_TITLES.values():
        assert f"| {title} | ESP RMSE |" in text
    assert f"| 1.4 | {b.tables['shell']['esp_rmse'][0]:.4g} |" in text
    assert _breakdown_section(types.SimpleNamespace(info={}, settings=r.settings)) == []


@pytest.fixture(scope="module")
def run_and_file(tiny_predict_run, synthetic, tmp_path_factory):
    """The session's tiny trained run (shared with the prediction tests) and its in-memory
    training data written to a file (same checksum), for the CLI."""
    path = tmp_path_factory.mktemp("breakdown") / "synthetic.npz"
    d = synthetic
    np.savez(path, R=d.R, Z=d.Z, N=d.N, esp=d.esp, vdw_surface=d.grid, n_grid=d.n_grid,
             mono=d.mono, Dxyz=d.dipole, com=d.com, Q=d.Q, mol_id=d.mol_id)  # fmt: skip
    return tiny_predict_run, path


def test_cli_prints_the_tables_and_writes_breakdown_csv(run_and_file, tmp_path, capsys):
    run, data = run_and_file
    argv = [str(run), "--split", "all", "--data", str(data), "--output-dir", str(tmp_path)]
    assert analysis.main(argv) == 0
    out = capsys.readouterr().out
    csv = pd.read_csv(tmp_path / "breakdown.csv")
    assert set(csv["kind"]) == set(bd.KINDS)
    shells = csv[csv["kind"] == "shell"]
    assert shells["group"].astype(str).tolist() == ["1.4", "1.6", "1.8", "2.0"]
    pooled = np.sqrt(
        (shells["n_points"] * shells["esp_rmse"] ** 2).sum() / shells["n_points"].sum()
    )
    assert f"all {shells['n_points'].sum()} points: {pooled:.4g}" in out
    for title in bd.KIND_TITLES.values():
        assert title in out
    for row in csv.itertuples():
        assert f"{str(row.group):<18}{row.esp_rmse:>10.4g}" in out


def test_the_datas_own_shells_are_used_and_zeros_are_recovered():
    """ESPData.shell (from the file) wins; points it leaves at 0 (unknown, e.g. a file without
    the key in a concatenation) are recovered from the geometry ("mixed")."""
    R, Z = np.zeros((1, 1, 3)), np.array([[6]])
    grid = np.array([[[2.38, 0, 0], [0, 3.4, 0], [0, 0, 5.0]]])  # 1.4, 2.0, 2.94 x 1.7
    data = dataclasses.replace(_data(R, Z, grid), shell=np.array([[1.8, 0.0, 1.6]], np.float32))
    b = bd.esp_breakdown(data, np.ones((1, 3)) / KCAL)
    assert b.shell_source == "mixed"
    assert b.tables["shell"]["group"].tolist() == ["1.6", "1.8", "2.0"]  # 2.0 recovered
    full = dataclasses.replace(data, shell=np.array([[1.8, 1.8, 1.6]], np.float32))
    assert bd.esp_breakdown(full, np.ones((1, 3)) / KCAL).shell_source == "file"
