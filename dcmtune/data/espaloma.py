"""EspalomaCharge: AM1-BCC-like charges predicted from the molecular graph alone.

EspalomaCharge (Wang, Pulido, Takaba, Kaminow, Scheen, Wang, Chodera, arXiv:2302.06758) is a
graph neural network trained to reproduce AM1-BCC ELF10 charges: four GraphSAGE layers give
each atom an electronegativity e_i and a hardness s_i, and charge equilibration,
q_i = -e_i / s_i + (Q + sum_j e_j / s_j) / (s_i sum_j 1 / s_j), fixes the total charge Q
exactly. It sees the bond graph (elements, bonds, formal charges, hybridisation, rings), never a
geometry: one charge set per molecule, milliseconds per molecule instead of an AM1 calculation.

It runs through `expaloma` (a JAX/Equinox port of espaloma_charge with the v0.0.8 weights
bundled; the `qm` extra), imported inside the functions so that the data wing stays numpy: the
JAX code is expaloma's. The graph is the molecule's SMILES with explicit hydrogens, whose atoms
(RDKit's order, hydrogens last) must be the data's, in order; the geometry is used only to check
that every bond of the SMILES is a bond of the stored conformer (so a hydrogen listed on the
wrong heavy atom is caught, which the element check alone cannot do).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dcmtune.data.dataset import ESPData
from dcmtune.data.molgraph import bond_matrix, mol_from_smiles
from dcmtune.data.semiempirical import _first_conformer_charges

__all__ = ["espaloma_available", "espaloma_charges", "espaloma_charge_array"]

log = logging.getLogger(__name__)

# Smallest padded sizes: every molecule of up to 31 atoms and 64 directed bonds runs with the
# shapes of the first one (JAX caches each operation per shape; a new shape costs ~1 s).
_MIN_ATOMS, _MIN_EDGES = 32, 64


def espaloma_available() -> bool:
    """Whether `expaloma` (and RDKit, which it needs) can be imported."""
    return all(importlib.util.find_spec(m) is not None for m in ("expaloma", "rdkit"))


@functools.lru_cache(maxsize=1)
def _model() -> Any:
    """The bundled v0.0.8 EspalomaCharge model, loaded once per process."""
    from expaloma import bundled_eqx_path, load_eqx

    return load_eqx(bundled_eqx_path())


def _bucket(n: int, smallest: int) -> int:
    """The smallest power of two >= max(n, smallest)."""
    return max(smallest, 1 << max(n - 1, 0).bit_length())


def _padded_charges(mol: Any) -> np.ndarray:
    """(n,) charges of an RDKit molecule with explicit hydrogens, in its atom order.

    The graph is padded to power-of-two sizes so molecules share shapes: padding atoms have
    zero features and form a second graph (segment 1) whose padding edges join the last
    padding atom to itself, so nothing reaches the real atoms (segment 0) and the charge
    equilibration of segment 0 sees its own atoms only. Equal to `expaloma.charges_for_rdkit_mol`
    up to float32 rounding (tests/test_espaloma.py).
    """
    from expaloma.featurize import GraphFeatures, from_rdkit_mol, graph_to_jax
    from rdkit import rdBase

    with rdBase.BlockLogs():  # expaloma's features call deprecated RDKit getters (warnings)
        g = from_rdkit_mol(mol)
    n, e = len(g.h0), len(g.senders)
    n_pad, e_pad = _bucket(n + 1, _MIN_ATOMS), _bucket(e, _MIN_EDGES)
    # 1. Shape (n_pad, F) features and (n_pad, 1) formal charges; (e_pad,) edges.
    h0 = np.zeros((n_pad, g.h0.shape[1]), np.float32)
    h0[:n] = g.h0
    q_ref = np.zeros((n_pad, 1), np.float32)
    q_ref[:n] = g.q_ref
    senders = np.full(e_pad, n_pad - 1, np.int32)
    senders[:e] = g.senders
    receivers = np.full(e_pad, n_pad - 1, np.int32)
    receivers[:e] = g.receivers
    padded = GraphFeatures(h0, senders, receivers, q_ref, np.zeros(n_pad, np.int32))
    x, send, recv, qref = graph_to_jax(padded)
    # 2. Real atoms are graph 0, padding graph 1; the totals come from the formal charges.
    segment = (np.arange(n_pad) >= n).astype(np.int32)
    q = _model()(x, send, recv, segment, 2, 0.0, q_ref=qref, atom_mask=segment == 0)
    return np.asarray(q, np.float64)[:n, 0]


def espaloma_charges(
    smiles: str,
    numbers: Sequence[int] | np.ndarray,
    positions: np.ndarray,
    total_charge: float | None = None,
) -> np.ndarray:
    """(n,) EspalomaCharge charges, e, of `smiles` (graph only), in the data's atom order.

    Args:
      smiles: The molecule's graph; its atoms, RDKit's order with hydrogens last, are `numbers`.
      numbers: (n,) atomic numbers.
      positions: (n, 3) Angstrom; only checked (each SMILES bond is a bond there).
      total_charge: e, or None; when given, the SMILES's formal charges must sum to it.

    Returns:
      (n,) charges summing to the formal charge (to float32 rounding, ~1e-6 e).

    Raises:
      ValueError: bad SMILES, atoms not `numbers` in this order or not bonded as the SMILES
        says at `positions`, another total charge, or an element EspalomaCharge lacks (it
        knows H C N O F P S Cl Br I).
      RuntimeError: expaloma not installed.
    """
    from rdkit import Chem

    if importlib.util.find_spec("expaloma") is None:
        raise RuntimeError(f"{smiles!r}: expaloma not installed (pip install expaloma)")
    from expaloma.featurize import SUPPORTED_ELEMENTS

    mol = mol_from_smiles(smiles, numbers)
    formal = Chem.GetFormalCharge(mol)
    q_total = formal if total_charge is None else int(round(float(total_charge)))
    if formal != q_total:
        raise ValueError(f"{smiles!r}: formal charge {formal} e, but the data's is {q_total}")
    unknown = sorted({a.GetSymbol() for a in mol.GetAtoms()} - set(SUPPORTED_ELEMENTS))
    if unknown:
        raise ValueError(f"{smiles!r}: EspalomaCharge has no element {', '.join(unknown)}")
    r = np.asarray(positions, np.float64)
    z = np.asarray(numbers, np.int64)
    if r.shape != (len(z), 3):
        raise ValueError(f"{smiles!r}: positions: expected shape ({len(z)}, 3), got {r.shape}")
    bonded = bond_matrix(r[None], z[None])[0]
    for b in mol.GetBonds():
        i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        if not bonded[i, j]:
            d = float(np.linalg.norm(r[i] - r[j]))
            raise ValueError(
                f"{smiles!r}: atoms {i} and {j} are bonded in the SMILES but {d:.2f} A apart in "
                "the data (atoms not in the SMILES's order)"
            )
    return _padded_charges(mol)


def espaloma_charge_array(
    data: ESPData, smiles_of: Mapping[str, str]
) -> tuple[np.ndarray, np.ndarray]:
    """(M, A) EspalomaCharge charges, one set per mol_id with a SMILES in `smiles_of` (its
    atoms checked against its first conformer in `data`, `espaloma_charges`), and the (M,)
    mask of conformers covered; a molecule that fails is logged and left out."""
    smiles = {str(k): v for k, v in smiles_of.items()}

    def charges_of(mid: str, z: np.ndarray, r: np.ndarray, q: float) -> np.ndarray:
        return espaloma_charges(smiles[mid], z, r, q)

    return _first_conformer_charges(data, charges_of, smiles.keys(), "EspalomaCharge")
