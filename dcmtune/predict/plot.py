"""A picture of one prediction: the atoms and their charge sites coloured by charge, and the
charges' ESP (and its error against a reference) on the innermost vdW surface of the grid.
Matplotlib's Agg canvas: no display, no global backend change."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from dcmtune import _io
from dcmtune.data.grids import VDW_RADII
from dcmtune.predict.predictor import MoleculePrediction
from dcmtune.units import HARTREE_TO_KCAL

__all__ = ["plot_prediction"]


def plot_prediction(pred: MoleculePrediction, path: str | Path, title: str | None = None) -> Path:
    """A PNG of one molecule: the atoms and their charge sites coloured by charge (e); with ESP,
    the charges' ESP (kcal/mol/e) on the innermost vdW surface of its grid; with a reference
    ESP (a data file), also the error (model - reference). Uses matplotlib's Agg canvas (no
    display, no global backend change)."""
    from ase.data.colors import jmol_colors
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keep, surfaces = _surfaces(pred)
    panels = 1 + len(surfaces)
    fig = Figure(figsize=(5.5 * panels, 5), dpi=110)
    FigureCanvasAgg(fig)
    R, colors = pred.positions, jmol_colors[pred.numbers]
    sites, q = pred.charge_positions.reshape(-1, 3), pred.charges.reshape(-1)

    # 1. The charges around the atoms.
    ax = fig.add_subplot(1, panels, 1, projection="3d")
    ax.scatter(*R.T, s=300, c=colors, edgecolors="k", alpha=0.35, depthshade=False)
    for a, s in zip(np.repeat(np.arange(len(R)), pred.charges.shape[1]), sites, strict=True):
        ax.plot(*np.stack([R[a], s]).T, color="0.5", lw=0.8)
    lim = max(float(np.abs(q).max()), 1e-3)
    sc = ax.scatter(
        *sites.T, s=40, c=q, cmap="bwr", vmin=-lim, vmax=lim, edgecolors="k", depthshade=False
    )
    fig.colorbar(sc, ax=ax, shrink=0.7, pad=0.12, label="charge (e)")
    ax.set_title(
        f"{pred.formula}: {pred.charges.size} charges, |mu| = {pred.dipole_magnitude:.2f} D"
    )
    _equal_axes(ax, np.concatenate([R, sites]))

    # 2. Values on the surface.
    for k, (v, label, text) in enumerate(surfaces, start=2):
        pts = pred.esp_points[keep]
        axk = fig.add_subplot(1, panels, k, projection="3d")
        axk.scatter(*R.T, s=120, c=colors, edgecolors="k", depthshade=False)
        vlim = max(float(np.abs(v).max()), 1e-6)
        sck = axk.scatter(*pts.T, s=8, c=v, cmap="RdBu_r", vmin=-vlim, vmax=vlim)
        fig.colorbar(sck, ax=axk, shrink=0.7, pad=0.12, label=label)
        axk.set_title(text)
        _equal_axes(axk, pts)
    if title:
        fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return _io.write_bytes(path, buf.getvalue())


def _surfaces(pred: MoleculePrediction) -> tuple[np.ndarray | None, list[tuple]]:
    """(the points of the innermost surface, [(values there in kcal/mol/e, colour bar label,
    title)]): the charges' ESP, and its error against a reference when there is one."""
    if pred.esp is None or pred.esp_kcal is None:
        return None, []
    keep = _innermost_surface(pred)
    surfaces = [(pred.esp_kcal[keep], "ESP (kcal/mol/e)", "ESP of the charges on the surface")]
    if pred.esp_reference is not None:
        err = pred.esp_kcal - pred.esp_reference.astype(np.float64) * HARTREE_TO_KCAL
        text = f"ESP error (RMSE {pred.esp_rmse:.2f} kcal/mol/e\non all {len(pred.esp)} points)"
        surfaces.append((err[keep], "model - reference (kcal/mol/e)", text))
    return keep, surfaces


def _innermost_surface(pred: MoleculePrediction) -> np.ndarray:
    """(g,) bool: the grid points on the innermost vdW shell (within 0.15 vdW radii of the
    closest approach), so the picture shows one surface; all points when that leaves few."""
    radii = np.array([VDW_RADII.get(int(z), 1.7) for z in pred.numbers])
    d = np.linalg.norm(pred.esp_points[:, None, :] - pred.positions[None, :, :], axis=-1)
    ratio = (d / radii[None, :]).min(axis=1)
    keep = ratio <= ratio.min() + 0.15
    return keep if keep.sum() >= min(50, len(keep)) else np.ones(len(keep), bool)


def _equal_axes(ax, pts: np.ndarray) -> None:
    c, r = pts.mean(axis=0), max(float(np.abs(pts - pts.mean(axis=0)).max()), 0.5)
    ax.set_xlim(c[0] - r, c[0] + r)
    ax.set_ylim(c[1] - r, c[1] + r)
    ax.set_zlim(c[2] - r, c[2] + r)
    ax.set_box_aspect((1, 1, 1))
    ax.set_xlabel("x (A)")
    ax.set_ylabel("y (A)")
    ax.set_zlabel("z (A)")
