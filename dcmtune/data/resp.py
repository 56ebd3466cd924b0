"""Two-stage RESP charges fitted to stored ESP grids (numpy, float64; RDKit for the graph).

RESP (Bayly, Cieplak, Cornell, Kollman, J. Phys. Chem. 97, 10269 (1993)) is the restrained
ESP fit chemists know: least-squares atom-centred charges with a hyperbolic restraint
a * sum_j (sqrt(q_j^2 + b^2) - b), b = 0.1 e, on the heavy atoms only, pulling poorly
determined (buried) charges toward zero, in two stages:

1. a = 0.0005, every atom free, no equivalences.
2. a = 0.001; only the carbons of methyl and methylene groups (sp3 carbons, four neighbours,
   at least two of them hydrogens: CH4, CH3, CH2) and their hydrogens are refitted, those
   hydrogens constrained equal within each group and symmetry-equivalent refitted atoms
   (RDKit canonical ranking with ties kept) equal; every other atom keeps its stage-1 charge.

Here one charge set is fitted per molecule to all its conformers' grid points at once (the
multi-conformation fit; one restraint per charge), with the total charge constrained to the
molecule's Q. Units are RESP's atomic units: the design matrix `esp_design_matrix` is already
1/r in 1/Bohr (positions and grids in Angstrom converted) and the ESP is Hartree/e, so a and b
mean what they mean in the resp program.

The restraint is handled as in the resp program: it is linearised, its derivative
a * q_j / sqrt(q_j^2 + b^2) added to the normal equations T^T T q = T^T v as the diagonal term
a / sqrt(q_j^2 + b^2), re-solved with the current charges until no charge moves by more than
`tol` (the fixed point minimises 1/2 |T q - v|^2 + a * sum_j (sqrt(q_j^2 + b^2) - b)). Each solve
is a least-squares problem on T stacked with sqrt(diagonal) rows, the total charge eliminated
exactly (as `fit_esp_charges_shared` does), so the normal equations are never formed.

Stage 2 needs the bond graph: it comes from a SMILES (the data's provenance) whose atoms, RDKit's
order with hydrogens added last, must be the data's. Without a SMILES `resp_charges` runs stage 1
only; `resp_charges_per_molecule` (the baseline) fits only molecules with a matching SMILES.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from dcmtune.data.coulomb import esp_design_matrix
from dcmtune.data.dataset import ESPData
from dcmtune.data.molgraph import mol_from_smiles

__all__ = [
    "RESP_A1",
    "RESP_A2",
    "RESP_B",
    "restrained_esp_fit",
    "stage2_equivalences",
    "resp_charges",
    "resp_charges_per_molecule",
]

log = logging.getLogger(__name__)

RESP_A1 = 0.0005  # Stage-1 restraint strength, atomic units (Bayly et al. 1993).
RESP_A2 = 0.001  # Stage-2 restraint strength.
RESP_B = 0.1  # Hyperbola width, e.


def _eliminated_lstsq(M: np.ndarray, rhs: np.ndarray, n: np.ndarray, total: float) -> np.ndarray:
    """argmin_x |M x - rhs|^2 subject to n . x = total, by eliminating the last variable
    x_K = (total - n_<K . x_<K) / n_K (the Lagrange solution without squaring the condition
    number; with n = 1 this is `fit_esp_charges_shared`'s elimination)."""
    K = M.shape[1]
    if K == 1:
        return np.array([total / n[0]])
    last = M[:, -1] / n[-1]
    x, *_ = np.linalg.lstsq(M[:, :-1] - np.outer(last, n[:-1]), rhs - total * last, rcond=None)
    return np.append(x, (total - n[:-1] @ x) / n[-1])


def restrained_esp_fit(
    T: np.ndarray,
    v: np.ndarray,
    Q: float,
    a: float,
    restrained: np.ndarray,
    *,
    b: float = RESP_B,
    labels: np.ndarray | None = None,
    fixed: np.ndarray | None = None,
    tol: float = 1e-6,
    max_iter: int = 100,
) -> np.ndarray:
    """One RESP stage: ESP-fitted charges with a hyperbolic restraint, sum(q) = Q exactly.

    Args:
      T: (G, A) design matrix, 1/Bohr (`esp_design_matrix`; rows of all conformers stacked).
      v: (G,) ESP, Hartree/e.
      Q: Total charge, e.
      a: Restraint strength, atomic units (0: plain constrained least squares).
      restrained: (A,) bool, the atoms restrained (RESP: the heavy atoms).
      b: Hyperbola width, e.
      labels: (A,) int; free atoms with equal labels share one charge (None: all distinct).
      fixed: (A,) charges kept as given, NaN for the atoms fitted (None: all fitted).
      tol: Convergence, the largest change of a charge between iterations, e.
      max_iter: Most iterations (a warning is logged if `tol` is not reached).

    Returns:
      (A,) charges, e.
    """
    A = T.shape[1]
    fixed = np.full(A, np.nan) if fixed is None else np.asarray(fixed, np.float64)
    free = np.isnan(fixed)
    q0 = np.where(free, 0.0, fixed)  # Shape (A,).
    if not free.any():
        return q0
    # 1. Map the free atoms to variables: P (A, K) with P[j, k] = 1 when atom j has charge x_k.
    lab = np.arange(A) if labels is None else np.asarray(labels)
    _, var = np.unique(lab[free], return_inverse=True)
    P = np.zeros((A, int(var.max()) + 1))
    P[np.flatnonzero(free), var] = 1.0
    n = P.sum(axis=0)  # Shape (K,): atoms per variable.
    # 2. The ESP left to fit after the fixed charges; design in the variables. Shape (G, K).
    TP, rhs = T @ P, np.asarray(v, np.float64) - T @ q0
    total = float(Q) - float(q0.sum())
    r = P[np.asarray(restrained, bool) & free].sum(axis=0)  # Shape (K,): restrained atoms.
    # 3. Unrestrained start, then re-solve with the linearised restraint until converged.
    x = _eliminated_lstsq(TP, rhs, n, total)
    if a > 0 and r.any():
        rhs_aug = np.concatenate([rhs, np.zeros(len(n))])
        for _ in range(max_iter):
            d = a * r / np.sqrt(x * x + b * b)  # Shape (K,): diagonal added per variable.
            x_new = _eliminated_lstsq(np.vstack([TP, np.diag(np.sqrt(d))]), rhs_aug, n, total)
            done = np.max(np.abs(x_new - x)) < tol
            x = x_new
            if done:
                break
        else:
            log.warning("RESP: not converged to %g e in %d iterations", tol, max_iter)
    return q0 + P @ x


def stage2_equivalences(smiles: str, numbers: Sequence[int] | np.ndarray) -> np.ndarray:
    """(A,) labels for RESP stage 2: -1 for atoms that keep their stage-1 charge; else equal
    labels share a charge (the hydrogens of each CH4/CH3/CH2 sp3 carbon, and refitted atoms
    of equal RDKit canonical rank with ties kept).

    Raises:
      ValueError: a SMILES RDKit cannot read, or atoms (RDKit order, hydrogens last) that are
        not `numbers` in this order.
    """
    from rdkit import Chem

    mol = mol_from_smiles(smiles, numbers)
    n = mol.GetNumAtoms()
    rank = list(Chem.CanonicalRankAtoms(mol, breakTies=False))
    # 1. The refitted groups: an sp3 carbon with >= 2 hydrogens, and those hydrogens.
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    refit: list[int] = []
    for atom in mol.GetAtoms():
        hs = [nb.GetIdx() for nb in atom.GetNeighbors() if nb.GetAtomicNum() == 1]
        if atom.GetAtomicNum() == 6 and atom.GetDegree() == 4 and len(hs) >= 2:
            refit += [atom.GetIdx(), *hs]
            for h in hs[1:]:
                parent[find(h)] = find(hs[0])
    # 2. Symmetry: refitted atoms of equal canonical rank share a charge.
    first_of_rank: dict[int, int] = {}
    for i in refit:
        j = first_of_rank.setdefault(rank[i], i)
        parent[find(i)] = find(j)
    labels = np.full(n, -1)
    for i in refit:
        labels[i] = find(i)
    return labels


def resp_charges(
    positions: Sequence[np.ndarray],
    grids: Sequence[np.ndarray],
    esps: Sequence[np.ndarray],
    numbers: Sequence[int] | np.ndarray,
    Q: float = 0.0,
    smiles: str | None = None,
    *,
    a1: float = RESP_A1,
    a2: float = RESP_A2,
    b: float = RESP_B,
    tol: float = 1e-6,
) -> np.ndarray:
    """Two-stage RESP charges, ONE set for all conformers of a molecule (same atoms, order).

    Args:
      positions: per conformer (A, 3), Angstrom.
      grids: per conformer (G_c, 3), Angstrom.
      esps: per conformer (G_c,), Hartree/e.
      numbers: (A,) atomic numbers (hydrogens, Z = 1, are never restrained).
      Q: total charge, e.
      smiles: the molecule's graph for stage 2 (atoms in `numbers`' order); None: stage 1 only.
      a1, a2: stage-1 and stage-2 restraint strengths, atomic units. b: hyperbola width, e.
      tol: convergence of each stage, e.

    Returns:
      (A,) charges, e, summing to Q.

    Raises:
      ValueError: `smiles` unreadable or not the atoms of `numbers` (`stage2_equivalences`).
    """
    labels = stage2_equivalences(smiles, numbers) if smiles is not None else None
    T = np.concatenate([esp_design_matrix(R, g) for R, g in zip(positions, grids, strict=True)])
    v = np.concatenate([np.asarray(e, np.float64) for e in esps])  # Shape (G,) pooled.
    heavy = np.asarray(numbers) > 1
    q = restrained_esp_fit(T, v, Q, a1, heavy, b=b, tol=tol)
    if labels is None or not (labels >= 0).any():
        return q
    fixed = np.where(labels >= 0, np.nan, q)
    return restrained_esp_fit(T, v, Q, a2, heavy, b=b, labels=labels, fixed=fixed, tol=tol)


def resp_charges_per_molecule(
    data: ESPData, smiles_of: Mapping[str, str]
) -> tuple[np.ndarray, np.ndarray]:
    """(M, A) two-stage RESP charges, one set per mol_id fitted across all its conformers in
    `data`, and the (M,) mask of conformers fitted: molecules with a SMILES in `smiles_of`
    whose atoms are the data's (a mismatch is logged and skipped) and whose conformers agree
    in atoms."""
    out, ok = np.zeros(data.Z.shape), np.zeros(data.num_conformers, bool)
    for mid in np.unique(data.mol_id):
        members = np.flatnonzero(data.mol_id == mid)
        n = int(data.N[members[0]])
        smiles = smiles_of.get(str(mid))
        if smiles is None or any(
            int(data.N[i]) != n or not np.array_equal(data.Z[i], data.Z[members[0]])
            for i in members
        ):
            continue
        try:
            q = resp_charges(
                [data.R[i, :n].astype(np.float64) for i in members],
                [data.grid[i, : data.n_grid[i]].astype(np.float64) for i in members],
                [data.esp[i, : data.n_grid[i]].astype(np.float64) for i in members],
                data.Z[members[0], :n],
                float(data.Q[members[0]]),
                smiles,
            )
        except ValueError as e:
            log.warning("RESP: molecule %s skipped: %s", mid, e)
            continue
        out[members, :n], ok[members] = q, True
    return out, ok
