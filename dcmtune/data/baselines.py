"""Classical charge models to report beside a trained model (numpy, float64; no JAX).

* `fit_esp_charges`, `fit_esp_charges_shared`: least-squares atom-centred charges reproducing
  an ESP (one conformer, or one charge set shared by a molecule's conformers), total charge
  constrained exactly. The data generator stores the first as `mono`.
* `element_charges`: one charge per element, least-squares fitted to the ESP of a training set.
* `mulliken_charges`: the Mulliken charges a data file may carry (extra key `mulliken`).
* `split_baselines`: all of these evaluated on one split, the table a ranking reports (with
  two-stage RESP charges, `dcmtune.data.resp`, AM1-BCC and GFN2-xTB charges,
  `dcmtune.data.semiempirical`, and EspalomaCharge charges, `dcmtune.data.espaloma`, when the
  molecules' SMILES are known).
* `esp_rmse_of_atom_charges`: the ESP RMSE (kcal/mol/e) of any atom-centred charges, computed
  the way the model's metric is (per molecule MSE over valid grid points, averaged, sqrt).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from dcmtune.data.coulomb import esp_design_matrix
from dcmtune.data.dataset import ESPData, bundled_dataset_path, data_file_path
from dcmtune.data.espaloma import espaloma_available, espaloma_charge_array
from dcmtune.data.molgraph import mol_from_smiles
from dcmtune.data.resp import resp_charges_per_molecule
from dcmtune.data.semiempirical import (
    am1bcc_charge_array,
    antechamber_path,
    gfn2_charge_array,
    tblite_available,
)
from dcmtune.units import BOHR, HARTREE_TO_KCAL

__all__ = [
    "esp_design_matrix",
    "fit_esp_charges",
    "fit_esp_charges_shared",
    "shared_charges_per_molecule",
    "element_charges",
    "element_charge_array",
    "mulliken_charges",
    "split_baselines",
    "rdkit_charges",
    "rdkit_charge_array",
    "RDKIT_METHODS",
    "esp_rmse_of_atom_charges",
    "per_molecule_esp_mse",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- ESP fits


def _constrained_lstsq(T: np.ndarray, v: np.ndarray, total: float) -> np.ndarray:
    """argmin_q |T q - v|^2 subject to sum(q) = total.

    The constraint is solved exactly by eliminating the last charge, q_A = total - sum(q_<A),
    which is the Lagrange-multiplier solution without squaring the condition number.
    """
    A = T.shape[1]
    if A == 1:
        return np.array([float(total)])
    rhs = v - total * T[:, -1]
    q, *_ = np.linalg.lstsq(T[:, :-1] - T[:, -1:], rhs, rcond=None)
    return np.append(q, total - q.sum())


def fit_esp_charges(
    positions: np.ndarray, grid: np.ndarray, esp: np.ndarray, Q: float = 0.0
) -> np.ndarray:
    """Least-squares atom-centred charges reproducing `esp`, with sum(q) = Q exactly.

    Args:
      positions: (A, 3) real atoms, Angstrom.
      grid: (G, 3) valid grid points, Angstrom.
      esp: (G,) Hartree/e.
      Q: total charge, e.

    Returns:
      (A,) charges, e.
    """
    return _constrained_lstsq(esp_design_matrix(positions, grid), np.asarray(esp, np.float64), Q)


def fit_esp_charges_shared(
    positions: Sequence[np.ndarray],
    grids: Sequence[np.ndarray],
    esps: Sequence[np.ndarray],
    Q: float = 0.0,
) -> np.ndarray:
    """ONE charge set for all conformers of a molecule (same atoms in the same order).

    Args:
      positions: per conformer (A, 3), Angstrom.
      grids: per conformer (G_c, 3), Angstrom (sizes may differ).
      esps: per conformer (G_c,), Hartree/e.
      Q: total charge, e.

    Returns:
      (A,) charges minimising the squared ESP error pooled over all conformers' grid points.
    """
    T = np.concatenate([esp_design_matrix(R, g) for R, g in zip(positions, grids, strict=True)])
    v = np.concatenate([np.asarray(e, np.float64) for e in esps])
    return _constrained_lstsq(T, v, Q)


def shared_charges_per_molecule(data: ESPData) -> np.ndarray:
    """(M, A) charges, e: one set per mol_id fitted across all its conformers in `data`
    (`fit_esp_charges_shared`); 0 for molecules whose conformers differ in atoms."""
    out = np.zeros(data.Z.shape)
    for mid in np.unique(data.mol_id):
        members = np.flatnonzero(data.mol_id == mid)
        n = int(data.N[members[0]])
        if any(
            int(data.N[i]) != n or not np.array_equal(data.Z[i], data.Z[members[0]])
            for i in members
        ):
            continue
        out[members, :n] = fit_esp_charges_shared(
            [data.R[i, :n].astype(np.float64) for i in members],
            [data.grid[i, : data.n_grid[i]].astype(np.float64) for i in members],
            [data.esp[i, : data.n_grid[i]].astype(np.float64) for i in members],
            float(data.Q[members[0]]),
        )
    return out


# --------------------------------------------------------------------------- element charges


def _inverse_distances(data: ESPData, i: int) -> np.ndarray:
    """(n_grid, N) inverse distances in 1/Bohr of conformer i's valid grid to its real atoms."""
    n, g = int(data.N[i]), int(data.n_grid[i])
    r = np.linalg.norm(
        data.grid[i, :g, None, :].astype(np.float64) - data.R[i, None, :n, :].astype(np.float64),
        axis=-1,
    )
    return BOHR / r


def element_charges(data: ESPData) -> dict[int, float]:
    """One charge per element minimising the summed per-molecule ESP MSE of `data`.

    Each molecule's rows are weighted by 1/sqrt(n_grid) so every molecule counts the same, as
    in the training loss.
    """
    elements = sorted(set(int(z) for z in np.unique(data.Z) if z > 0))
    col = {z: j for j, z in enumerate(elements)}
    rows, rhs = [], []
    for i in range(data.num_conformers):
        inv = _inverse_distances(data, i)  # (g, n)
        Z = data.Z[i, : inv.shape[1]]
        design = np.zeros((inv.shape[0], len(elements)))
        for a, z in enumerate(Z):
            design[:, col[int(z)]] += inv[:, a]
        w = 1.0 / np.sqrt(inv.shape[0])
        rows.append(design * w)
        rhs.append(data.esp[i, : inv.shape[0]].astype(np.float64) * w)
    sol, *_ = np.linalg.lstsq(np.concatenate(rows), np.concatenate(rhs), rcond=None)
    return {z: float(sol[col[z]]) for z in elements}


def element_charge_array(data: ESPData, table: dict[int, float]) -> np.ndarray:
    """(M, A) charges from a per-element table (0 for padding or unknown elements)."""
    lut = np.zeros(int(data.Z.max()) + 1)
    for z, q in table.items():
        if z < len(lut):
            lut[z] = q
    return lut[data.Z]


# --------------------------------------------------------------------------- Mulliken


def mulliken_charges(files: Sequence[str | Path], data: ESPData) -> np.ndarray | None:
    """(M, A) Mulliken charges, e, from the files' extra `mulliken` key, padded like `data`
    (the files loaded); None if any file lacks the key or does not match `data`.

    Args:
      files: The .npz files `data` was loaded from (empty = the bundled demo set).
    """
    paths = [data_file_path(f) for f in files] or [bundled_dataset_path()]
    parts = []
    for p in paths:
        try:
            with np.load(p, allow_pickle=False) as z:
                if "mulliken" not in z.files:
                    return None
                q = np.asarray(z["mulliken"], np.float64)
        except (OSError, ValueError):
            return None
        if q.ndim != 2 or q.shape[1] > data.num_atoms:
            return None
        parts.append(np.pad(q, [(0, 0), (0, data.num_atoms - q.shape[1])]))
    q = np.concatenate(parts)
    if q.shape[0] != data.num_conformers:
        return None
    return np.where(data.Z > 0, q, 0.0)


# --------------------------------------------------------------------------- scoring


RDKIT_METHODS = ("gasteiger", "mmff94")


def rdkit_charges(smiles: str, numbers: Sequence[int] | np.ndarray, method: str) -> np.ndarray:
    """(n,) Gasteiger or MMFF94 partial charges, e, of `smiles` with explicit hydrogens.

    They depend on the bond graph only. The atom order is RDKit's (heavy atoms as written, then
    the hydrogens), the order `python -m dcmtune.data generate --smiles` writes. Needs RDKit
    (the `qm` extra).

    Raises:
      ValueError: an unknown method, a SMILES RDKit cannot read, atoms that are not `numbers`
        in this order, or a molecule the method has no parameters for.
    """
    from rdkit import Chem
    from rdkit.Chem import rdForceFieldHelpers, rdPartialCharges

    if method not in RDKIT_METHODS:
        raise ValueError(f"method: expected one of {', '.join(RDKIT_METHODS)}, got {method!r}")
    mol = mol_from_smiles(smiles, numbers)
    if method == "gasteiger":
        rdPartialCharges.ComputeGasteigerCharges(mol)
        q = np.array([a.GetDoubleProp("_GasteigerCharge") for a in mol.GetAtoms()])
    else:
        props = rdForceFieldHelpers.MMFFGetMoleculeProperties(mol)
        if props is None:
            raise ValueError(f"{smiles!r}: no MMFF94 parameters")
        q = np.array([props.GetMMFFPartialCharge(i) for i in range(mol.GetNumAtoms())])
    if not np.all(np.isfinite(q)):
        raise ValueError(f"{smiles!r}: {method} gives non-finite charges")
    total = Chem.GetFormalCharge(mol)
    if abs(q.sum() - total) > 1e-3:  # e.g. RDKit's MMFF94 on CO2 sums to -1 e
        raise ValueError(f"{smiles!r}: {method} charges sum to {q.sum():.3f} e, not {total}")
    return q


def rdkit_charge_array(
    data: ESPData, smiles_of: dict[str, str], method: str
) -> tuple[np.ndarray, np.ndarray]:
    """(M, A) charges from `rdkit_charges` for every conformer whose mol_id has a SMILES in
    `smiles_of` that the method handles, and the (M,) mask of those conformers."""
    out, ok = np.zeros(data.Z.shape), np.zeros(data.num_conformers, bool)
    for mid in np.unique(data.mol_id):
        members = np.flatnonzero(data.mol_id == mid)
        n = int(data.N[members[0]])
        try:
            q = rdkit_charges(smiles_of[mid], data.Z[members[0], :n], method)
        except (KeyError, ValueError):
            continue
        out[members, :n], ok[members] = q, True
    return out, ok


def per_molecule_esp_mse(data: ESPData, charges: np.ndarray) -> np.ndarray:
    """(M,) ESP MSE in (Hartree/e)^2 of atom-centred `charges` (M, A) per conformer."""
    out = np.zeros(data.num_conformers)
    for i in range(data.num_conformers):
        inv = _inverse_distances(data, i)
        pred = inv @ charges[i, : inv.shape[1]].astype(np.float64)
        out[i] = np.mean((pred - data.esp[i, : inv.shape[0]]) ** 2)
    return out


def esp_rmse_of_atom_charges(data: ESPData, charges: np.ndarray) -> float:
    """ESP RMSE (kcal/mol/e) of atom-centred `charges` (M, A), as the model metric defines it."""
    return float(np.sqrt(per_molecule_esp_mse(data, charges).mean()) * HARTREE_TO_KCAL)


def split_baselines(
    full: ESPData,
    indices: dict,
    split: str,
    files: Sequence[str | Path] | None = None,
    smiles_of: Mapping[str, str] | None = None,
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """The classical charge models evaluated on the conformers of one split.

    Element charges are fitted on the training split (a prediction); the data's own `mono`
    charges and one charge set per molecule fitted to the evaluated ESP bound what fixed
    atom-centred charges can do, and so do two-stage RESP charges fitted the same way (over the
    molecules whose graph `smiles_of` gives); over those molecules AM1-BCC and GFN2-xTB charges
    at each molecule's first conformer and EspalomaCharge charges from the graph are predictions
    (left out, with a log line, when AmberTools, tblite or expaloma is missing); Mulliken
    charges come from the files when they carry them.

    Args:
      full: The whole dataset.
      indices: Conformer indices of `full` per split name (a run's split record `indices`).
      split: The split to evaluate ("test" or "valid").
      files: The files `full` was loaded from, for Mulliken charges (None: not known).
      smiles_of: {mol_id: SMILES} (the data's provenance), for RESP, AM1-BCC, EspalomaCharge
        and GFN2-xTB (None: none of these rows).

    Returns:
      (rows {method, fitted_on, kind, `{split}_esp_rmse` (kcal/mol/e), note}, {method:
      per-conformer ESP MSE, (Hartree/e)^2, NaN for conformers a method does not cover});
      esp_rmse is defined as the model's (square root of the mean over the conformers covered).
    """
    idx = np.asarray(indices[split], np.int64)
    target = full.subset(idx)
    train_idx = np.asarray(indices.get("train", []), np.int64)
    candidates = [
        _element_baseline(full.subset(train_idx), target) if len(train_idx) else None,
        _mono_baseline(target, split),
        _shared_baseline(target, split),
        _resp_baseline(target, split, smiles_of) if smiles_of else None,
        _am1bcc_baseline(target, smiles_of) if smiles_of else None,
        _espaloma_baseline(target, smiles_of) if smiles_of else None,
        _gfn2_baseline(target, smiles_of) if smiles_of else None,
        _mulliken_baseline(full, files, idx),
    ]
    rows, per_conf = [], {}
    for candidate in candidates:
        if candidate is None:
            continue
        method, fitted_on, kind, note, charges = candidate
        mse = per_conf[method] = per_molecule_esp_mse(target, charges)
        rmse = float(np.sqrt(np.nanmean(mse)) * HARTREE_TO_KCAL)
        row = dict(method=method, fitted_on=fitted_on, kind=kind, note=note)
        rows.append({**row, f"{split}_esp_rmse": rmse})
    return rows, per_conf


def _shared_baseline(target: ESPData, split: str) -> tuple:
    """One charge set per molecule fitted to the evaluated ESP (a bound, not a prediction)."""
    note = "atom-centred charges shared by a molecule's conformers"
    where = f"all {split} conformers of the molecule"
    charges = shared_charges_per_molecule(target)
    return "one charge set per molecule (LSQ)", where, f"fit to the {split} ESP", note, charges


def _resp_baseline(target: ESPData, split: str, smiles_of: Mapping[str, str]) -> tuple | None:
    """Two-stage RESP per molecule fitted to the evaluated ESP (a bound, not a prediction),
    over the molecules with a known graph; NaN charges (so NaN MSE) elsewhere."""

    charges, ok = resp_charges_per_molecule(target, smiles_of)
    if not ok.any():
        return None
    covered, total = len(np.unique(target.mol_id[ok])), len(np.unique(target.mol_id))
    note = (
        "two-stage RESP (Bayly et al. 1993; a = 0.0005 then 0.001 on CH3/CH2 groups), one "
        f"charge set per molecule; {covered} of {total} molecules (those with a SMILES)"
    )
    where = f"all {split} conformers of the molecule"
    charges[~ok] = np.nan
    method = "RESP (two-stage, fitted per molecule; a bound)"
    return method, where, f"fit to the {split} ESP", note, charges


def _covered(target: ESPData, ok: np.ndarray) -> str:
    """'k of n molecules' covered by the (M,) mask `ok`."""
    return f"{len(np.unique(target.mol_id[ok]))} of {len(np.unique(target.mol_id))} molecules"


def _am1bcc_baseline(target: ESPData, smiles_of: Mapping[str, str]) -> tuple | None:
    """AM1-BCC charges (antechamber + sqm) at each molecule's first conformer (a prediction),
    over the molecules with a SMILES; None, logged, without AmberTools or RDKit."""
    program = antechamber_path()
    if program is None or importlib.util.find_spec("rdkit") is None:
        log.info("baselines: no AM1-BCC row (needs antechamber from ambertools and RDKit)")
        return None
    charges, ok = am1bcc_charge_array(target, smiles_of, program)
    if not ok.any():
        return None
    note = (
        "AM1-BCC (Jakalian et al. 2002): sqm AM1 single point at the molecule's first "
        f"conformer's stored geometry (no re-optimisation) + bond charge corrections, scored on "
        f"all its conformers; {_covered(target, ok)} (those with a SMILES)"
    )
    charges[~ok] = np.nan
    method = "AM1-BCC (sqm, conformer 0)"
    return method, "conformer 0 geometry + SMILES graph", "prediction", note, charges


def _espaloma_baseline(target: ESPData, smiles_of: Mapping[str, str]) -> tuple | None:
    """EspalomaCharge charges from each molecule's graph (a prediction), over the molecules
    with a SMILES; None, logged, without expaloma or RDKit."""
    if not espaloma_available():
        log.info("baselines: no EspalomaCharge row (needs expaloma and RDKit)")
        return None
    charges, ok = espaloma_charge_array(target, smiles_of)
    if not ok.any():
        return None
    note = (
        "EspalomaCharge (Wang et al. 2023, arXiv:2302.06758; expaloma, v0.0.8 weights): a "
        "graph network trained on AM1-BCC ELF10 charges, from the SMILES graph only (no "
        f"geometry); {_covered(target, ok)} (those with a SMILES)"
    )
    charges[~ok] = np.nan
    return "EspalomaCharge", "SMILES graph", "prediction", note, charges


def _gfn2_baseline(target: ESPData, smiles_of: Mapping[str, str]) -> tuple | None:
    """GFN2-xTB charges (tblite) at each molecule's first conformer (a prediction), over the
    molecules with a SMILES; None, logged, without tblite."""
    if not tblite_available():
        log.info("baselines: no GFN2-xTB row (needs tblite)")
        return None
    charges, ok = gfn2_charge_array(target, smiles_of.keys())
    if not ok.any():
        return None
    note = (
        "GFN2-xTB charges (tblite) at the molecule's first conformer's stored geometry, scored "
        f"on all its conformers; {_covered(target, ok)} (those with a SMILES)"
    )
    charges[~ok] = np.nan
    return "GFN2-xTB (conformer 0)", "conformer 0 geometry", "prediction", note, charges


def _element_baseline(train: ESPData, target: ESPData) -> tuple:
    """One charge per element, least squares on the training split's ESP (a prediction)."""
    table = element_charges(train)
    missing = sorted(set(int(z) for z in np.unique(target.Z) if z > 0) - set(table))
    note = "one charge per element, least squares on the training split's ESP" + (
        f"; elements {missing} absent from training get 0" if missing else ""
    )
    charges = element_charge_array(target, table)
    return "element charges (LSQ)", "train split", "prediction", note, charges


def _mono_baseline(target: ESPData, split: str) -> tuple | None:
    """The data file's own reference charges (`mono`), when it has them."""
    if target.mono is None:
        return None
    note = (
        "the data file's reference atomic charges; in data made by `python -m dcmtune.data "
        "generate` they are ESP-fitted to each conformer's own ESP, so not a prediction"
    )
    where = f"each {split} conformer (data file)"
    return "per-conformer charges (`mono`)", where, "reference charges", note, target.mono


def _mulliken_baseline(full: ESPData, files, idx: np.ndarray) -> tuple | None:
    """Mulliken charges from the files' `mulliken` key, when they carry it."""
    mulliken = mulliken_charges(files, full) if files is not None else None
    if mulliken is None:
        return None
    note = "from the data file's `mulliken` key"
    return "Mulliken charges", "QM wavefunction", "prediction (QM)", note, mulliken[idx]
