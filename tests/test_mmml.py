"""Real users' files (mmml layout): compact on load, molecules from structure, dipole units.

The mmml layout of the bundled demo set: 60 atoms x 3,200 grid points, N as (M, 1), esp_grid,
no mol_id, Dxyz in e*Bohr. It must load to exactly the compact data, train to the same
metrics, and group its 240 conformers into the demo's 24 molecules.
"""

import json
import logging

import numpy as np
import pytest
from ase.build import molecule

from dcmtune.config import DataConfig, ExperimentConfig, ModelConfig, TrainingConfig
from dcmtune.data import (
    DataError,
    bundled_dataset_path,
    check_dipole_units,
    load_npz,
    pad_to,
    split_dataset,
    split_record,
    to_arrays,
)
from dcmtune.data.__main__ import main as data_main
from dcmtune.data.molgraph import graph_keys
from dcmtune.train.commands import main as train_main
from dcmtune.train.loop import TIMING_KEYS, fit

TINY = ModelConfig(n_dcm=1, features=8, max_degree=1, num_iterations=1, num_basis_functions=8)
ARRAYS = ("R", "Z", "N", "esp", "grid", "n_grid", "mono", "com", "Q")


@pytest.fixture(scope="module")
def demo():
    """The bundled demo set as loaded (compact: 12 atoms x 1,200 grid points, file mol_id)."""
    return load_npz(bundled_dataset_path())


def mmml_arrays(data, units="e_bohr", atoms=60, grid=3200):
    """`data` in the mmml layout: padded, N (M, 1), esp_grid, no mol_id, Dxyz in `units`."""
    a = to_arrays(pad_to(data, atoms, grid), dipole_units=units)
    a["N"] = a["N"][:, None]
    a["esp_grid"] = a.pop("vdw_surface")
    del a["mol_id"]
    return a


def save(path, arrays):
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def mmml_file(demo, tmp_path_factory):
    return save(tmp_path_factory.mktemp("mmml") / "qm9_like.npz", mmml_arrays(demo))


def assert_same_data(d, ref):
    """Every array equal to the compact reference (dipoles to float32 rounding)."""
    assert (d.num_atoms, d.num_grid) == (ref.num_atoms, ref.num_grid)
    for k in ARRAYS:
        np.testing.assert_array_equal(getattr(d, k), getattr(ref, k), err_msg=k)
    np.testing.assert_allclose(d.dipole, ref.dipole, rtol=1e-6, atol=1e-6)


def same_partition(a, b) -> bool:
    """Whether two labelings group the conformers identically (whatever the names)."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# --------------------------------------------------------------------------- compact + grouping


def test_mmml_layout_loads_compact_and_grouped(demo, mmml_file):
    d = load_npz(mmml_file, dipole_units="e_bohr")
    assert (d.num_atoms, d.num_grid) == (12, 1200)  # from 60 x 3,200
    assert_same_data(d, demo)
    assert d.mol_id_source == "graph" and demo.mol_id_source == "file"
    assert len(set(d.mol_id)) == 24 and same_partition(d.mol_id, demo.mol_id)


def test_training_on_mmml_layout_equals_compact(demo, mmml_file, tmp_path):
    # Same grouping source for both (the compact file without its names), so the split is the
    # same: split_indices deals groups in the order of their sorted labels.
    compact = to_arrays(demo)
    del compact["mol_id"]
    compact_file = save(tmp_path / "compact.npz", compact)

    def run(name, path, units):
        cfg = ExperimentConfig(
            name=name,
            output_dir=str(tmp_path),
            random_seed=0,
            model=TINY,
            data=DataConfig(data_files=[str(path)], dipole_units=units),
            training=TrainingConfig(
                num_epochs=2, batch_size=16, warmup_epochs=1, save_every_n_epochs=0
            ),
        )
        return fit(cfg)

    a, b = run("compact", compact_file, "debye"), run("mmml", mmml_file, "e_bohr")
    for ra, rb in zip(a.history, b.history, strict=True):
        for k in ra:
            if k not in TIMING_KEYS:
                np.testing.assert_allclose(rb[k], ra[k], rtol=1e-5, err_msg=k)
    rec = json.loads((b.run_dir / "split.json").read_text())
    assert rec["mol_id_source"] == "graph" and rec["num_molecules"] == 24
    ref = json.loads((a.run_dir / "split.json").read_text())
    for k in ("indices", "mol_ids", "mol_id_source", "num_molecules"):
        assert rec[k] == ref[k], k  # (checksums differ: Dxyz went through e*Bohr in float32)
    # The demo file's own names are recorded as such.
    splits = split_dataset(demo, DataConfig())
    assert split_record(demo, splits)["mol_id_source"] == "file"


def _conformers(name, n, seed):
    """n jittered conformers of an ASE molecule, each with its atoms in a random order."""
    rng = np.random.default_rng(seed)
    m = molecule(name)
    R, Z = [], []
    for _ in range(n):
        p = rng.permutation(len(m))
        R.append(m.positions[p] + rng.normal(scale=0.025, size=(len(m), 3)))
        Z.append(m.numbers[p])
    return np.array(R), np.array(Z)


def test_isomers_stay_apart_and_atom_order_does_not_matter():
    r1, z1 = _conformers("CH3CH2OH", 5, 0)
    r2, z2 = _conformers("CH3OCH3", 5, 1)
    keys = graph_keys(np.concatenate([r1, r2]), np.concatenate([z1, z2]))
    assert len(set(keys[:5])) == 1 and len(set(keys[5:])) == 1
    assert keys[0] != keys[5] and keys[0].startswith("C2H6O-") and keys[5].startswith("C2H6O-")


# --------------------------------------------------------------------------- dipole units


def test_dipole_unit_decision_rule():
    with pytest.raises(DataError, match=r"look like e_bohr, not debye.*--dipole-units e_bohr"):
        check_dipole_units(0.39343, 50, "debye", "f.npz")
    with pytest.raises(DataError, match=r"look like e_angstrom.*data.dipole_units"):
        check_dipole_units(0.208194 * 1.2, 50, "debye", "f.npz")
    with pytest.raises(DataError, match="look like debye, not e_bohr"):
        check_dipole_units(2.541746 * 0.9, 50, "e_bohr", "f.npz")
    # ESP-fitted or even Mulliken charges miss the QM dipole by far less than a unit ratio.
    for r in (0.85, 1.0, 1.2):
        assert check_dipole_units(r, 50, "debye").startswith("debye confirmed")
    assert check_dipole_units(0.6, 50, "debye").startswith("not confirmed")  # no unit fits
    assert check_dipole_units(float("nan"), 2, "debye").startswith("not checked")


@pytest.mark.parametrize(
    "stored,declared,likely",
    [
        ("e_bohr", "debye", "e_bohr"),
        ("e_angstrom", "debye", "e_angstrom"),
        ("debye", "e_bohr", "debye"),
    ],
)
def test_wrong_dipole_units_exit_2_through_both_commands(
    demo, tmp_path, capsys, stored, declared, likely
):
    path = save(tmp_path / "d.npz", mmml_arrays(demo, units=stored))
    assert data_main(["validate", str(path), "--dipole-units", declared]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err and f"look like {likely}" in err
    assert f"--dipole-units {likely}" in err and "data.dipole_units" in err
    out = tmp_path / "runs"
    assert (
        train_main(
            [
                "--data-files",
                str(path),
                "--dipole-units",
                declared,
                "--output-dir",
                str(out),
                "--num-epochs",
                "2",
                "--warmup-epochs",
                "0",
                "--quiet",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"--dipole-units {likely}" in err
    assert not out.exists()  # nothing written
    assert data_main(["validate", str(path), "--dipole-units", stored]) == 0


# --------------------------------------------------------------------------- grid points


def test_espmask_keeps_its_points_first(demo, tmp_path, caplog):
    # Real points scattered among junk rows (finite, NaN, anything) that espMask drops.
    a = mmml_arrays(demo, units="debye")
    rng = np.random.default_rng(0)
    M, G = a["esp"].shape
    esp = rng.normal(size=(M, G))
    grid = rng.normal(size=(M, G, 3))
    esp[:, ::97] = np.nan
    mask = np.zeros((M, G), bool)
    for i, n in enumerate(demo.n_grid):
        pos = np.sort(rng.choice(G, size=n, replace=False))
        mask[i, pos] = True
        esp[i, pos], grid[i, pos] = demo.esp[i, :n], demo.grid[i, :n]
    a.update(esp=esp, esp_grid=grid, espMask=mask)
    del a["n_grid"]
    with caplog.at_level(logging.WARNING, logger="dcmtune.data"):
        d = load_npz(save(tmp_path / "masked.npz", a))
    assert_same_data(d, demo)
    # The mask explains every dropped row: nothing inferred (the only warning is the grouping).
    assert [r.getMessage() for r in caplog.records if "no mol_id" not in r.getMessage()] == []
    # With n_grid too, a point must pass both.
    a["n_grid"] = np.full(M, G // 2)
    d = load_npz(save(tmp_path / "both.npz", a))
    np.testing.assert_array_equal(d.n_grid, mask[:, : G // 2].sum(axis=1))


def test_missing_n_grid_inferred_from_trailing_zero_rows(demo, tmp_path, caplog):
    a = mmml_arrays(demo, units="debye")
    del a["n_grid"]
    with caplog.at_level(logging.WARNING, logger="dcmtune.data"):
        d = load_npz(save(tmp_path / "no_n_grid.npz", a))
    assert_same_data(d, demo)
    warnings = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and "no mol_id" not in r.getMessage()
    ]
    assert len(warnings) == 1 and "n_grid missing" in warnings[0].message
    a["esp"][3], a["esp_grid"][3] = 0.0, 0.0
    with pytest.raises(DataError, match="conformer 3: every grid row is zero"):
        load_npz(save(tmp_path / "empty.npz", a))


def test_mixed_layouts_concatenate_to_the_largest_real_shape(demo, tmp_path, capsys):
    first, second = demo.subset(np.arange(120)), demo.subset(np.arange(120, 240))
    a = mmml_arrays(first, units="debye")  # N (M, 1), 60 x 3,200, no n_grid, no mol_id
    del a["n_grid"]
    b = to_arrays(pad_to(second, 20, 1500))  # N (M,), another padding
    del b["mol_id"]
    pa, pb = save(tmp_path / "a.npz", a), save(tmp_path / "b.npz", b)
    d = load_npz([pa, pb])
    assert_same_data(d, demo)
    assert d.mol_id_source == "graph" and same_partition(d.mol_id, demo.mol_id)
    assert data_main(["validate", str(pa), str(pb)]) == 0
    assert "24 molecules" in capsys.readouterr().out
    b["mol_id"] = second.mol_id  # one file named, one not
    d = load_npz([pa, save(tmp_path / "b_named.npz", b)])
    assert d.mol_id_source == "mixed"


# --------------------------------------------------------------------------- CLI


def test_inspect_reports_padding_and_grouping(mmml_file, capsys):
    assert data_main(["inspect", str(mmml_file), "--dipole-units", "e_bohr"]) == 0
    out = capsys.readouterr().out
    assert "24 molecules, 240 conformers" in out and "molecules: grouped by bond graph" in out
    assert "atoms 1590 / 14400 = 11.0%" in out and "grid points 245123 / 768000 = 31.9%" in out
    assert "N (240, 1)" in out and "median |Dxyz| / |dipole of mono about com| = 0.99" in out


def test_convert_writes_a_compact_file_and_refuses_to_overwrite(demo, mmml_file, tmp_path, capsys):
    out = tmp_path / "compact.npz"
    args = ["convert", str(mmml_file), "--out", str(out), "--dipole-units", "e_bohr"]
    assert data_main(args) == 0
    capsys.readouterr()
    d = load_npz(out)  # Debye now, mol_id stored
    assert_same_data(d, demo)
    assert same_partition(d.mol_id, demo.mol_id) and d.mol_id_source == "file"
    with np.load(out) as f:
        assert f["N"].shape == (240,) and f["R"].shape == (240, 12, 3)
    prov = json.loads(out.with_name("compact.provenance.json").read_text())
    assert prov["grouping"]["mol_id_source"] == "graph" and prov["grouping"]["molecules"] == 24
    assert prov["inputs"][0]["stored_atoms"] == 60 and len(prov["inputs"][0]["sha256"]) == 64
    assert prov["output"]["data_checksum"] == d.checksum()
    assert prov["dipole_units"]["declared"] == "e_bohr"

    before = out.read_bytes()
    assert data_main(args) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert data_main(args + ["--force"]) == 0
    assert data_main(["convert", str(out), "--out", str(out), "--force"]) == 2
    assert "also an input" in capsys.readouterr().err
    bad = tmp_path / "bad.npz"
    assert data_main(["convert", str(mmml_file), "--out", str(bad)]) == 2  # units: e_bohr
    assert not bad.exists() and not bad.with_name("bad.provenance.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compact.npz", "compact.provenance.json"]
