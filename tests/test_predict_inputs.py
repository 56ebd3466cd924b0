"""Prediction reads what chemists have: every record of SDF and mol2 files with their total
charges, SMILES (strings and .smi files), and warns out of the training domain the checkpoint
records (elements, size, total charge), in the result, the console and the output file. A
checkpoint without a recorded domain still predicts, and says once that the checks are skipped.

The model is conftest's `tiny_predict_run`: 1 epoch on the synthetic set (H, C, N, O, at most 8
atoms, neutral), max_atomic_number 10 (so fluorine is accepted but never seen).
"""

import json
import shutil
import warnings
from pathlib import Path

import ase.io
import numpy as np
import pytest
from rdkit import Chem

from dcmtune.data.splits import split_dataset
from dcmtune.predict import (
    PredictError,
    PredictWarning,
    TrainingDomain,
    load_model,
    smiles_molecules,
)
from dcmtune.predict.commands import main as cli_main
from dcmtune.train import checkpoints as ckpt

LEGACY_META = (
    Path(__file__).parent / "data/legacy_experiment/trial_c9eae5c3/checkpoints/best/meta.json"
)
MOL2 = """\
# three records: integral charges (0, +1), then a sum of 0.034 (not integral)
@<TRIPOS>MOLECULE
water
 3 2 0 0 0
SMALL
USER_CHARGES

@<TRIPOS>ATOM
      1 O1     0.0000    0.0000    0.1173 O.3     1  WAT   -0.8340
      2 H1     0.0000    0.7572   -0.4692 H       1  WAT    0.4170
      3 H2     0.0000   -0.7572   -0.4692 H       1  WAT    0.4170
@<TRIPOS>BOND
     1     1     2    1
     2     1     3    1
@<TRIPOS>MOLECULE
ammonium
 5 4 0 0 0
SMALL
USER_CHARGES

@<TRIPOS>ATOM
      1 N1     0.0000    0.0000    0.0000 N.4     1  NH4   -0.4000
      2 H1     0.5900    0.5900    0.5900 H       1  NH4    0.3500
      3 H2    -0.5900   -0.5900    0.5900 H       1  NH4    0.3500
      4 H3    -0.5900    0.5900   -0.5900 H       1  NH4    0.3500
      5 H4     0.5900   -0.5900   -0.5900 H       1  NH4    0.3500
@<TRIPOS>BOND
     1     1     2    1
     2     1     3    1
     3     1     4    1
     4     1     5    1
@<TRIPOS>MOLECULE
water_odd_charges
 3 2 0 0 0
SMALL
USER_CHARGES

@<TRIPOS>ATOM
      1 O1     0.0000    0.0000    0.1173 O.3     1  WAT   -0.8000
      2 H1     0.0000    0.7572   -0.4692 H       1  WAT    0.4170
      3 H2     0.0000   -0.7572   -0.4692 H       1  WAT    0.4170
@<TRIPOS>BOND
     1     1     2    1
     2     1     3    1
"""


@pytest.fixture(scope="module")
def predictor(tiny_predict_run):
    return load_model(tiny_predict_run)


def _rdkit_3d(smiles, hydrogens=True):
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    assert AllChem.EmbedMolecule(mol, randomSeed=7) == 0
    mol.SetProp("_Name", smiles)
    return mol if hydrogens else Chem.RemoveHs(mol)


def _write_sdf(path, mols):
    w = Chem.SDWriter(str(path))
    for m in mols:
        w.write(m)
    w.close()
    return path


def _predict(predictor, *args, **kwargs):
    """predict(...) and the PredictWarnings it issued."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        preds = predictor.predict(*args, **kwargs)
    return preds, [str(w.message) for w in caught if issubclass(w.category, PredictWarning)]


# --------------------------------------------------------------------------- the domain


def test_the_checkpoint_records_the_training_domain(predictor, synthetic):
    train = synthetic.subset(split_dataset(synthetic, predictor.config.data)["train"])
    meta = ckpt.read_meta(predictor.path)
    assert meta["training_domain"] == train.domain()
    assert predictor.domain == TrainingDomain.from_meta(meta)
    assert predictor.domain.total_charges == (0.0,)
    assert predictor.domain.max_atoms == int(train.N.max()) <= 8
    assert set(predictor.domain.elements) <= {1, 6, 7, 8}


def test_out_of_domain_molecules_warn_in_the_result_and_once_per_kind(predictor):
    [fluoroform, ethanol, cation] = smiles_molecules(["FC(F)F", "CCO", "C[NH3+]"])
    water = smiles_molecules(["O"])[0]
    preds, warned = _predict(predictor, [fluoroform, ethanol, cation, water, cation])
    assert [p.total_charge for p in preds] == [0.0, 0.0, 1.0, 0.0, 1.0]
    assert any("element F never seen in training" in w for w in preds[0].warnings)
    assert preds[1].warnings == (
        f"9 atoms, larger than the largest training molecule ({predictor.domain.max_atoms} atoms)",
    )
    assert any(
        "total charge +1 e never seen in training (trained on +0)" in w for w in preds[2].warnings
    )
    assert preds[3].warnings == ()
    # One warning per distinct message, naming the first molecule and how many more.
    charge = [w for w in warned if "total charge +1" in w]
    assert charge == [f"C[NH3+] and 1 more: {preds[2].warnings[-1]}"]
    assert len(warned) == len({w for p in preds for w in p.warnings})
    # An explicit charge overrides the formal one (and is checked the same way).
    [neutral], warned = _predict(predictor, cation, charge=0.0)
    assert neutral.total_charge == 0.0 and not any("total charge" in w for w in warned)


def test_a_checkpoint_without_a_domain_still_predicts_and_says_so_once(predictor, tmp_path):
    old = tmp_path / "old_checkpoint"
    shutil.copytree(predictor.path, old)
    state, meta = ckpt.load_checkpoint(old)
    del meta["training_domain"]
    ckpt.save_checkpoint(old, state, meta)
    legacy = load_model(old)
    assert legacy.domain is None
    fluoroform = smiles_molecules(["FC(F)F"])
    preds, warned = _predict(legacy, fluoroform * 3)
    assert len(preds) == 3 and all(p.warnings == () for p in preds)
    assert len(warned) == 1 and "records no training domain" in warned[0]
    np.testing.assert_allclose(
        preds[0].charges, predictor.predict(fluoroform)[0].charges, rtol=1e-5, atol=1e-6
    )
    # The shipped legacy experiment's checkpoints predate the domain, too.
    assert TrainingDomain.from_meta(json.loads(LEGACY_META.read_text())) is None


# --------------------------------------------------------------------------- files


def test_every_sdf_record_with_its_formal_charge(predictor, tmp_path):
    mols = [_rdkit_3d("CC(=O)[O-]"), _rdkit_3d("O"), _rdkit_3d("C[NH3+]")]
    path = _write_sdf(tmp_path / "three.sdf", mols)
    preds, _ = _predict(predictor, path)
    assert [p.source for p in preds] == [
        "three.sdf:0:CC(=O)[O-]",
        "three.sdf:1:O",
        "three.sdf:2:C[NH3+]",
    ]
    assert [p.total_charge for p in preds] == [-1.0, 0.0, 1.0]
    for p, m in zip(preds, mols, strict=True):
        np.testing.assert_allclose(p.positions, m.GetConformer().GetPositions(), atol=1e-4)
        np.testing.assert_allclose(p.charges.sum(dtype=np.float64), p.total_charge, atol=1e-5)
        assert len(p.bonds) == m.GetNumBonds()


def test_mol2_records_rounded_partial_charges_and_a_warning(predictor, tmp_path):
    (tmp_path / "three.mol2").write_text(MOL2)
    preds, warned = _predict(predictor, tmp_path / "three.mol2")
    assert [p.source for p in preds] == [
        "three.mol2:0:water",
        "three.mol2:1:ammonium",
        "three.mol2:2:water_odd_charges",
    ]
    assert [p.total_charge for p in preds] == [0.0, 1.0, 0.0]
    assert [len(p.numbers) for p in preds] == [3, 5, 3] and preds[1].numbers[0] == 7
    odd = "mol2 partial charges sum to 0.0340, not an integer; total charge taken as 0"
    assert preds[0].warnings == () and preds[2].warnings[0].startswith(odd)
    assert any(w.startswith(f"three.mol2:2:water_odd_charges: {odd}") for w in warned)
    assert preds[1].bonds.tolist() == [[0, 1], [0, 2], [0, 3], [0, 4]]


def test_smi_file_and_smiles_record_how_the_geometry_was_made(predictor, tmp_path):
    (tmp_path / "mols.smi").write_text("# SMILES name\nCCO ethanol\n\nC[NH3+] methylammonium\n")
    preds, _ = _predict(predictor, tmp_path / "mols.smi")
    assert [p.source for p in preds] == ["mols.smi:0:ethanol", "mols.smi:1:methylammonium"]
    assert [p.smiles for p in preds] == ["CCO", "C[NH3+]"]
    assert [p.total_charge for p in preds] == [0.0, 1.0]
    assert all("ETKDG" in p.geometry and "MMFF94" in p.geometry for p in preds)
    # The same SMILES gives the same geometry whatever the call.
    [again] = smiles_molecules(["CCO"])
    np.testing.assert_allclose(again.positions, preds[0].positions)


def test_cli_smiles_warnings_on_stderr_and_in_the_file(tiny_predict_run, tmp_path, capsys):
    out = tmp_path / "mix.json"
    code = cli_main([str(tiny_predict_run), "--smiles", "FC(F)F", "CCO", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0 and "2 SMILES" in captured.out
    lines = captured.err.splitlines()
    assert any(s.startswith("warning: FC(F)F: element F never seen") for s in lines), lines
    assert any(s.startswith("warning: CCO: 9 atoms, larger than") for s in lines), lines
    doc = json.loads(out.read_text())
    assert doc["training_domain"]["max_atoms"] <= 8
    [f3, eth] = doc["molecules"]
    assert f3["smiles"] == "FC(F)F" and "ETKDG" in f3["geometry"]
    assert any("element F never seen" in w for w in f3["warnings"])
    assert eth["warnings"] == [w for w in eth["warnings"] if "larger than" in w] != []
    # The extended XYZ and the PQR file carry them too.
    frames = ase.io.read(out.with_suffix(".xyz"), ":")
    assert frames[0].info["smiles"] == "FC(F)F" and "element F" in frames[0].info["warnings"]
    pqr = out.with_suffix(".pqr").read_text()
    assert "REMARK   6 warning: element F never seen in training" in pqr


def test_cli_charge_flag_overrides_the_file(tiny_predict_run, tmp_path, capsys):
    (tmp_path / "three.mol2").write_text(MOL2)
    out = tmp_path / "three.npz"
    code = cli_main(
        [str(tiny_predict_run), str(tmp_path / "three.mol2"), "--charge", "0", "--out", str(out)]
    )
    assert code == 0
    capsys.readouterr()
    with np.load(out) as f:
        assert f["Q"].tolist() == [0.0, 0.0, 0.0]
        np.testing.assert_allclose(f["charges"].sum(axis=(1, 2)), 0.0, atol=1e-5)
        assert "not an integer" in str(f["warnings"][2]) and str(f["warnings"][0]) == ""
        assert json.loads(str(f["training_domain"]))["total_charges"] == [0.0]


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_chem")
    flat = _rdkit_3d("CCO")
    conf = flat.GetConformer()
    for i in range(flat.GetNumAtoms()):
        p = conf.GetAtomPosition(i)
        conf.SetAtomPosition(i, (p.x, p.y, 0.0))
    conf.Set3D(False)
    (d / "no_atoms.mol2").write_text("@<TRIPOS>MOLECULE\nempty\n 0 0 0\n")
    (d / "bad_type.mol2").write_text(MOL2.replace("O.3 ", "Q.3 ", 1))
    (d / "empty.smi").write_text("# nothing\n")
    (d / "bad.smi").write_text("CCO ethanol\nC1CC bad_ring\n")
    return {
        "hydrogens": (_write_sdf(d / "heavy.sdf", [_rdkit_3d("CCO", False)]), "lacks 6 hydrogen"),
        "2d": (_write_sdf(d / "flat.sdf", [flat]), "no 3D coordinates"),
        "no_atoms": (d / "no_atoms.mol2", "no @<TRIPOS>ATOM lines"),
        "bad_type": (d / "bad_type.mol2", "with an element as the type"),
        "empty_smi": (d / "empty.smi", "holds no SMILES"),
        "bad_smiles": (d / "bad.smi", "bad.smi line 2 .*not a valid SMILES"),
    }


@pytest.mark.parametrize(
    "case", ["hydrogens", "2d", "no_atoms", "bad_type", "empty_smi", "bad_smiles"]
)
def test_bad_chemistry_files_are_one_line_exit_2_nothing_written(
    bad_files, case, predictor, tiny_predict_run, tmp_path, capsys
):
    path, match = bad_files[case]
    with pytest.raises(PredictError, match=match):
        predictor.predict(path)
    code = cli_main([str(tiny_predict_run), str(path), "--out", str(tmp_path / "out.npz")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_cli_needs_molecules_and_refuses_a_bad_smiles(tiny_predict_run, tmp_path, capsys):
    assert cli_main([str(tiny_predict_run), "--out", str(tmp_path / "o.npz")]) == 2
    assert "expected molecules" in capsys.readouterr().err
    assert (
        cli_main([str(tiny_predict_run), "--smiles", "C1CC", "--out", str(tmp_path / "o.npz")]) == 2
    )
    err = capsys.readouterr().err
    assert "--smiles 'C1CC': not a valid SMILES" in err and err.count("\n") == 1
    assert cli_main([str(tiny_predict_run), "--smiles", "[Na+].[Cl-]"]) == 2
    assert "several fragments" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
