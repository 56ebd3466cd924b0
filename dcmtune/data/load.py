"""Reading `.npz` files into a validated, compact `ESPData` (DESIGN.md section 2).

File format, per file M conformers padded to A atoms and G grid points, real atoms first:

  R (M, A, 3) Angstrom, Z (M, A) int (0 = padding), N (M,) or (M, 1), esp (M, G) Hartree/e,
  vdw_surface or esp_grid (M, G, 3) Angstrom; optional n_grid (M,), espMask (M, G) bool,
  mono (M, A) e, Dxyz (M, 3) Debye (or e*Bohr, e*Angstrom with `dipole_units`),
  com (M, 3) Angstrom, Q (M,) e, mol_id (M,).

`validate_arrays` applies one check per key, in the order of the format, and makes real users'
files (mmml layout: QM9 padded to 60 atoms and 3,200 grid points) compact and safe
(docs/data.md, "Files from mmml"):

* compact: atoms and grid points are trimmed to the data's real maxima; `espMask` (True = keep)
  is honoured by moving each conformer's kept points first (n_grid = their count); a missing
  n_grid is inferred from trailing all-zero grid rows (coordinates and esp 0), with a warning;
* molecules: without `mol_id`, conformers are grouped by their bond graph (`data.molgraph`);
  `ESPData.mol_id_source` says "file" or "graph";
* dipole units: a stored `Dxyz` that matches the dipole of the stored `mono` charges in another
  unit than the declared one is refused (`file_format.check_dipole_units`).

Every failure is a `DataError` of one line naming the file and the key. Plain numpy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from dcmtune.data.dataset import ESPData, bundled_dataset_path, concatenate, data_file_path
from dcmtune.data.file_format import (
    DIPOLE_SCALE,
    DataError,
    check_dipole_units,
    kept_first,
    mono_dipole_ratio,
    real_grid_points,
)
from dcmtune.data.molgraph import graph_keys
from dcmtune.units import BOHR

__all__ = ["load_dataset", "load_npz", "validate_arrays", "KNOWN_KEYS"]

log = logging.getLogger(__name__)

KNOWN_KEYS = {
    "R",
    "Z",
    "N",
    "esp",
    "vdw_surface",
    "esp_grid",
    "n_grid",
    "espMask",
    "mono",
    "Dxyz",
    "com",
    "Q",
    "mol_id",
    "shell",
}


def load_dataset(
    data_files: Sequence[str | Path] = (), max_atomic_number: int = 36, dipole_units: str = "debye"
) -> ESPData:
    """Loads `data_files` (paths, or names of bundled sets such as "organic"), or the bundled
    demo set when none are given."""
    files = [data_file_path(f) for f in data_files] or [bundled_dataset_path()]
    return load_npz(files, max_atomic_number=max_atomic_number, dipole_units=dipole_units)


def load_npz(
    paths: Sequence[str | Path] | str | Path,
    max_atomic_number: int = 36,
    dipole_units: str = "debye",
) -> ESPData:
    """Loads and validates one or several `.npz` files; several are concatenated.

    Raises:
      DataError: naming the file and key, for missing/unreadable files, missing keys, shape
        mismatches, N vs Z disagreement, non-finite values, n_grid > G, Z above
        `max_atomic_number`, or an empty file.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise DataError("data_files: expected at least one .npz file, got none")
    parts = [_load_one(Path(p), max_atomic_number, dipole_units) for p in paths]
    return parts[0] if len(parts) == 1 else concatenate(parts)


def _load_one(path: Path, max_atomic_number: int, dipole_units: str) -> ESPData:
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            raise DataError(
                f"{path}: not a readable .npz file (expected a zip archive made by numpy.savez)"
            )
    try:
        with np.load(path, allow_pickle=False) as f:
            raw = {k: f[k] for k in f.files}
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise DataError(
                f"{path}: holds object arrays (pickle); expected plain numeric and string arrays"
            ) from None
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    except Exception as e:  # zipfile.BadZipFile, OSError, EOFError: all mean "not an npz".
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    return validate_arrays(
        raw, source=str(path), max_atomic_number=max_atomic_number, dipole_units=dipole_units
    )


Fail = Callable[[str, str], DataError]


def validate_arrays(
    raw: Mapping[str, np.ndarray],
    source: str = "<arrays>",
    max_atomic_number: int = 36,
    dipole_units: str = "debye",
) -> ESPData:
    """Checks the arrays of one file against the format and returns a compact `ESPData`.

    One check per key, in the format's order (the module docstring): keys; R, Z, N, esp,
    vdw_surface; atoms; grid points; finite values; mono, com, Q, Dxyz; molecule ids; the
    Bohr-units warning; atoms and grid points trimmed to the real maxima.

    Raises:
      DataError: one line naming `source`, the key and what was expected.
    """

    def fail(key: str, msg: str) -> DataError:
        return DataError(f"{source}: {key}: {msg}")

    raw = _keys(raw, fail)  # 1. aliases and required keys
    R = _positions(raw, fail)  # 2. arrays and shapes
    M, A = R.shape[:2]
    Z, N = _numbers(raw, M, A, max_atomic_number, fail), _counts(raw, M, fail)
    esp, grid = _esp(raw, M, fail), _grid_points(raw, M, fail)
    G = esp.shape[1]
    real = _real_atoms(Z, N, fail)  # 3. atoms
    keep, mask_redundant = real_grid_points(raw, esp, grid, fail, source)  # 4. real points
    _log_ignored(raw, mask_redundant, source)
    esp, grid, n_grid, shell = _kept_points(keep, esp, grid, _shell(raw, M, G, fail))
    grid_mask = np.arange(esp.shape[1])[None, :] < n_grid[:, None]
    # 5. Finite values where they count (padding may hold anything; it is zeroed below).
    for key, values in (("R", R[real]), ("esp", esp[grid_mask]), ("vdw_surface", grid[grid_mask])):
        _finite(values, key, fail)
    R = np.where(real[..., None], R, 0.0)  # padding rows of R may hold anything
    # 6. Optional keys.
    mono, com, Q = _mono(raw, real, fail), _com(raw, M, fail), _total_charge(raw, M, fail)
    dipole = _dipole(raw, R, real, mono, com, Q, dipole_units, fail, source)
    mol_id, source_of_ids = _molecule_ids(raw, R, Z, fail, source)  # 7. molecules
    _warn_if_bohr(R, Z, grid, n_grid, source)  # 8. units of the coordinates
    # 9. Compact: atoms trimmed to the real maxima (grid points are already); padding costs
    #    compute in every step.
    a, g = int(N.max()), esp.shape[1]
    if (a, g) != (A, G):
        log.info("%s: compact layout: atoms %d -> %d, grid points %d -> %d", source, A, a, G, g)
    f32 = np.float32
    return ESPData(
        R=R[:, :a].astype(f32),
        Z=np.where(real, Z, 0)[:, :a].astype(np.int32),
        N=N,
        esp=np.where(grid_mask, esp, 0.0).astype(f32),
        grid=np.where(grid_mask[..., None], grid, 0.0).astype(f32),
        n_grid=n_grid,
        mono=None if mono is None else mono[:, :a].astype(f32),
        dipole=None if dipole is None else dipole.astype(f32),
        com=com.astype(f32),
        Q=Q.astype(f32),
        mol_id=mol_id,
        mol_id_source=source_of_ids,
        shell=None if shell is None else np.where(grid_mask, shell, 0.0).astype(f32),
    )


def _log_ignored(raw: Mapping[str, np.ndarray], mask_redundant: bool, source: str) -> None:
    """Logs the keys the format does not use (mmml's E, F, ...; a redundant espMask)."""
    ignored = sorted((set(raw) - KNOWN_KEYS) | ({"espMask"} if mask_redundant else set()))
    if ignored:
        log.info("%s: ignoring keys %s", source, ", ".join(ignored))


def _keys(raw: Mapping[str, np.ndarray], fail: Fail) -> dict:
    """The arrays with the esp_grid alias applied; every required key present."""
    raw = dict(raw)
    if "vdw_surface" not in raw and "esp_grid" in raw:
        raw["vdw_surface"] = raw["esp_grid"]
    for key in ("R", "Z", "N", "esp", "vdw_surface"):
        if key not in raw:
            alias = " (or esp_grid)" if key == "vdw_surface" else ""
            raise fail(key, f"required key missing{alias}; file has {sorted(raw)}")
    return raw


def _positions(raw: dict, fail: Fail) -> np.ndarray:
    """R: (M, A, 3), at least one conformer and one atom."""
    R = _as_float(raw["R"], "R", fail)
    if R.ndim != 3 or R.shape[2] != 3:
        raise fail("R", f"expected shape (M, A, 3), got {R.shape}")
    if R.shape[0] == 0:
        raise fail("R", "file holds no conformers (M = 0)")
    if R.shape[1] == 0:
        raise fail("R", "expected at least one atom per conformer, got A = 0")
    return R


def _numbers(raw: dict, M: int, A: int, max_atomic_number: int, fail: Fail) -> np.ndarray:
    """Z: (M, A) integers in [0, max_atomic_number]."""
    Z = np.asarray(raw["Z"])
    if Z.shape != (M, A):
        raise fail("Z", f"expected shape (M, A) = {(M, A)} like R, got {Z.shape}")
    if Z.dtype.kind == "f":
        if not np.all(np.isfinite(Z)) or not np.all(Z == np.round(Z)):
            raise fail("Z", "expected integer atomic numbers")
    elif Z.dtype.kind not in "iu":
        raise fail("Z", f"expected integer atomic numbers, got dtype {Z.dtype}")
    Z = Z.astype(np.int32)
    if np.any(Z < 0):
        raise fail("Z", "negative atomic number")
    if np.any(Z > max_atomic_number):
        raise fail(
            "Z",
            f"atomic number {int(Z.max())} above max_atomic_number = "
            f"{max_atomic_number}; raise model.max_atomic_number",
        )
    return Z


def _counts(raw: dict, M: int, fail: Fail) -> np.ndarray:
    """N: (M,) or (M, 1) -> (M,) int32."""
    N = np.asarray(raw["N"])
    if N.shape == (M, 1):
        N = N[:, 0]
    if N.shape != (M,):
        raise fail("N", f"expected shape (M,) or (M, 1) with M = {M}, got {N.shape}")
    return N.astype(np.int32)


def _esp(raw: dict, M: int, fail: Fail) -> np.ndarray:
    """esp: (M, G), at least one grid point."""
    esp = _as_float(raw["esp"], "esp", fail, keep_float32=True)
    if esp.ndim != 2 or esp.shape[0] != M:
        raise fail("esp", f"expected shape (M, G) with M = {M}, got {esp.shape}")
    if esp.shape[1] == 0:
        raise fail("esp", "expected at least one grid point, got G = 0")
    return esp


def _grid_points(raw: dict, M: int, fail: Fail) -> np.ndarray:
    """vdw_surface: (M, G, 3) like esp."""
    G = np.shape(raw["esp"])[1]
    grid = _as_float(raw["vdw_surface"], "vdw_surface", fail, keep_float32=True)
    if grid.shape != (M, G, 3):
        raise fail("vdw_surface", f"expected shape (M, G, 3) = {(M, G, 3)}, got {grid.shape}")
    return grid


def _real_atoms(Z: np.ndarray, N: np.ndarray, fail: Fail) -> np.ndarray:
    """(M, A) bool real atoms: N agrees with Z, every conformer has atoms, real ones first."""
    real = Z > 0
    counts = real.sum(axis=1)
    if np.any(N != counts):
        i = int(np.argmax(N != counts))
        raise fail("N", f"conformer {i}: N = {N[i]} but Z has {counts[i]} atoms > 0")
    if np.any(counts == 0):
        raise fail("Z", f"conformer {int(np.argmax(counts == 0))} has no atoms")
    first_pad = np.arange(Z.shape[1])[None, :] >= counts[:, None]
    if np.any(real & first_pad):
        raise fail("Z", "real atoms must come first (Z > 0 after a padding entry)")
    return real


def _mono(raw: dict, real: np.ndarray, fail: Fail) -> np.ndarray | None:
    """mono: (M, A) e, finite on real atoms, zero on padding; None when absent."""
    if "mono" not in raw:
        return None
    mono = _as_float(raw["mono"], "mono", fail)
    if mono.shape != real.shape:
        raise fail("mono", f"expected shape (M, A) = {real.shape}, got {mono.shape}")
    _finite(mono[real], "mono", fail)
    return np.where(real, mono, 0.0)


def _kept_points(keep, esp, grid, shell):
    """The real grid points first (`kept_first`: now (M, g), g = max n_grid = their count),
    the shells reordered with the points."""
    if shell is None:
        return (*kept_first(keep, esp, grid), None)
    # The same points first: the shell carried as a fourth grid coordinate.
    esp, grid4, n_grid = kept_first(keep, esp, np.concatenate([grid, shell[..., None]], -1))
    return esp, grid4[..., :3], n_grid, grid4[..., 3]


def _shell(raw: dict, M: int, G: int, fail: Fail) -> np.ndarray | None:
    """The optional per-point shell factors (M, G), or None."""
    if "shell" not in raw:
        return None
    s = np.asarray(raw["shell"])
    if s.shape != (M, G) or s.dtype.kind not in "fiu":
        raise fail(
            "shell",
            f"expected ({M}, {G}) numbers (vdW factor per grid point), got {s.dtype}{s.shape}",
        )
    return s.astype(np.float64)


def _com(raw: dict, M: int, fail: Fail) -> np.ndarray:
    """com: (M, 3) Angstrom; zeros when absent."""
    if "com" not in raw:
        return np.zeros((M, 3))
    com = _as_float(raw["com"], "com", fail)
    if com.shape != (M, 3):
        raise fail("com", f"expected shape (M, 3) = {(M, 3)}, got {com.shape}")
    _finite(com, "com", fail)
    return com


def _total_charge(raw: dict, M: int, fail: Fail) -> np.ndarray:
    """Q: (M,) e; zeros when absent."""
    if "Q" not in raw:
        return np.zeros(M)
    Q = _as_float(raw["Q"], "Q", fail).reshape(-1)
    if Q.shape != (M,):
        raise fail("Q", f"expected shape (M,) with M = {M}, got {raw['Q'].shape}")
    _finite(Q, "Q", fail)
    return Q


def _dipole(
    raw: dict,
    R: np.ndarray,
    real: np.ndarray,
    mono: np.ndarray | None,
    com: np.ndarray,
    Q: np.ndarray,
    dipole_units: str,
    fail: Fail,
    source: str,
) -> np.ndarray | None:
    """Dxyz: (M, 3) in Debye (converted from `dipole_units`), checked against the dipole of
    the stored mono charges when there are any; None when absent."""
    if "Dxyz" not in raw:
        return None
    M = R.shape[0]
    dipole = _as_float(raw["Dxyz"], "Dxyz", fail)
    if dipole.shape != (M, 3):
        raise fail("Dxyz", f"expected shape (M, 3) = {(M, 3)}, got {dipole.shape}")
    _finite(dipole, "Dxyz", fail)
    if dipole_units not in DIPOLE_SCALE:
        raise fail(
            "Dxyz", f"dipole_units must be one of {sorted(DIPOLE_SCALE)}, got {dipole_units}"
        )
    dipole = dipole * DIPOLE_SCALE[dipole_units]
    if mono is not None:
        # Without a stored com, Dxyz of an ion may be about another origin: neutral only.
        votes = np.ones(M, bool) if "com" in raw else np.abs(Q) < 1e-3
        ratio, n = mono_dipole_ratio(dipole[votes], mono[votes], R[votes], real[votes], com[votes])
        check_dipole_units(ratio, n, dipole_units, source)
    return dipole


def _molecule_ids(
    raw: dict, R: np.ndarray, Z: np.ndarray, fail: Fail, source: str
) -> tuple[np.ndarray, str]:
    """mol_id: the file's ids win; else conformers sharing a bond graph are one molecule."""
    M = R.shape[0]
    if "mol_id" in raw:
        mol_id = np.asarray(raw["mol_id"]).reshape(-1)
        if mol_id.shape != (M,):
            raise fail("mol_id", f"expected shape (M,) with M = {M}, got {raw['mol_id'].shape}")
        return mol_id.astype(str), "file"
    mol_id = graph_keys(R, Z)
    log.warning(
        "%s: no mol_id; %d conformers grouped into %d molecules by bond graph "
        "(isomers apart, stereoisomers together); give mol_id to choose the groups",
        source,
        M,
        len(np.unique(mol_id)),
    )
    return mol_id, "graph"


def _as_float(a, key, fail, keep_float32: bool = False) -> np.ndarray:
    """A numeric array as float64 (float32 kept as is with `keep_float32`: the large esp and
    grid arrays end as float32 anyway, so this only halves the peak memory)."""
    a = np.asarray(a)
    if a.dtype.kind not in "fiu":
        raise fail(key, f"expected a numeric array, got dtype {a.dtype}")
    if keep_float32 and a.dtype == np.float32:
        return a
    return a.astype(np.float64)


def _finite(a: np.ndarray, key: str, fail) -> None:
    if not np.all(np.isfinite(a)):
        raise fail(key, f"{int(np.size(a) - np.isfinite(a).sum())} non-finite value(s) (NaN/inf)")


def _warn_if_bohr(R, Z, grid, n_grid, source: str) -> None:
    """Warns when grid-to-nearest-atom distances look like Bohr rather than Angstrom."""
    m = int(np.argmax(n_grid))  # one conformer is enough for a units check
    real = Z[m] > 0
    g = grid[m, : n_grid[m]]
    d = np.linalg.norm(g[:, None, :] - R[m, real][None, :, :], axis=-1).min(axis=1)
    median = float(np.median(d))
    if median > 3.6:
        log.warning(
            "%s: grid points lie a median %.2f from the nearest atom; expected ~1.5-3.6 "
            "Angstrom (are the coordinates in Bohr? 1 Bohr = %.4f Angstrom)",
            source,
            median,
            BOHR,
        )
