"""The shipped large set (dcmtune/datasets/large_esp.npz): 10-18 heavy atoms, its molecule
list, classes, reserved molecules, stored shells, size, and that adding it to the organic set
leaves the organic set's split as it was. Reads the files only (RDKit, no PySCF)."""

import collections
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import shipped_set

from dcmtune import qm
from dcmtune.config import DataConfig
from dcmtune.data import load_dataset, split_dataset
from dcmtune.qm import conformers as cf

DATASETS = Path(__file__).resolve().parents[1] / "dcmtune" / "datasets"
SHIPPED = DATASETS / "large_esp.npz"
SMILES_CSV = DATASETS / "large_smiles.csv"
ELEMENTS = {1, 6, 7, 8, 9, 16, 17}  # H C N O F S Cl


@pytest.fixture(scope="module")
def large():
    return shipped_set("large")


def test_the_issue_s_composition(large):
    """>= 120 new neutral molecules of 10-18 heavy atoms, >= 30 capped amino acids or
    dipeptides, >= 30 with two or more rings, >= 20 with S or Cl, elements H C N O F S Cl."""
    from rdkit.Chem import rdMolDescriptors

    rows, mols, _ = large
    assert len(mols) >= 120
    canon = [cf.canonical_smiles(m) for m in mols.values()]
    assert len(set(canon)) == len(canon)
    for name, m in mols.items():
        assert 10 <= m.GetNumHeavyAtoms() <= 18, name
        assert {a.GetAtomicNum() for a in m.GetAtoms()} <= ELEMENTS, name
        assert all(a.GetFormalCharge() == 0 for a in m.GetAtoms()), name
    classes = collections.Counter(c for m in mols.values() for c in cf.functional_classes(m))
    assert classes["peptides"] >= 30
    assert sum(rdMolDescriptors.CalcNumRings(m) >= 2 for m in mols.values()) >= 30
    s_or_cl = [n for n, m in mols.items() if {a.GetAtomicNum() for a in m.GetAtoms()} & {16, 17}]
    assert len(s_or_cl) >= 20
    for r in rows:  # the list's peptides are exactly the SMARTS class
        assert (r["class"] == "peptides") == ("peptides" in cf.functional_classes(mols[r["name"]]))
    organic = {
        cf.canonical_smiles(cf.parse_smiles(r["smiles"]))
        for r in cf.read_smiles_file(DATASETS / "organic_smiles.csv")
    }
    assert not organic & set(canon)  # new molecules


def test_no_reserved_molecule(large):
    _, mols, _ = large
    assert not {cf.graph_key(m) for m in mols.values()} & set(cf.reserved_molecules())


def test_arrays_match_the_list_with_shells(large):
    _, mols, a = large
    ids, counts = np.unique(a["mol_id"], return_counts=True)
    assert set(ids) == set(mols) and counts.min() >= 3
    assert a["shell"].shape == a["esp"].shape
    real = np.arange(a["esp"].shape[1])[None, :] < a["n_grid"][:, None]
    factors = np.array([1.4, 1.6, 1.8, 2.0])
    assert (np.abs(a["shell"][real][:, None] - factors).min(axis=1) < 1e-6).all()
    assert not a["shell"][~real].any()
    np.testing.assert_allclose(a["mono"].sum(axis=1), a["Q"], atol=1e-4)
    for name, mol in mols.items():
        idx = np.flatnonzero(a["mol_id"] == name)
        n, z = mol.GetNumAtoms(), [at.GetAtomicNum() for at in mol.GetAtoms()]
        assert a["Z"][idx[0], :n].tolist() == z
        assert cf.geometry_key(z, a["R"][idx[0], :n].astype(np.float64)) == cf.graph_key(mol)
    total = sum(p.stat().st_size for p in DATASETS.glob("*.npz"))
    assert total < 40_000_000  # all bundled data under 40 MB


def test_provenance(large):
    rows, _, a = large
    prov = json.loads(qm.provenance_path(SHIPPED).read_text())
    assert "--smiles-file dcmtune/datasets/large_smiles.csv" in prov["command"]
    assert "--density-fit cc-pVDZ-JKFIT" in prov["command"]
    assert prov["qm"]["method"] == "HF" and prov["qm"]["basis"] == "6-31G*"
    assert prov["settings"]["conformers"] >= 3 and prov["grid"]["max_grid"] == 1200
    by_id = {m["mol_id"]: m["smiles"] for m in prov["molecules"]}
    assert by_id == {r["name"]: r["smiles"] for r in rows}


@pytest.fixture(scope="module")
def organic_and_both():
    return load_dataset(["organic"]), load_dataset(["organic", "large"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adding_it_keeps_the_organic_split(organic_and_both, seed):
    organic, both = organic_and_both
    cfg = DataConfig(split_by="molecule", split_seed=seed)
    alone, joint = split_dataset(organic, cfg), split_dataset(both, cfg)
    M = organic.num_conformers
    for k in ("train", "valid", "test"):
        np.testing.assert_array_equal(joint[k][joint[k] < M], alone[k])
    test_large = set(both.mol_id[joint["test"][joint["test"] >= M]])
    assert len(test_large) >= 10  # the large molecules have their own test molecules
    assert test_large.isdisjoint(both.mol_id[joint["train"]])
