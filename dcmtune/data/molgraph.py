"""Molecules from structure: bond graphs from covalent radii and a canonical key per graph.

Files without `mol_id` (most mmml-era files) still hold many conformers of each molecule; a
split that deals conformers of one molecule to train and test measures memory, not
generalisation. Here each conformer's bond graph is rebuilt from its geometry and given a key
that is the same for every conformer with the same graph (whatever the atom order) and differs
between constitutional isomers (ethanol CH3CH2OH and dimethyl ether CH3OCH3 share the formula
C2H6O, not the graph):

1. Bonds: atoms a, b are bonded when |R_a - R_b| < tolerance * (r_a + r_b), with r the covalent
   radii of Cordero et al., Dalton Trans. 2008, 2832 (tolerance 1.15 by default: C-H up to
   1.23 A, C-C up to 1.75 A, while 1-3 contacts such as H...H in CH2, 1.8 A, stay unbonded).
2. Key: the Hill formula plus a 64-bit Weisfeiler-Lehman hash of the element-labelled bond
   graph. Colours start from the element; each round hashes an atom's colour with the multiset
   of its neighbours' colours (a sum of mixed 64-bit values, so the order of atoms never
   matters); rounds continue, per conformer, until the colour partition stops refining; the key
   hashes the multiset of colours after every round.

What the key does not separate, and why that is acceptable for grouping: stereoisomers
(cis/trans, enantiomers) share a graph, and WL colour refinement cannot tell apart a few pairs of
regular graphs (e.g. decalin and bicyclopentyl). Such molecules fall into one group, which
never leaks a molecule across splits; it only makes the groups coarser. The opposite error is
possible for a conformer stretched past the bond threshold (or a dissociating one): it gets a
graph, and a group, of its own.

Pure numpy, vectorised over conformers in chunks (no RDKit in the data path).
"""

from __future__ import annotations

import logging

import numpy as np

__all__ = [
    "COVALENT_RADII",
    "DEFAULT_BOND_TOLERANCE",
    "bond_matrix",
    "hill_formula",
    "graph_hashes",
    "graph_keys",
    "mol_from_smiles",
]

log = logging.getLogger(__name__)

DEFAULT_BOND_TOLERANCE = 1.15

# Covalent radii in Angstrom, index = atomic number (Cordero et al. 2008; C sp3, low-spin
# values for Mn, Fe, Co), H to Xe. Heavier elements fall back to _FALLBACK_RADIUS.
COVALENT_RADII = (
    0.0,
    0.31,
    0.28,  # H He
    1.28,
    0.96,
    0.84,
    0.76,
    0.71,
    0.66,
    0.57,
    0.58,  # Li - Ne
    1.66,
    1.41,
    1.21,
    1.11,
    1.07,
    1.05,
    1.02,
    1.06,  # Na - Ar
    2.03,
    1.76,
    1.70,
    1.60,
    1.53,
    1.39,
    1.39,
    1.32,
    1.26,
    1.24,
    1.32,  # K - Cu
    1.22,
    1.22,
    1.20,
    1.19,
    1.20,
    1.20,
    1.16,  # Zn - Kr
    2.20,
    1.95,
    1.90,
    1.75,
    1.64,
    1.54,
    1.47,
    1.46,
    1.42,
    1.39,
    1.45,  # Rb - Ag
    1.44,
    1.42,
    1.39,
    1.39,
    1.38,
    1.39,
    1.40,  # Cd - Xe
)
_FALLBACK_RADIUS = 1.50

_SYMBOLS = (
    "X H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu "
    "Zn Ga Ge As Se Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba "
    "La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi "
    "Po At Rn Fr Ra Ac Th Pa U Np Pu Am Cm Bk Cf Es Fm Md No Lr Rf Db Sg Bh Hs Mt Ds "
    "Rg Cn Nh Fl Mc Lv Ts Og"
).split()

_CHUNK = 2048  # conformers per vectorised block: (chunk, A, A) uint64 stays ~15 MB at A = 30


def _radii(Z: np.ndarray) -> np.ndarray:
    """Covalent radii (Angstrom) for an int array of atomic numbers, same shape."""
    table = np.full(max(int(Z.max(initial=0)) + 1, len(COVALENT_RADII)), _FALLBACK_RADIUS)
    table[: len(COVALENT_RADII)] = COVALENT_RADII
    return table[Z]


def bond_matrix(
    R: np.ndarray, Z: np.ndarray, tolerance: float = DEFAULT_BOND_TOLERANCE
) -> np.ndarray:
    """Bonds from covalent radii: d_ab < tolerance * (r_a + r_b), between real atoms only.

    Args:
      R: (M, A, 3) positions, Angstrom.
      Z: (M, A) atomic numbers, 0 = padding.
      tolerance: Multiplier of the summed covalent radii.

    Returns:
      (M, A, A) bool, symmetric, False on the diagonal and for padding atoms.
    """
    real = Z > 0
    r = _radii(Z)
    d = np.linalg.norm(R[:, :, None, :] - R[:, None, :, :], axis=-1)
    bonded = d < tolerance * (r[:, :, None] + r[:, None, :])
    bonded &= real[:, :, None] & real[:, None, :]
    A = Z.shape[1]
    bonded[:, np.arange(A), np.arange(A)] = False
    return bonded


def hill_formula(z: np.ndarray) -> str:
    """Hill formula of one molecule's atomic numbers (padding zeros ignored): C, H, then the
    other symbols alphabetically; without carbon, all alphabetically. E.g. C2H6O, ClH, H2O."""
    els, counts = np.unique(np.asarray(z)[np.asarray(z) > 0], return_counts=True)
    sym = {
        (_SYMBOLS[e] if e < len(_SYMBOLS) else f"Z{e}"): int(c)
        for e, c in zip(els, counts, strict=True)
    }
    first = [s for s in ("C", "H") if s in sym] if "C" in sym else []
    order = first + sorted(s for s in sym if s not in first)
    return "".join(f"{s}{sym[s] if sym[s] > 1 else ''}" for s in order)


_U = np.uint64


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fixed, well-spread bijection of uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + _U(0x9E3779B97F4A7C15)
        x = (x ^ (x >> _U(30))) * _U(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> _U(27))) * _U(0x94D049BB133111EB)
        return x ^ (x >> _U(31))


def _multiset(labels: np.ndarray, weight: np.ndarray, salt: int) -> np.ndarray:
    """Order-independent hash of each row's labels where weight is 1: sum of mixed values.

    Args:
      labels: (..., A) uint64. weight: (..., A) or broadcastable, uint64 0/1.
    """
    with np.errstate(over="ignore"):
        return (_mix(labels ^ _U(salt)) * weight).sum(axis=-1, dtype=_U)


def _distinct(labels: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Number of distinct labels among each row's real atoms. labels, real: (M, A)."""
    filled = np.where(real, labels, labels[:, :1])  # padding copies atom 0: adds no colour
    s = np.sort(filled, axis=1)
    return 1 + (s[:, 1:] != s[:, :-1]).sum(axis=1)


def graph_hashes(adjacency: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """64-bit Weisfeiler-Lehman hashes of element-labelled graphs (isomorphism invariant).

    Args:
      adjacency: (M, A, A) bool bonds (no padding atom bonded).
      Z: (M, A) atomic numbers, 0 = padding.

    Returns:
      (M,) uint64; equal for isomorphic graphs, different (up to hash collisions, ~M^2 / 2^64)
      for graphs that colour refinement tells apart.
    """
    real = Z > 0
    w_atoms = real.astype(_U)
    adj = adjacency.astype(_U)
    labels = _mix(Z.astype(_U))
    digest = _mix(_multiset(labels, w_atoms, 0x51))
    count = _distinct(labels, real)
    done = np.zeros(len(Z), bool)
    for _ in range(Z.shape[1]):  # a partition of A atoms refines at most A - 1 times
        with np.errstate(over="ignore"):
            # Shape (M, A): each atom's neighbour multiset, then its new colour.
            neighbours = (adj * _mix(labels ^ _U(0xA7))[:, None, :]).sum(axis=-1, dtype=_U)
            labels = _mix(labels ^ _mix(neighbours + _U(0x3C)))
            new_digest = _mix(digest ^ _multiset(labels, w_atoms, 0x51))
        digest = np.where(done, digest, new_digest)
        new_count = _distinct(labels, real)
        done |= new_count == count
        count = new_count
        if done.all():
            break
    return digest


def graph_keys(
    R: np.ndarray, Z: np.ndarray, tolerance: float = DEFAULT_BOND_TOLERANCE
) -> np.ndarray:
    """One molecule key per conformer: "<Hill formula>-<16 hex digits of the graph hash>".

    Args:
      R: (M, A, 3) positions, Angstrom; Z: (M, A) atomic numbers, 0 = padding, real atoms
        first or not (the key does not depend on atom order).
      tolerance: Bond threshold multiplier (see `bond_matrix`).

    Returns:
      (M,) str keys; conformers with one bond graph share a key, e.g. "C2H6O-1f0c...".
    """
    Z = np.asarray(Z)
    M = len(Z)
    hashes = np.empty(M, _U)
    for i in range(0, M, _CHUNK):
        z, r = Z[i : i + _CHUNK], np.asarray(R[i : i + _CHUNK], np.float64)
        hashes[i : i + _CHUNK] = graph_hashes(bond_matrix(r, z, tolerance), z)
    # The formula is a function of the sorted atomic numbers: compute it once per distinct row.
    rows, inverse = np.unique(np.sort(Z, axis=1), axis=0, return_inverse=True)
    formulas = np.array([hill_formula(row) for row in rows])[np.ravel(inverse)]
    return np.array([f"{f}-{h:016x}" for f, h in zip(formulas, hashes.tolist(), strict=True)])


def mol_from_smiles(smiles: str, numbers):
    """The RDKit molecule of `smiles` with explicit hydrogens, its atoms (SMILES order, then
    hydrogens: how the generator stores them) checked to be `numbers` in this order.

    Raises:
      ValueError: a SMILES RDKit cannot read, or atoms that are not `numbers` in this order.
    """
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"{smiles!r}: RDKit cannot read this SMILES")
    mol = Chem.AddHs(mol)
    z = [atom.GetAtomicNum() for atom in mol.GetAtoms()]
    if z != [int(k) for k in numbers]:
        raise ValueError(f"{smiles!r}: atoms {z} are not the data's {list(map(int, numbers))}")
    return mol
