"""Loading, validation, splits and batches of ESP data files."""

import dataclasses
import logging

import numpy as np
import pytest

from dcmtune.config import DataConfig
from dcmtune.data import (
    DataError,
    limit_train_molecules,
    load_npz,
    make_batch,
    split_dataset,
    split_indices,
    split_record,
)
from dcmtune.data.synthetic import make_synthetic


def _arrays(M=3, A=5, G=20, seed=0):
    """A valid file's arrays (the mmml spellings: esp_grid, N as (M, 1))."""
    d = make_synthetic(
        num_molecules=M,
        conformers=1,
        min_atoms=3,
        max_atoms=A,
        num_grid=G,
        grid_per_atom=4,
        seed=seed,
    )
    return {
        "R": d.R,
        "Z": d.Z,
        "N": d.N[:, None],
        "esp": d.esp,
        "esp_grid": d.grid,
        "n_grid": d.n_grid,
        "mono": d.mono,
        "Dxyz": d.dipole,
        "com": d.com,
        "Q": d.Q,
        "mol_id": d.mol_id,
    }


def _save(tmp_path, arrays, name="d.npz"):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_mmml_spellings_and_extra_keys(tmp_path, caplog):
    a = _arrays()
    a.update(E=np.zeros(3), F=np.zeros((3, 5, 3)), espMask=np.ones((3, 20), bool))
    with caplog.at_level(logging.INFO, logger="dcmtune.data"):
        d = load_npz(_save(tmp_path, a))
    assert d.grid.shape == (3, 20, 3) and d.N.shape == (3,)
    ignored = [r for r in caplog.records if "ignoring keys" in r.message]
    assert len(ignored) == 1 and "espMask" in ignored[0].message


def test_dipole_units_option(tmp_path):
    # The option converts to Debye. (Reading these Debye dipoles as e*Bohr is now refused: the
    # mono charges' dipoles say Debye; tests/test_mmml.py covers that.)
    a = _arrays()
    d1 = load_npz(_save(tmp_path, a))
    a["Dxyz"] = a["Dxyz"] / 2.541746  # the same dipoles in e*Bohr, as in mmml-era files
    d2 = load_npz(_save(tmp_path, a, "bohr.npz"), dipole_units="e_bohr")
    np.testing.assert_allclose(d2.dipole, d1.dipole, rtol=1e-5)


def _bad(key, fn):
    return pytest.param(fn, key, id=key + ":" + fn.__name__)


def drop_R(a):
    del a["R"]


def drop_grid(a):
    del a["esp_grid"]


def drop_esp(a):
    del a["esp"]


def R_2d(a):
    a["R"] = a["R"][..., 0]


def Z_shape(a):
    a["Z"] = a["Z"][:, :-1]


def Z_float_frac(a):
    a["Z"] = a["Z"] + 0.5


def N_mismatch(a):
    a["N"] = a["N"] + 1


def N_shape(a):
    a["N"] = np.zeros((3, 2), int)


def esp_rows(a):
    a["esp"] = a["esp"][:-1]


def grid_shape(a):
    a["esp_grid"] = a["esp_grid"][:, :-1]


def R_nan(a):
    a["R"][0, 0, 0] = np.nan


def esp_inf(a):
    a["esp"][1, 0] = np.inf


def n_grid_big(a):
    a["n_grid"] = a["n_grid"] + 100


def Z_too_big(a):
    a["Z"][0, 0] = 37


def mono_shape(a):
    a["mono"] = a["mono"][:, :2]


def dxyz_shape(a):
    a["Dxyz"] = a["Dxyz"][:, :2]


def Q_shape(a):
    a["Q"] = np.zeros(5)


def mol_id_shape(a):
    a["mol_id"] = a["mol_id"][:2]


def empty(a):
    for k in list(a):
        a[k] = a[k][:0]


def padding_first(a):
    i = int(np.argmin(a["N"][:, 0]))
    n = int(a["N"][i, 0])
    assert n < a["Z"].shape[1]
    a["Z"][i, 0], a["Z"][i, n] = 0, a["Z"][i, 0]


def object_array(a):
    a["mol_id"] = np.array([{"x": 1}] * 3, dtype=object)


@pytest.mark.parametrize(
    "mutate,key",
    [
        _bad("R", drop_R),
        _bad("vdw_surface", drop_grid),
        _bad("esp", drop_esp),
        _bad("R", R_2d),
        _bad("Z", Z_shape),
        _bad("Z", Z_float_frac),
        _bad("N", N_mismatch),
        _bad("N", N_shape),
        _bad("esp", esp_rows),
        _bad("vdw_surface", grid_shape),
        _bad("R", R_nan),
        _bad("esp", esp_inf),
        _bad("n_grid", n_grid_big),
        _bad("Z", Z_too_big),
        _bad("mono", mono_shape),
        _bad("Dxyz", dxyz_shape),
        _bad("Q", Q_shape),
        _bad("mol_id", mol_id_shape),
        _bad("R", empty),
        _bad("Z", padding_first),
        _bad("object", object_array),
    ],
)
def test_malformed_files_raise_one_clear_error(tmp_path, mutate, key):
    a = _arrays()
    mutate(a)
    path = _save(tmp_path, a)
    with pytest.raises(DataError) as e:
        load_npz(path, max_atomic_number=36)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    if key != "object":
        assert f": {key}:" in msg, msg


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_npz(tmp_path / "nope.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_npz(junk)
    with pytest.raises(DataError, match="at least one"):
        load_npz([])


def test_heavy_elements_accepted_up_to_max_atomic_number(tmp_path):
    a = _arrays()
    a["Z"][0, 0] = 36
    path = _save(tmp_path, a)
    assert load_npz(path, max_atomic_number=36).Z.max() == 36
    with pytest.raises(DataError, match="max_atomic_number = 35"):
        load_npz(path, max_atomic_number=35)


def test_bohr_coordinates_warn(tmp_path, caplog):
    a = _arrays()
    a["R"] = a["R"] / 0.529177
    a["esp_grid"] = a["esp_grid"] / 0.529177 * 1.6
    with caplog.at_level(logging.WARNING, logger="dcmtune.data"):
        load_npz(_save(tmp_path, a))
    assert any("Bohr" in r.message for r in caplog.records)


def test_several_files_concatenate_with_padding(tmp_path):
    p1 = _save(tmp_path, _arrays(M=2, A=4, G=12, seed=1), "a.npz")
    p2 = _save(tmp_path, _arrays(M=3, A=7, G=25, seed=2), "b.npz")
    d = load_npz([p1, p2])
    assert d.R.shape == (5, 7, 3) and d.esp.shape == (5, 25)
    np.testing.assert_array_equal(d.N, np.concatenate([load_npz(p1).N, load_npz(p2).N]))
    assert np.all(d.esp[:2, 12:] == 0)


def test_molecule_split_keeps_groups_and_is_seeded():
    mol_id = np.repeat([f"m{i}" for i in range(10)], 4)
    s = split_indices(mol_id, "molecule", 0.1, 0.2, seed=3)
    sets = {k: set(mol_id[v]) for k, v in s.items()}
    assert not (sets["train"] & sets["valid"]) and not (sets["train"] & sets["test"])
    assert not (sets["valid"] & sets["test"])
    assert sorted(np.concatenate(list(s.values()))) == list(range(40))
    assert len(s["test"]) == 8 and len(s["valid"]) == 4
    s2 = split_indices(mol_id, "molecule", 0.1, 0.2, seed=3)
    assert all(np.array_equal(s[k], s2[k]) for k in s)
    s3 = split_indices(mol_id, "molecule", 0.1, 0.2, seed=4)
    assert any(not np.array_equal(s[k], s3[k]) for k in s)


def test_counts_and_conformer_split():
    mol_id = np.repeat([f"m{i}" for i in range(10)], 4)
    s = split_indices(mol_id, "molecule", num_train=12, num_valid=5, num_test=3)
    assert len(s["train"]) == 12 and len(s["valid"]) == 8 and len(s["test"]) == 4
    c = split_indices(mol_id, "conformer", num_train=12, num_valid=5, num_test=3)
    assert (len(c["train"]), len(c["valid"]), len(c["test"])) == (12, 5, 3)
    with pytest.raises(ValueError, match="validation split is empty"):
        split_indices(mol_id, "molecule", valid_fraction=0.0, test_fraction=0.1)
    with pytest.raises(ValueError, match="no conformers left for training"):
        split_indices(mol_id[:4], "molecule", 0.1, 0.1)


def test_train_molecules_subsamples_train_only_and_nests():
    d = make_synthetic(num_molecules=30, conformers=3, max_atoms=6, num_grid=16, seed=1)
    cfg = DataConfig(valid_fraction=0.2, test_fraction=0.2, split_seed=5)
    full = split_dataset(d, cfg)
    n_all = len(set(d.mol_id[full["train"]]))
    kept = []
    for n in (3, 7, 12, n_all):
        s = split_dataset(d, dataclasses.replace(cfg, train_molecules=n))
        for k in ("valid", "test"):  # exactly the full split's held-out conformers
            assert np.array_equal(s[k], full[k])
        mols = set(d.mol_id[s["train"]])
        assert len(mols) == n
        # every training conformer of each kept molecule, and nothing else
        assert s["train"].tolist() == [i for i in full["train"] if d.mol_id[i] in mols]
        # every element of the full training split is still in training
        assert set(np.unique(d.Z[s["train"]])) == set(np.unique(d.Z[full["train"]]))
        kept.append(mols)
    assert kept[0] < kept[1] < kept[2] < kept[3]  # nested: 3 of the 7, 7 of the 12, ...
    assert np.array_equal(
        split_dataset(d, dataclasses.replace(cfg, train_molecules=n_all))["train"], full["train"]
    )
    again = split_dataset(d, dataclasses.replace(cfg, train_molecules=7))["train"]
    assert set(d.mol_id[again]) == kept[1]  # seeded: the same choice every time
    other = [
        set(
            d.mol_id[
                split_dataset(
                    d,
                    DataConfig(
                        valid_fraction=0.2, test_fraction=0.2, split_seed=seed, train_molecules=7
                    ),
                )["train"]
            ]
        )
        for seed in (6, 7, 8)
    ]
    assert any(o != kept[1] for o in other)  # and the seed changes it


def test_train_molecules_keeps_every_element_and_refuses_bad_counts():
    # 10 molecules x 2 conformers of C and H; F only in m7, S only in m2.
    mol_id = np.repeat([f"m{i}" for i in range(10)], 2)
    Z = np.tile([6, 1, 1, 0], (20, 1))
    Z[mol_id == "m7", 3], Z[mol_id == "m2", 3] = 9, 16
    train = np.arange(20)
    for seed in range(5):
        small = limit_train_molecules(mol_id, train, 3, seed, Z)
        assert {"m7", "m2"} <= set(mol_id[small]) and len(set(mol_id[small])) == 3
        assert set(np.unique(Z[small])) == {0, 1, 6, 9, 16}
    with pytest.raises(ValueError, match=r"^train_molecules: expected at least 3 .*got 2"):
        limit_train_molecules(mol_id, train, 2, 0, Z)
    assert len(set(mol_id[limit_train_molecules(mol_id, train, 2, 0)])) == 2  # no Z: no rule
    with pytest.raises(
        ValueError,
        match=r"^train_molecules: expected an integer in \[1, 10\] "
        r"\(the training split's molecules\), got 11",
    ):
        limit_train_molecules(mol_id, train, 11, 0, Z)
    with pytest.raises(ValueError, match=r"^train_molecules: .*got 0"):
        limit_train_molecules(mol_id, train, 0, 0)


def test_split_record_names_molecules(synthetic):
    s = split_indices(synthetic.mol_id, seed=0)
    rec = split_record(synthetic, s, split_by="molecule", split_seed=0)
    assert set(rec["mol_ids"]) == {"train", "valid", "test"}
    assert rec["checksum"] == synthetic.checksum() and len(rec["checksum"]) == 64


def test_batches_have_fixed_shapes_and_masks(synthetic):
    b = make_batch(synthetic, np.arange(3), batch_size=5)
    A, G = synthetic.num_atoms, synthetic.num_grid
    assert b["R"].shape == (5, A, 3) and b["grid"].shape == (5, G, 3) and b["esp"].shape == (5, G)
    np.testing.assert_array_equal(b["mol_mask"], [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(b["atom_mask"].sum(1)[:3], synthetic.N[:3])
    np.testing.assert_array_equal(b["grid_mask"].sum(1)[:3], synthetic.n_grid[:3])
    assert not b["atom_mask"][3:].any() and not b["has_mono"][3:].any()


def test_synthetic_charges_are_neutral_and_esp_exact(synthetic):
    np.testing.assert_allclose(synthetic.mono.sum(axis=1), 0.0, atol=1e-6)
    i = 3
    n, g = synthetic.N[i], synthetic.n_grid[i]
    r = np.linalg.norm(synthetic.grid[i, :g, None] - synthetic.R[i, None, :n], axis=-1)
    esp = (synthetic.mono[i, :n] / (r / 0.529177210903)).sum(axis=1)
    np.testing.assert_allclose(synthetic.esp[i, :g], esp, rtol=1e-5, atol=1e-7)


def test_every_element_stays_in_training():
    # Ten molecules; only m3 and m7 contain fluorine (Z = 9). Whatever the seed, at least one of
    # them stays in train, and every element of the data appears in the training split.
    mol_id = np.repeat([f"m{i}" for i in range(10)], 2)
    Z = np.tile(np.array([[6, 1, 1, 0]]), (20, 1))
    Z[6:8, 3] = 9
    Z[14:16, 3] = 9
    for seed in range(20):
        s = split_indices(mol_id, "molecule", 0.2, 0.2, seed=seed, Z=Z)
        assert 9 in Z[s["train"]]
        assert len(s["test"]) >= 4 and len(s["valid"]) >= 4


def test_each_file_is_split_on_its_own_and_keeps_its_split():
    """Adding a file of new molecules leaves the first file's split exactly as it was alone;
    the second file's molecules are dealt on their own, whole molecules together."""
    from dcmtune.data import load_dataset

    cfg = DataConfig(split_by="molecule", split_seed=1)
    organic, demo = load_dataset(["organic"]), load_dataset(["demo"])
    both = load_dataset(["organic", "demo"])
    assert both.part is not None and np.bincount(both.part).tolist() == [870, 240]
    assert both.checksum() != organic.checksum() and organic.part is None
    alone, joint = split_dataset(organic, cfg), split_dataset(both, cfg)
    second = split_dataset(demo, cfg)
    for k in ("train", "valid", "test"):
        np.testing.assert_array_equal(joint[k][joint[k] < 870], alone[k])
        np.testing.assert_array_equal(joint[k][joint[k] >= 870] - 870, second[k])
        ids = set(both.mol_id[joint[k]])
        assert all(
            ids.isdisjoint(both.mol_id[joint[o]]) for o in ("train", "valid", "test") if o != k
        )
    # A subset keeps each conformer's file; shells and files are not part of the checksum.
    sub = both.subset(np.array([0, 900]))
    assert sub.part.tolist() == [0, 1]
    assert (
        dataclasses.replace(organic, shell=np.ones_like(organic.esp)).checksum()
        == organic.checksum()
    )
