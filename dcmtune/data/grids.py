"""Grid points around a molecule where the ESP is sampled: Merz-Kollman-style vdW shells.

One function serves the PySCF generator, the synthetic test set and prediction, so a model is
always evaluated on the kind of grid it was trained on. Plain numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["VDW_RADII", "SHELLS", "fibonacci_sphere", "shell_grid", "shell_grid_with_shells"]

# Van der Waals radii in Angstrom (Bondi 1964; H 1.2 as in Merz-Kollman ESP fits).
VDW_RADII = {
    1: 1.2,
    5: 1.92,
    6: 1.7,
    7: 1.55,
    8: 1.52,
    9: 1.47,
    14: 2.1,
    15: 1.8,
    16: 1.8,
    17: 1.75,
    35: 1.85,
    53: 1.98,
}
# Shell radii as multiples of each atom's vdW radius (Singh & Kollman 1984).
SHELLS = (1.4, 1.6, 1.8, 2.0)


def fibonacci_sphere(n: int) -> np.ndarray:
    """(n, 3) nearly uniform unit vectors (golden-spiral lattice)."""
    k = np.arange(n) + 0.5
    polar = np.arccos(1.0 - 2.0 * k / n)
    azimuth = np.pi * (1.0 + 5.0**0.5) * k
    return np.stack(
        [np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=-1
    )


def shell_grid(
    positions: np.ndarray,
    numbers: np.ndarray,
    rng: np.random.Generator,
    shells: Sequence[float] = SHELLS,
    density: float = 1.0,
    max_grid: int = 1200,
) -> np.ndarray:
    """Grid points on vdW shells around one geometry: `shell_grid_with_shells` without the
    shell of each point. Returns (g, 3) Angstrom, g <= max_grid."""
    return shell_grid_with_shells(positions, numbers, rng, shells, density, max_grid)[0]


def shell_grid_with_shells(
    positions: np.ndarray,
    numbers: np.ndarray,
    rng: np.random.Generator,
    shells: Sequence[float] = SHELLS,
    density: float = 1.0,
    max_grid: int = 1200,
) -> tuple[np.ndarray, np.ndarray]:
    """Grid points on vdW shells around one geometry, and the shell each point was drawn on.

    Args:
      positions: (A, 3) Angstrom, real atoms only.
      numbers: (A,) atomic numbers (keys of `VDW_RADII`).
      rng: Draws the subsample when more than `max_grid` points survive.
      shells: Sphere radii as multiples of each atom's vdW radius.
      density: Points per Angstrom^2 on each sphere.
      max_grid: Most points returned.

    Returns:
      points: (g, 3) Angstrom, g <= max_grid; no point lies inside any atom's min(shells) x vdW
        sphere.
      shell: (g,) the factor of the sphere each point was placed on (one of `shells`).

    Raises:
      ValueError: an element without a vdW radius.
    """
    missing = sorted({int(z) for z in numbers} - set(VDW_RADII))
    if missing:
        raise ValueError(f"no van der Waals radius for Z = {missing} (known: {sorted(VDW_RADII)})")
    positions = np.asarray(positions, np.float64)
    radii = np.array([VDW_RADII[int(z)] for z in numbers])
    # 1. Points on every atom's spheres, with their sphere's factor. Shapes (P, 3), (P,).
    pts, factors = [], []
    for f in shells:
        for a in range(len(radii)):
            r = f * radii[a]
            n = max(1, int(round(density * 4.0 * np.pi * r * r)))
            pts.append(positions[a] + r * fibonacci_sphere(n))
            factors.append(np.full(n, float(f)))
    points, shell = np.concatenate(pts), np.concatenate(factors)
    # 2. Drop points inside any atom's innermost shell. Shape (P, A) distances.
    d = np.linalg.norm(points[:, None, :] - positions[None, :, :], axis=-1)
    keep = np.all(d >= min(shells) * radii[None, :] * (1.0 - 1e-9), axis=1)
    points, shell = points[keep], shell[keep]
    # 3. Subsample, keeping the points' order.
    if len(points) > max_grid:
        pick = np.sort(rng.choice(len(points), max_grid, replace=False))
        points, shell = points[pick], shell[pick]
    return points, shell
