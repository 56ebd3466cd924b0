"""SMILES input (dcmtune.conformers), the reserved set, and the shipped organic set.

RDKit only, except one tiny PySCF run (H2O from a SMILES, STO-3G) that also checks `verify`.
The shipped-set tests read the .npz, the .csv and the provenance; they need no PySCF.
"""

import collections
import json
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import shipped_set

from dcmtune import qm
from dcmtune.data import load_dataset
from dcmtune.data.__main__ import main
from dcmtune.qm import conformers as cf

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO / "dcmtune" / "datasets"
SHIPPED = DATASETS / "organic_esp.npz"
SMILES_CSV = DATASETS / "organic_smiles.csv"
# The project's reserved list: the package copy (nothing outside the repository is read).
RESERVED = DATASETS / "reserved_molecules.txt"
# The seven larger molecules the list gained in the third step.
RESERVED_LARGE = [
    "paracetamol",
    "aspirin",
    "caffeine",
    "ala_dipeptide",
    "benzocaine",
    "chlorobenzamide",
    "fluorobiphenyl",
]
ELEMENTS = {1, 6, 7, 8, 9, 16, 17}  # H C N O F S Cl
# The reserved molecules as ASE g2 names (the reserved file's name column).
RESERVED_G2 = [
    "CH3CHO",
    "OCHCHO",
    "CH3COF",
    "HCCl3",
    "SH2",
    "CH3SCH3",
    "H3CNH2",
    "H2CCHCl",
    "H2CCHCN",
    "butadiene",
    "CH3OCH3",
    "CH3CH2SH",
    "isobutane",
    "H2CCHF",
    "HCN",
    "C3H8",
    "CH3CH2Cl",
    "HCOOCH3",
    "CH3COCH3",
    "CH3CH2NH2",
]
DEMO_G2 = [
    "H2O",
    "NH3",
    "CH4",
    "CH3OH",
    "HCOOH",
    "H2CO",
    "C2H2",
    "C2H4",
    "C2H6",
    "CH3CN",
    "CH3Cl",
    "CH3SH",
    "CH3NO2",
    "CH3COOH",
    "CH3CONH2",
    "CH3CH2OH",
    "C6H6",
    "C5H5N",
    "C4H4O",
    "C4H4S",
    "C4H4NH",
    "HCF3",
    "CO2",
    "H2CF2",
]


def _rmsd(a, b):
    return float(np.sqrt(np.mean(np.sum((a - b) ** 2, axis=-1))))


# --------------------------------------------------------------------------- parsing, identity


def test_smiles_gets_explicit_hydrogens_and_a_canonical_identity():
    mol = cf.parse_smiles("CCO")
    assert [a.GetSymbol() for a in mol.GetAtoms()] == ["C", "C", "O"] + ["H"] * 6
    assert cf.canonical_smiles(mol) == cf.canonical_smiles("OCC") == "CCO"
    # Stereo is ignored: both enantiomers and the flat SMILES are one molecule.
    assert (
        cf.canonical_smiles("C[C@H](O)CC")
        == cf.canonical_smiles("C[C@@H](O)CC")
        == cf.canonical_smiles("CCC(C)O")
    )
    assert cf.canonical_smiles("C/C=C/C") == cf.canonical_smiles("CC=CC")


@pytest.mark.parametrize(
    "smiles, match",
    [
        ("C1CC", "not a valid SMILES"),
        ("CX", "not a valid SMILES"),
        ("C(C)(C)(C)(C)C", "not a valid SMILES"),  # pentavalent carbon fails sanitisation
        ("", "empty"),
        ("[NH4+]", "total charge +1"),
        ("CC(=O)[O-]", "total charge -1"),
        ("C[CH2]", "unpaired"),
        ("CC.O", "2 fragments"),
    ],
)
def test_bad_smiles_is_a_one_line_error(smiles, match):
    with pytest.raises(qm.QMError, match=re.escape(match)) as e:
        cf.parse_smiles(smiles)
    assert "\n" not in str(e.value) and repr(smiles) in str(e.value)


def test_functional_classes_by_smarts():
    expect = {
        "CCO": {"alcohols"},
        "CCOCC": {"ethers"},
        "c1ccoc1": {"heterocycles"},
        "CCC=O": {"aldehydes_ketones"},
        "CC(C)=O": {"aldehydes_ketones"},
        "CC(=O)O": {"acids"},
        "CC(=O)OC": {"esters"},
        "CC(N)=O": {"amides"},
        "CCN": {"amines"},
        "Nc1ccccc1": {"amines", "aromatics"},
        "CC#N": {"nitriles"},
        "CCl": {"halides"},
        "Cc1ccccc1": {"aromatics"},
        "C1CCNC1": {"amines", "heterocycles"},
        "NCC(=O)O": {"amines", "acids"},
        "O=C1CCCN1": {"amides", "heterocycles"},
        "C[N+](=O)[O-]": set(),
        "C": set(),
        "O": set(),
        "CC(N)=S": set(),
        "CC(=O)NC(C)C(=O)NC": {"amides", "peptides"},  # Ace-Ala-NMe
        "CC(=O)N1CCCC1C(=O)NC": {"amides", "heterocycles", "peptides"},  # Ace-Pro-NMe
        "CC(=O)NCC(=O)O": {"amides", "acids"},  # an acetyl amino acid, not capped
        "CCC(C(N)=O)N1CCCC1=O": {"amides", "heterocycles"},  # levetiracetam
    }
    for smiles, classes in expect.items():
        assert cf.functional_classes(smiles) == classes, smiles
    assert set(cf.FUNCTIONAL_CLASSES) == {
        "alcohols",
        "ethers",
        "aldehydes_ketones",
        "acids",
        "esters",
        "amides",
        "amines",
        "nitriles",
        "halides",
        "aromatics",
        "heterocycles",
        "peptides",
    }


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("smiles", ["CCO", "CC(=O)O", "c1ccc2[nH]ccc2c1", "CS(C)=O"])
def test_embedding_is_seeded_and_keeps_the_bond_graph(smiles):
    a = cf.smiles_spec("m", smiles, seed=0)
    b = cf.smiles_spec("m", smiles, seed=0)
    assert np.array_equal(a.positions, b.positions)  # seeded: bitwise the same
    assert a.smiles == smiles and a.source == cf.SMILES_SOURCE and "ETKDG" in a.geometry
    mol = cf.parse_smiles(smiles)
    assert a.numbers.tolist() == [at.GetAtomicNum() for at in mol.GetAtoms()]
    # The 3D geometry has the SMILES's bonds (perceived from distances) and no clashes.
    assert cf.geometry_key(a.numbers, a.positions) == cf.graph_key(mol)
    d = np.linalg.norm(a.positions[:, None] - a.positions[None], axis=-1)
    assert d[np.triu_indices(len(d), 1)].min() > 0.9


def test_conformers_are_distinct_and_within_the_displacement_scale():
    spec = cf.smiles_spec("ethanol", "CCO", seed=0)
    sigma = 0.025
    R = qm.make_conformers(spec.positions, 5, sigma, np.random.default_rng(0))
    assert np.array_equal(R[0], spec.positions)  # conformer 0: the MMFF geometry
    for i in range(5):
        for j in range(i):
            assert _rmsd(R[i], R[j]) > 0.01  # distinct
    shift = R[1:] - R[0]
    assert np.abs(shift).max() < 6 * sigma  # thermal: no coordinate moves 6 sigma
    assert 0.6 * sigma < shift.std() < 1.4 * sigma


def test_smiles_file_rows_and_errors(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("# a comment\nname,smiles,class\nethanol,CCO,alcohols\n\nwater, O ,other\n")
    rows = cf.read_smiles_file(good)
    assert [(r["name"], r["smiles"], r["line"]) for r in rows] == [
        ("ethanol", "CCO", 3),
        ("water", "O", 5),
    ]
    bad = {
        "nohead.csv": ("ethanol,CCO\n", "missing column"),
        "dup.csv": ("name,smiles\nx,CCO\nx,O\n", "line 3: name 'x' already on line 2"),
        "same.csv": ("name,smiles\nethanol,CCO\nethanol2,OCC\n", "same molecule"),
        "invalid.csv": ("name,smiles\n# c\nfoo,C1CC\n", "line 3: SMILES foo ('C1CC')"),
    }
    for fname, (text, match) in bad.items():
        (tmp_path / fname).write_text(text)
        with pytest.raises(qm.QMError, match=match.replace("(", r"\(").replace(")", r"\)")):
            cf.load_smiles(smiles_files=[tmp_path / fname])


@pytest.mark.parametrize(
    "args, match",
    [
        (["--smiles", "C1CC"], "SMILES 'C1CC': not a valid SMILES"),
        (["--smiles", "CC=O"], "CH3CHO (CC=O), reserved"),
        (["--smiles", "O=CC"], "CH3CHO (CC=O), reserved"),
        (["--smiles", "CCO", "OCC"], "same molecule"),
        (["--molecules", "CH3CHO"], "reserved"),
        (["--smiles", "CCO", "--charge", "1"], "neutral closed-shell"),
        (["--smiles-file", "{tmp}/missing.csv"], "SMILES file not found"),
    ],
)
def test_cli_refuses_bad_or_reserved_smiles_exit_2_one_line(tmp_path, capsys, args, match):
    args = [s.format(tmp=tmp_path) for s in args]
    assert main(["generate", *args, "--out", str(tmp_path / "out.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and match in err
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- reserved set


def test_package_reserved_list_is_the_project_list():
    """The package copy (shipped, used by the generator) is the project's list: 27 distinct
    molecules, the 20 small g2 ones and the seven larger ones."""
    assert DATASETS / cf.RESERVED_FILE == RESERVED
    names = [
        line.split()[0]
        for line in RESERVED.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert names == RESERVED_G2 + RESERVED_LARGE
    assert cf.reserved_molecules() == cf.read_reserved(RESERVED)
    assert len(cf.reserved_molecules()) == 27  # distinct bond graphs


def test_reserved_molecules_are_refused_in_every_input_form():
    cf.check_not_reserved([cf.smiles_spec("ethanol", "CCO")])  # fine
    for smiles in ["CC=O", "O=CC", "[H]C(=O)C", "CSC", "C(C)C"]:
        with pytest.raises(qm.QMError, match="reserved for independent evaluation"):
            cf.check_not_reserved([cf.smiles_spec("x", smiles)])
    # Every reserved molecule under its ASE g2 name (geometry input), none of the demo set.
    for name in RESERVED_G2:
        with pytest.raises(qm.QMError, match=f"molecule '{name}'.*reserved"):
            cf.check_not_reserved(qm.load_molecules([name]))
    cf.check_not_reserved(qm.load_molecules(DEMO_G2))
    # Tautomers and isomers of reserved molecules are different molecules.
    cf.check_not_reserved(
        [cf.smiles_spec("vinyl_alcohol", "C=CO"), cf.smiles_spec("ethylene_oxide", "C1CO1")]
    )


# --------------------------------------------------------------------------- one tiny SCF


def test_smiles_generate_and_verify_water(tmp_path, capsys):
    """The CLI from a SMILES (H2O, STO-3G), then `verify` regenerates it within tolerance."""
    out = tmp_path / "w.npz"
    assert (
        main(
            [
                "generate",
                "--smiles",
                "O",
                "--conformers",
                "2",
                "--basis",
                "sto-3g",
                "--max-grid",
                "40",
                "--workers",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    prov = json.loads(qm.provenance_path(out).read_text())
    assert "--smiles O " in prov["command"] and prov["versions"]["rdkit"]
    rec = prov["molecules"][0]
    assert rec["mol_id"] == "O" and rec["smiles"] == "O" and "MMFF94" in rec["geometry"]
    assert "previous conformer's density" in prov["qm"]["scf"]
    with np.load(out) as f:
        assert f["Z"].tolist() == [[8, 1, 1]] * 2 and f["mol_id"].tolist() == ["O", "O"]
    capsys.readouterr()
    assert main(["verify", str(out), "--workers", "0"]) == 0
    assert "ok: 1 molecules" in capsys.readouterr().out
    # A changed ESP value is caught.
    with np.load(out) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["esp"][1, 3] += 2e-6
    np.savez_compressed(out, **arrays)
    assert main(["verify", str(out), "--workers", "0"]) == 1
    assert "differ beyond tolerance: O" in capsys.readouterr().err


# --------------------------------------------------------------------------- the shipped set


@pytest.fixture(scope="module")
def shipped():
    return shipped_set("organic")


def test_shipped_molecule_list(shipped):
    rows, mols, _ = shipped
    assert len(mols) >= 150
    canon = [cf.canonical_smiles(m) for m in mols.values()]
    assert len(set(canon)) == len(canon)  # distinct molecules
    heavy = {n: m.GetNumHeavyAtoms() for n, m in mols.items()}
    assert max(heavy.values()) <= 9
    assert sum(6 <= h <= 9 for h in heavy.values()) >= 60
    for n, m in mols.items():
        assert {a.GetAtomicNum() for a in m.GetAtoms()} <= ELEMENTS, n
    counts = collections.Counter(c for m in mols.values() for c in cf.functional_classes(m))
    for c in cf.FUNCTIONAL_CLASSES:  # every class but the larger set's capped peptides
        assert counts[c] >= 8 if c != "peptides" else counts[c] == 0, (c, counts[c])
    for r in rows:  # the csv's class column agrees with the SMARTS classes
        assert r["class"] == "other" or r["class"] in cf.functional_classes(mols[r["name"]])


def test_shipped_set_holds_no_reserved_molecule(shipped):
    _, mols, _ = shipped
    reserved = [
        line.split()[1]
        for line in RESERVED.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    reserved_canon = {cf.canonical_smiles(s) for s in reserved}
    assert len(reserved_canon) == 27
    shipped_canon = {cf.canonical_smiles(m) for m in mols.values()}
    assert not shipped_canon & reserved_canon
    keys = cf.reserved_molecules()
    assert not {cf.graph_key(m) for m in mols.values()} & set(keys)


def test_shipped_arrays_match_the_list(shipped):
    _, mols, a = shipped
    ids, counts = np.unique(a["mol_id"], return_counts=True)
    assert set(ids) == set(mols) and counts.min() >= 4
    assert SHIPPED.stat().st_size <= 10_000_000  # 10 MB, shippable as package data
    for k in ("R", "esp", "vdw_surface", "mono", "Dxyz", "com", "Q", "mulliken"):
        assert a[k].dtype == np.float32, k
    assert a["n_grid"].max() <= 800
    np.testing.assert_allclose(a["mono"].sum(axis=1), a["Q"], atol=1e-4)
    for name, mol in mols.items():
        idx = np.flatnonzero(a["mol_id"] == name)
        n = mol.GetNumAtoms()
        z = [at.GetAtomicNum() for at in mol.GetAtoms()]
        assert a["N"][idx].tolist() == [n] * len(idx) and a["Z"][idx[0], :n].tolist() == z
        R = a["R"][idx, :n].astype(np.float64)
        # Conformer 0 has the bonds of the SMILES; the others are distinct thermal displacements.
        assert cf.geometry_key(z, R[0]) == cf.graph_key(mol), name
        for i in range(1, len(idx)):
            assert 0.005 < _rmsd(R[i], R[0]) < 0.1, name
            assert min(_rmsd(R[i], R[j]) for j in range(i)) > 0.005, name


def test_shipped_set_loads_without_warnings(caplog):
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("error")
        d = load_dataset([SHIPPED])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert d.num_conformers >= 4 * 150 and d.mono is not None and d.dipole is not None


def test_shipped_provenance(shipped):
    rows, _, a = shipped
    prov = json.loads(qm.provenance_path(SHIPPED).read_text())
    assert "--smiles-file dcmtune/datasets/organic_smiles.csv" in prov["command"]
    assert "--out dcmtune/datasets/organic_esp.npz" in prov["command"]
    assert prov["qm"]["method"] == "HF" and prov["qm"]["basis"] == "6-31G*"
    by_id = {m["mol_id"]: m for m in prov["molecules"]}
    assert {r["name"]: r["smiles"] for r in rows} == {k: v["smiles"] for k, v in by_id.items()}
    assert prov["timing"]["conformers"] == len(a["mol_id"])


def test_rdkit_baseline_charges_follow_the_generated_atom_order():
    from dcmtune.data.baselines import rdkit_charges

    water = rdkit_charges("O", [8, 1, 1], "gasteiger")
    assert water.shape == (3,) and abs(water.sum()) < 1e-6 and water[0] < 0 < water[1]
    mmff = rdkit_charges("CC(=O)N", [6, 6, 8, 7, 1, 1, 1, 1, 1], "mmff94")
    assert abs(mmff.sum()) < 1e-6 and mmff[2] < -0.4  # the amide oxygen
    with pytest.raises(ValueError, match="not the data's"):
        rdkit_charges("O", [1, 8, 1], "gasteiger")
    with pytest.raises(ValueError, match="sum to"):  # RDKit's MMFF94 on CO2 sums to -1 e
        rdkit_charges("O=C=O", [8, 6, 8], "mmff94")
    with pytest.raises(ValueError, match="method"):
        rdkit_charges("O", [8, 1, 1], "am1bcc")
