"""Synthetic molecules for tests: exact ESP of environment-dependent atom-centred charges.

Random tree-shaped molecules of H, C, N, O whose reference charges are a smooth, deterministic
function of each atom's neighbourhood, so a model can learn them and generalise to unseen
synthetic molecules in seconds. Plain numpy.
"""

from __future__ import annotations

import numpy as np

from dcmtune.data.dataset import ESPData
from dcmtune.data.grids import shell_grid
from dcmtune.data.load import validate_arrays
from dcmtune.units import BOHR, EANG_TO_DEBYE

__all__ = ["make_synthetic", "synthetic_charges"]

# Electronegativity-like numbers for the synthetic charge model (not physical constants).
_SYN_CHI = {1: 2.2, 6: 2.55, 7: 3.04, 8: 3.44}
_SYN_ELEMENTS = np.array([1, 6, 7, 8])
_SYN_PROBS = np.array([0.45, 0.35, 0.1, 0.1])


def synthetic_charges(
    R: np.ndarray, Z: np.ndarray, scale: float = 0.25, width: float = 3.0
) -> np.ndarray:
    """Reference charges of the synthetic set: a deterministic function of each atom's local
    environment, q_a = scale * sum_b s(r_ab) (chi_b - chi_a), with s a smooth cutoff of
    `width` Angstrom. Antisymmetric in (a, b), so every molecule is exactly neutral.

    Args:
      R: (A, 3) real atoms only. Z: (A,).
    """
    chi = np.array([_SYN_CHI[int(z)] for z in Z])
    r = np.linalg.norm(R[:, None] - R[None, :], axis=-1)
    s = np.where(r < width, np.cos(0.5 * np.pi * np.minimum(r / width, 1.0)) ** 2, 0.0)
    np.fill_diagonal(s, 0.0)
    return scale * (s * (chi[None, :] - chi[:, None])).sum(axis=1)


def _random_molecule(num_atoms: int, rng: np.random.Generator):
    """A random tree-shaped molecule: each atom bonded to an earlier one at 1.0-1.5 A."""
    while True:
        Z = rng.choice(_SYN_ELEMENTS, size=num_atoms, p=_SYN_PROBS)
        Z[0] = rng.choice([6, 7, 8])
        R = np.zeros((num_atoms, 3))
        ok = True
        for a in range(1, num_atoms):
            for _ in range(50):
                parent = rng.integers(0, a)
                v = rng.normal(size=3)
                cand = R[parent] + rng.uniform(1.0, 1.5) * v / np.linalg.norm(v)
                if np.min(np.linalg.norm(R[:a] - cand, axis=1)) > 0.95:
                    R[a] = cand
                    break
            else:
                ok = False
                break
        if ok:
            return R - R.mean(axis=0), Z


def make_synthetic(
    num_molecules: int = 8,
    conformers: int = 4,
    min_atoms: int = 3,
    max_atoms: int = 8,
    num_grid: int = 96,
    grid_per_atom: int = 10,
    noise: float = 0.05,
    seed: int = 0,
) -> ESPData:
    """A synthetic ESP dataset with exact ESP of environment-dependent atom-centred charges.

    Molecules are random trees of H, C, N, O; conformers are Gaussian displacements (`noise`
    Angstrom) of each; charges follow `synthetic_charges`, so a model can learn them and
    generalise to unseen synthetic molecules. Each conformer has min(num_grid,
    grid_per_atom * atoms) grid points. Also sets `mono` and `Dxyz` (about the centroid).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for m in range(num_molecules):
        R0, Z0 = _random_molecule(int(rng.integers(min_atoms, max_atoms + 1)), rng)
        for c in range(conformers):
            R = R0 + (rng.normal(scale=noise, size=R0.shape) if c else 0.0)
            q = synthetic_charges(R, Z0)
            g = shell_grid(R, Z0, rng, max_grid=min(num_grid, grid_per_atom * len(Z0)))
            r = np.linalg.norm(g[:, None] - R[None], axis=-1) / BOHR
            esp = (q[None, :] / r).sum(axis=1)
            com = R.mean(axis=0)
            dip = (q[:, None] * (R - com)).sum(axis=0) * EANG_TO_DEBYE
            rows.append((R, Z0, q, g, esp, com, dip, f"syn{m:03d}"))
    A, G, M = max_atoms, num_grid, len(rows)
    out: dict[str, np.ndarray] = {
        "R": np.zeros((M, A, 3)),
        "Z": np.zeros((M, A), np.int32),
        "N": np.zeros(M, np.int32),
        "mono": np.zeros((M, A)),
        "vdw_surface": np.zeros((M, G, 3)),
        "esp": np.zeros((M, G)),
        "n_grid": np.zeros(M, np.int32),
        "com": np.zeros((M, 3)),
        "Dxyz": np.zeros((M, 3)),
        "Q": np.zeros(M),
        "mol_id": np.array([r[-1] for r in rows]),
    }
    for i, (R, Z, q, g, esp, com, dip, _) in enumerate(rows):
        n, k = len(Z), len(g)
        out["R"][i, :n], out["Z"][i, :n], out["N"][i], out["mono"][i, :n] = R, Z, n, q
        out["vdw_surface"][i, :k], out["esp"][i, :k], out["n_grid"][i] = g, esp, k
        out["com"][i], out["Dxyz"][i] = com, dip
    return validate_arrays(out, source="<synthetic>")
