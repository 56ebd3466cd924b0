"""Stored layouts of ESP files: which grid points are real, array shapes, dipole units.

The checks `dcmtune.data` applies to real users' files (mmml layout: padded, `espMask`, no
`n_grid`, Dxyz in e*Bohr), as small pure functions on numpy arrays (docs/data.md, "Files from
mmml"). `DataError` lives here so these functions can raise it; `dcmtune.data` re-exports it.
"""

from __future__ import annotations

import logging
import math
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from dcmtune.units import EANG_TO_DEBYE, EBOHR_TO_DEBYE

__all__ = [
    "DataError",
    "DIPOLE_SCALE",
    "real_grid_points",
    "infer_n_grid",
    "kept_first",
    "mono_dipole_ratio",
    "check_dipole_units",
    "stored_layout",
    "provenance_path",
]

log = logging.getLogger(__name__)

# Debye per stored unit of Dxyz (DataConfig.dipole_units).
DIPOLE_SCALE = {"debye": 1.0, "e_bohr": EBOHR_TO_DEBYE, "e_angstrom": EANG_TO_DEBYE}
# The dipole-units check (check_dipole_units; docs/data.md): conformers whose mono dipole is at
# least this large (Debye) vote; at least this many are needed; a unit "matches" when the
# median ratio is within this factor of the ratio that unit predicts.
DIPOLE_CHECK_MIN_DEBYE = 0.5
DIPOLE_CHECK_MIN_CONFORMERS = 3
DIPOLE_CHECK_BAND = 1.3


class DataError(ValueError):
    """A data file is unreadable or breaks the format; the message names file and key."""


def real_grid_points(
    raw: Mapping[str, np.ndarray], esp: np.ndarray, grid: np.ndarray, fail, source: str
) -> tuple[np.ndarray, bool]:
    """Which grid points are real: the first n_grid (stored, else inferred from trailing
    all-zero rows) and, where `espMask` exists, only those it keeps.

    Args:
      raw: The file's arrays (n_grid and espMask are read from it when present).
      esp: (M, G) Hartree/e. grid: (M, G, 3) Angstrom.
      fail: fail(key, message) -> DataError naming the file.
      source: The file, for the warning about an inferred n_grid.

    Returns:
      keep: (M, G) bool, at least one point per conformer.
      mask_redundant: True when espMask exists but keeps every point n_grid keeps.

    Raises:
      DataError: bad n_grid or espMask, or a conformer left without grid points.
    """
    M, G = esp.shape
    base = _first_n_grid(raw, esp, grid, fail)
    mask = _esp_mask(raw, M, G, fail)
    keep = base if mask is None else base & mask
    empty = ~keep.any(axis=1)
    if np.any(empty):
        raise fail("espMask", f"conformer {int(np.argmax(empty))} keeps no grid point")
    if "n_grid" not in raw:
        dropped = ~base & (True if mask is None else mask)
        if dropped.any():
            n = base.sum(axis=1)
            log.warning(
                "%s: n_grid missing: inferred from trailing all-zero grid rows (coordinates and "
                "esp 0) for %d of %d conformers (n_grid %d..%d of G = %d); store n_grid to "
                "make it explicit",
                *(source, int(dropped.any(axis=1).sum()), M, int(n.min()), int(n.max()), G),
            )
    return keep, mask is not None and np.array_equal(keep, base)


def _first_n_grid(
    raw: Mapping[str, np.ndarray], esp: np.ndarray, grid: np.ndarray, fail
) -> np.ndarray:
    """(M, G) bool: the first n_grid points, n_grid stored or inferred from trailing zeros."""
    M, G = esp.shape
    idx = np.arange(G)[None, :]
    if "n_grid" not in raw:
        inferred = infer_n_grid(esp, grid)
        if np.any(inferred == 0):
            raise fail(
                "vdw_surface",
                f"conformer {int(np.argmin(inferred))}: every grid row is "
                "zero (coordinates and esp); expected real grid points",
            )
        return idx < inferred[:, None]
    n_grid = np.asarray(raw["n_grid"]).reshape(-1)
    if n_grid.shape != (M,):
        raise fail("n_grid", f"expected shape (M,) with M = {M}, got {raw['n_grid'].shape}")
    if np.any(n_grid > G) or np.any(n_grid < 1):
        raise fail(
            "n_grid", f"expected 1 <= n_grid <= G = {G}, got range [{n_grid.min()}, {n_grid.max()}]"
        )
    return idx < n_grid[:, None]


def _esp_mask(raw: Mapping[str, np.ndarray], M: int, G: int, fail) -> np.ndarray | None:
    """espMask (M, G) as bool (True = keep), or None when the file has none."""
    if "espMask" not in raw:
        return None
    mask = np.asarray(raw["espMask"])
    if mask.shape != (M, G):
        raise fail("espMask", f"expected shape (M, G) = {(M, G)} like esp, got {mask.shape}")
    if mask.dtype.kind not in "biuf" or not np.all((mask == 0) | (mask == 1)):
        raise fail(
            "espMask",
            f"expected booleans or 0/1 (True = keep the grid point), got "
            f"dtype {mask.dtype} with other values",
        )
    return mask.astype(bool)


def infer_n_grid(esp: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Real grid points per conformer when n_grid is missing: all rows up to the last one that
    is not entirely zero (coordinates all 0 and esp 0 = padding).

    Args:
      esp: (M, G). grid: (M, G, 3).

    Returns:
      (M,) int32 in [0, G]; 0 for a conformer whose rows are all zero.
    """
    nonzero = (esp != 0) | np.any(grid != 0, axis=-1)
    G = esp.shape[1]
    last = G - np.argmax(nonzero[:, ::-1], axis=1)
    return np.where(nonzero.any(axis=1), last, 0).astype(np.int32)


def kept_first(keep: np.ndarray, esp: np.ndarray, grid: np.ndarray):
    """Moves each conformer's kept grid points first (stable order) and trims the grid axis to
    the largest count (g = max n_grid), without copying the full padded arrays.

    Args:
      keep: (M, G) bool. esp: (M, G). grid: (M, G, 3).

    Returns:
      esp (M, g), grid (M, g, 3), and n_grid (M,) int32 = kept points.
    """
    n_grid = keep.sum(axis=1).astype(np.int32)
    g = int(n_grid.max())
    if np.array_equal(keep, np.arange(keep.shape[1])[None, :] < n_grid[:, None]):
        return esp[:, :g], grid[:, :g], n_grid
    order = np.argsort(~keep, axis=1, kind="stable")[:, :g]
    return (
        np.take_along_axis(esp, order, axis=1),
        np.take_along_axis(grid, order[..., None], axis=1),
        n_grid,
    )


def mono_dipole_ratio(
    dipole: np.ndarray, mono: np.ndarray, R: np.ndarray, real: np.ndarray, com: np.ndarray
) -> tuple[float, int]:
    """Median over conformers of |Dxyz| / |dipole of the mono charges about com|.

    Args:
      dipole: (M, 3) Debye. mono: (M, A) e. R: (M, A, 3) Angstrom. real: (M, A) bool.
      com: (M, 3) Angstrom.

    Returns:
      (median ratio, conformers that voted); only conformers whose mono dipole is at least
      DIPOLE_CHECK_MIN_DEBYE vote (below that the ratio is noise); NaN when fewer than
      DIPOLE_CHECK_MIN_CONFORMERS vote.
    """
    q = np.where(real, mono, 0.0)
    mu = (q[..., None] * (R - com[:, None, :])).sum(axis=1) * EANG_TO_DEBYE  # (M, 3) Debye
    size = np.linalg.norm(mu, axis=1)
    votes = size >= DIPOLE_CHECK_MIN_DEBYE
    n = int(votes.sum())
    if n < DIPOLE_CHECK_MIN_CONFORMERS:
        return float("nan"), n
    return float(np.median(np.linalg.norm(dipole[votes], axis=1) / size[votes])), n


def check_dipole_units(
    ratio: float, voters: int, declared: str, source: str = "<arrays>", warn: bool = True
) -> str:
    """Decides whether stored dipoles are in the declared unit.

    If the file were in unit u while `declared` was given, the median ratio |Dxyz read as
    declared| / |mono dipole| would be about scale(declared) / scale(u): 0.393430 for e*Bohr
    and 0.208194 for e*Angstrom read as Debye. The rule: the unit whose predicted ratio is
    nearest in log scale wins; if that is not the declared unit and it matches within a factor
    DIPOLE_CHECK_BAND (1.3), the file is refused. ESP-fitted charges reproduce the QM dipole to
    a few per cent (demo set: median 0.995, all 181 voters within 0.96-1.16) and even Mulliken
    charges to ~15% in the median (0.85), far inside the band; the nearest wrong unit is a
    factor 1.89 away.

    Args:
      ratio: Median |Dxyz| (converted with `declared` to Debye) / |mono dipole| (Debye).
      voters: Conformers behind the median (NaN ratio: too few, nothing is decided).
      declared: "debye", "e_bohr" or "e_angstrom".
      source: The file, for messages.
      warn: Log "not confirmed" as a warning (the loader does; reports that repeat it don't).

    Returns:
      One line for humans: confirmed, not checked, or not confirmed (the mono charges disagree
      with Dxyz in every unit).

    Raises:
      DataError: the dipoles match another unit; names it and the flag/key that sets it.
    """
    if not math.isfinite(ratio):
        return (
            f"not checked ({voters} conformer(s) with a mono dipole >= "
            f"{DIPOLE_CHECK_MIN_DEBYE} Debye; {DIPOLE_CHECK_MIN_CONFORMERS} needed)"
        )
    predicted = {u: DIPOLE_SCALE[declared] / DIPOLE_SCALE[u] for u in DIPOLE_SCALE}
    error = {u: abs(math.log(max(ratio, 1e-12) / p)) for u, p in predicted.items()}
    best = min(error, key=error.__getitem__)
    band = math.log(DIPOLE_CHECK_BAND)
    evidence = (
        f"median |Dxyz| / |dipole of mono about com| over {voters} conformers is "
        f"{ratio:.3f} reading Dxyz as {declared}"
    )
    if best != declared and error[best] <= band:
        raise DataError(
            f"{source}: Dxyz: dipoles look like {best}, not {declared} ({evidence}; "
            f"{ratio / predicted[best]:.3f} as {best}); set --dipole-units {best} "
            f"(config key data.dipole_units)"
        )
    if error[declared] > band:
        msg = (
            f"not confirmed: {evidence}, matching no unit within a factor "
            f"{DIPOLE_CHECK_BAND} (are mono and Dxyz from the same calculation?)"
        )
        if warn:
            log.warning("%s: Dxyz units %s", source, msg)
        return msg
    return f"{declared} confirmed ({evidence})"


def stored_layout(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and dtype of every array in a `.npz` file, read from the headers only (cheap on
    large files; nothing is loaded or unpickled).

    Returns:
      {key: (shape, dtype string)}.

    Raises:
      DataError: the file is not a readable .npz.
    """
    path = Path(path)
    out = {}
    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if not name.endswith(".npy"):
                    continue
                with z.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read(f)
                out[name[:-4]] = (tuple(int(n) for n in shape), dtype.str)
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    return out


def provenance_path(out: str | Path) -> Path:
    """The provenance JSON next to a dataset: `x.npz` -> `x.provenance.json`."""
    out = Path(out)
    return out.with_name(
        out.name[:-4] + ".provenance.json"
        if out.name.endswith(".npz")
        else out.name + ".provenance.json"
    )
