"""Units and electrostatics of point charges: ESP at grid points and dipoles.

All functions are pure and jit-able. Masks are applied *before* any division: a padded grid
point or charge can sit exactly on a real atom (a CH4 carbon at the origin, padding at the
origin), and 1/r there would give inf values and NaN gradients even if masked afterwards.
"""

from __future__ import annotations

import jax.numpy as jnp

from dcmtune.units import BOHR, EANG_TO_DEBYE, EBOHR_TO_DEBYE, HARTREE_TO_KCAL

__all__ = [
    "BOHR",
    "HARTREE_TO_KCAL",
    "EANG_TO_DEBYE",
    "EBOHR_TO_DEBYE",
    "esp_from_charges",
    "dipole_from_charges",
]


def esp_from_charges(charges, positions, charge_mask, grid, grid_mask):
    """Electrostatic potential of point charges at grid points, in Hartree/e.

    V(g) = sum_j q_j / (|g - p_j| / a0)   (atomic units).

    Args:
      charges: Shape (B, K), e.
      positions: Shape (B, K, 3), Angstrom.
      charge_mask: Shape (B, K), True for real charges.
      grid: Shape (B, G, 3), Angstrom.
      grid_mask: Shape (B, G), True for valid grid points.

    Returns:
      Shape (B, G); zero at invalid grid points.
    """
    # 1. Pair vectors and the pairs that count.
    diff = grid[:, :, None, :] - positions[:, None, :, :]  # Shape (B, G, K, 3).
    valid = grid_mask[:, :, None] & charge_mask[:, None, :]  # Shape (B, G, K).
    # 2. Distances in Bohr; masked pairs get a harmless 1 before the square root and division.
    r2 = jnp.sum(diff * diff, axis=-1)  # Shape (B, G, K).
    r_bohr = jnp.sqrt(jnp.where(valid, r2, 1.0)) / BOHR  # Shape (B, G, K).
    # 3. Coulomb sum over the real charges.
    q = jnp.where(charge_mask, charges, 0.0)[:, None, :]  # Shape (B, 1, K).
    return jnp.sum(jnp.where(valid, q / r_bohr, 0.0), axis=-1)  # Shape (B, G).


def dipole_from_charges(charges, positions, charge_mask, origin):
    """Dipole moment of point charges about `origin`, in Debye.

    mu = sum_j q_j (p_j - origin), e*Angstrom -> Debye.

    Args:
      charges: Shape (B, K), e.
      positions: Shape (B, K, 3), Angstrom.
      charge_mask: Shape (B, K).
      origin: Shape (B, 3), Angstrom.

    Returns:
      Shape (B, 3), Debye.
    """
    q = jnp.where(charge_mask, charges, 0.0)  # Shape (B, K).
    rel = positions - origin[:, None, :]  # Shape (B, K, 3).
    return jnp.einsum("bk,bkx->bx", q, rel) * EANG_TO_DEBYE  # Shape (B, 3).
