"""Loss terms and metrics, pure and jit-able.

Every term is computed per molecule and then averaged over molecules, so micro-batches of any
size average exactly to the full batch. Names are the same everywhere (table, Tune, ranking):
`loss`, `esp_rmse`, `esp_mae` (kcal/mol/e), `mono_mae`, `mono_rmse`, `mono_mean`, `mono_std` (e),
`dipole_mae` (Debye).

Metrics are accumulated as sums (`metric_sums`) over any number of batches and turned into
values once (`finalize_metrics`), so an epoch's metrics do not depend on how it was batched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

import jax.numpy as jnp
import numpy as np

from dcmtune.metrics import TRAINED
from dcmtune.model.physics import HARTREE_TO_KCAL, dipole_from_charges, esp_from_charges

__all__ = [
    "LossWeights",
    "predict_observables",
    "per_molecule_terms",
    "term_counts",
    "loss_and_sums",
    "terms_loss_and_sums",
    "finalize_metrics",
    "zero_sums",
    "SUM_KEYS",
    "METRIC_NAMES",
]

# The metrics `finalize_metrics` returns: the registry's trained metrics (dcmtune.metrics).
METRIC_NAMES = TRAINED
# The sums one batch contributes; `finalize_metrics` turns their totals into METRIC_NAMES.
SUM_KEYS = (
    "n_mol",
    "n_mono",
    "n_dip",
    "esp_mse",
    "esp_mae",
    "mono_mse",
    "mono_mae",
    "dip_mse",
    "dip_mae",
    "n_atoms",
    "q_sum",
    "q2_sum",
)


class LossWeights(Protocol):
    """What the loss reads of the traced hyper-parameters: the three weights (scalars).
    The trainer's `dcmtune.train.hparams.Hparams` is one."""

    @property
    def esp_w(self) -> Any: ...

    @property
    def chg_w(self) -> Any: ...

    @property
    def dip_w(self) -> Any: ...


def predict_observables(charges, positions, batch):
    """ESP at the grid, atomic monopoles and dipole from the model's charges.

    Args:
      charges: Shape (B, A, n_dcm), e.
      positions: Shape (B, A, n_dcm, 3), Angstrom.
      batch: A batch dict (see `dcmtune.data.batches.make_batch`).

    Returns:
      esp (B, G) Hartree/e, mono (B, A) e, dipole (B, 3) Debye.
    """
    B, A, n = charges.shape
    charge_mask = jnp.repeat(batch["atom_mask"], n, axis=1)  # Shape (B, A*n).
    q = charges.reshape(B, A * n)
    p = positions.reshape(B, A * n, 3)
    esp = esp_from_charges(q, p, charge_mask, batch["grid"], batch["grid_mask"])
    mono = jnp.sum(charges, axis=-1)  # Shape (B, A).
    dipole = dipole_from_charges(q, p, charge_mask, batch["com"])
    return esp, mono, dipole


def _masked_mean(x, mask, axis):
    """Mean of x over `axis` where mask; 0 where the mask is empty (count clamped first)."""
    n = jnp.sum(mask, axis=axis)
    return jnp.sum(jnp.where(mask, x, 0.0), axis=axis) / jnp.maximum(n, 1)


def per_molecule_terms(esp, mono, dipole, batch):
    """Per-molecule errors, masked; each of shape (B,).

    esp_mse (Hartree/e)^2 and esp_mae (Hartree/e) over the valid grid points; mono_mse (e^2)
    and mono_mae (e) over the real atoms; dip_mse (Debye^2) and dip_mae (Debye) over the three
    components.
    """
    gmask, amask = batch["grid_mask"], batch["atom_mask"]
    de = esp - batch["esp"]  # Shape (B, G).
    dq = mono - batch["mono"]  # Shape (B, A).
    dd = dipole - batch["dipole"]  # Shape (B, 3).
    return {
        "esp_mse": _masked_mean(de * de, gmask, 1),
        "esp_mae": _masked_mean(jnp.abs(de), gmask, 1),
        "mono_mse": _masked_mean(dq * dq, amask, 1),
        "mono_mae": _masked_mean(jnp.abs(dq), amask, 1),
        "dip_mse": jnp.mean(dd * dd, axis=1),
        "dip_mae": jnp.mean(jnp.abs(dd), axis=1),
    }


def term_counts(batch):
    """Molecules counted by each loss term: (n_mol, n_mono, n_dip). Works on a batch or a
    stack of micro-batches (all leading axes are summed)."""
    mol = batch["mol_mask"]
    return (jnp.sum(mol), jnp.sum(batch["has_mono"] & mol), jnp.sum(batch["has_dipole"] & mol))


def zero_sums(dtype=jnp.float32) -> dict:
    """Sums of no molecule: the start of an accumulation."""
    return {k: jnp.zeros((), dtype) for k in SUM_KEYS}


def loss_and_sums(charges, positions, batch, weights: LossWeights, counts=None):
    """The batch loss (mean over molecules of each term, weighted) and metric sums.

    Args:
      charges: Shape (B, A, n_dcm), e. positions: Shape (B, A, n_dcm, 3), Angstrom.
      counts: Optional (n_mol, n_mono, n_dip) to divide the term sums by instead of this
        batch's own counts. Gradient accumulation passes the counts of all its micro-batches,
        so the summed micro-batch losses equal the loss of one batch holding them all.

    Returns:
      loss: scalar, esp_w * esp + chg_w * mono + dip_w * dipole, each the mean over the
        molecules that have that reference (padding molecules excluded).
      sums: dict of scalars (SUM_KEYS) to add over batches and pass to `finalize_metrics`.
    """
    esp, mono, dipole = predict_observables(charges, positions, batch)
    terms = per_molecule_terms(esp, mono, dipole, batch)
    return terms_loss_and_sums(terms, mono, batch, weights, counts)


def terms_loss_and_sums(terms, mono, batch, weights: LossWeights, counts=None):
    """`loss_and_sums` from per-molecule `terms` (see `per_molecule_terms`) and the predicted
    monopoles `mono` (B, A)."""
    t = terms
    mol = batch["mol_mask"]
    has_mono = batch["has_mono"] & mol
    has_dip = batch["has_dipole"] & mol

    def total(x, m):
        return jnp.sum(jnp.where(m, x, 0.0))

    n_mol, n_mono, n_dip = term_counts(batch)
    c_mol, c_mono, c_dip = (n_mol, n_mono, n_dip) if counts is None else counts
    loss = (
        weights.esp_w * total(t["esp_mse"], mol) / jnp.maximum(c_mol, 1)
        + weights.chg_w * total(t["mono_mse"], has_mono) / jnp.maximum(c_mono, 1)
        + weights.dip_w * total(t["dip_mse"], has_dip) / jnp.maximum(c_dip, 1)
    )
    amask = batch["atom_mask"] & mol[:, None]
    dtype = t["esp_mse"].dtype
    sums = {
        "n_mol": n_mol.astype(dtype),
        "n_mono": n_mono.astype(dtype),
        "n_dip": n_dip.astype(dtype),
        "esp_mse": total(t["esp_mse"], mol),
        "esp_mae": total(t["esp_mae"], mol),
        "mono_mse": total(t["mono_mse"], has_mono),
        "mono_mae": total(t["mono_mae"], has_mono),
        "dip_mse": total(t["dip_mse"], has_dip),
        "dip_mae": total(t["dip_mae"], has_dip),
        "n_atoms": jnp.sum(amask).astype(dtype),
        "q_sum": jnp.sum(jnp.where(amask, mono, 0.0)),
        "q2_sum": jnp.sum(jnp.where(amask, mono * mono, 0.0)),
    }
    return loss, sums


def finalize_metrics(sums: Mapping[str, float], weights: LossWeights) -> dict[str, float]:
    """Metric values from summed `sums` (host side, float64).

    `loss` is recomputed from the term means, so it equals the loss of one batch holding all
    the molecules. `mono_mean`/`mono_std` describe the predicted atomic monopoles of real atoms.
    Terms whose reference is absent are NaN (dipole_mae without Dxyz, mono_* without mono) and
    left out of `loss`; a weighted term that is present but not finite makes `loss` NaN.
    """
    s = {k: float(np.asarray(v)) for k, v in sums.items()}

    def mean(key, count):
        return s[key] / s[count] if s[count] > 0 else float("nan")

    esp_mse, mono_mse, dip_mse = (
        mean("esp_mse", "n_mol"),
        mean("mono_mse", "n_mono"),
        mean("dip_mse", "n_dip"),
    )
    w = [float(np.asarray(x)) for x in (weights.esp_w, weights.chg_w, weights.dip_w)]
    # A term counts where it has a reference (count > 0) and a weight; a present term that is
    # not finite makes the loss non-finite (the run diverged), never silently smaller.
    loss = w[0] * esp_mse + sum(
        wi * t
        for wi, t, n in ((w[1], mono_mse, s["n_mono"]), (w[2], dip_mse, s["n_dip"]))
        if wi != 0 and n > 0
    )
    if not all(
        math.isfinite(t)
        for t, wi, n in (
            (esp_mse, w[0], s["n_mol"]),
            (mono_mse, w[1], s["n_mono"]),
            (dip_mse, w[2], s["n_dip"]),
        )
        if wi != 0 and n > 0
    ):
        loss = float("nan")
    q_mean = mean("q_sum", "n_atoms")
    q_var = mean("q2_sum", "n_atoms") - q_mean**2
    return {
        "loss": loss,
        "esp_rmse": float(np.sqrt(esp_mse)) * HARTREE_TO_KCAL,
        "esp_mae": mean("esp_mae", "n_mol") * HARTREE_TO_KCAL,
        "mono_mae": mean("mono_mae", "n_mono"),
        "mono_rmse": float(np.sqrt(mono_mse)),
        "mono_mean": q_mean,
        "mono_std": float(np.sqrt(max(q_var, 0.0))),
        "dipole_mae": mean("dip_mae", "n_dip"),
    }
