"""Classical charge baselines to report beside a trained model (numpy, float64).

* `element_charges`: one charge per element, least-squares fitted to the ESP of a training set.
* `esp_rmse_of_atom_charges`: the ESP RMSE (kcal/mol/e) of any atom-centred charges, computed
  the way the model's metric is (per molecule MSE over valid grid points, averaged, sqrt).
"""

from __future__ import annotations

import numpy as np

from dcmtune.data import ESPData
from dcmtune.units import BOHR, HARTREE_TO_KCAL

__all__ = ["element_charges", "element_charge_array", "esp_rmse_of_atom_charges",
           "per_molecule_esp_mse"]


def _inverse_distances(data: ESPData, i: int) -> np.ndarray:
    """(n_grid, N) inverse distances in 1/Bohr of conformer i's valid grid to its real atoms."""
    n, g = int(data.N[i]), int(data.n_grid[i])
    r = np.linalg.norm(data.grid[i, :g, None, :].astype(np.float64)
                       - data.R[i, None, :n, :].astype(np.float64), axis=-1)
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


def element_charge_array(data: ESPData, table: dict[int, float]) -> np.ndarray:
    """(M, A) charges from a per-element table (0 for padding or unknown elements)."""
    lut = np.zeros(int(data.Z.max()) + 1)
    for z, q in table.items():
        if z < len(lut):
            lut[z] = q
    return lut[data.Z]
