"""The Coulomb design matrix of atom-centred point charges at grid points (numpy, float64):
what every least-squares charge fit (`dcmtune.data.baselines`, `dcmtune.data.resp`) solves with."""

from __future__ import annotations

import numpy as np

from dcmtune.units import BOHR

__all__ = ["esp_design_matrix"]


def esp_design_matrix(positions: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """(G, A) matrix T with T @ q the ESP (Hartree/e) of charges q (e) at `positions`.

    Args:
      positions: (A, 3) Angstrom. grid: (G, 3) Angstrom.
    """
    r = np.linalg.norm(grid[:, None, :] - positions[None, :, :], axis=-1)  # Shape (G, A).
    return BOHR / r
