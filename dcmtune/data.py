"""ESP datasets: load and validate `.npz` files, split them, and cut fixed-shape batches.

File format (DESIGN.md section 2; compatible with the mmml DCMNet files), per file M conformers
padded to A atoms and G grid points, real atoms first:

  R (M, A, 3) Angstrom, Z (M, A) int (0 = padding), N (M,) or (M, 1), esp (M, G) Hartree/e,
  vdw_surface or esp_grid (M, G, 3) Angstrom; optional n_grid (M,), espMask (M, G) bool,
  mono (M, A) e, Dxyz (M, 3) Debye (or e*Bohr, e*Angstrom with `dipole_units`),
  com (M, 3) Angstrom, Q (M,) e, mol_id (M,).

Loading makes real users' files (mmml layout: QM9 padded to 60 atoms and 3,200 grid points)
compact and safe (docs/data.md, "Files from mmml"):

* compact: atoms and grid points are trimmed to the data's real maxima; `espMask` (True = keep)
  is honoured by moving each conformer's kept points first (n_grid = their count); a missing
  n_grid is inferred from trailing all-zero grid rows (coordinates and esp 0), with a warning;
* molecules: without `mol_id`, conformers are grouped by their bond graph (dcmtune.molgraph);
  `ESPData.mol_id_source` says "file" or "graph";
* dipole units: a stored `Dxyz` that matches the dipole of the stored `mono` charges in another
  unit than the declared one is refused (`check_dipole_units`).

Everything here is numpy: the sweep driver loads data without starting a JAX backend. Batches
are dicts of arrays with fixed shapes (B, A, ...) and masks, so one compiled step serves a run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import logging
import math
import zipfile
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from dcmtune.molgraph import graph_keys
from dcmtune.units import BOHR, EANG_TO_DEBYE, EBOHR_TO_DEBYE

__all__ = [
    "DataError",
    "ESPData",
    "load_npz",
    "load_dataset",
    "bundled_dataset_path",
    "concatenate",
    "pad_to",
    "compact",
    "mol_id_source",
    "dipole_ratio",
    "check_dipole_units",
    "stored_layout",
    "infer_n_grid",
    "to_arrays",
    "split_indices",
    "split_dataset",
    "split_record",
    "make_batch",
    "stacked_batches",
]

log = logging.getLogger(__name__)

KNOWN_KEYS = {"R", "Z", "N", "esp", "vdw_surface", "esp_grid", "n_grid", "espMask", "mono",
              "Dxyz", "com", "Q", "mol_id"}
DEMO_FILE = "demo_esp.npz"

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


@dataclasses.dataclass(frozen=True)
class ESPData:
    """A validated ESP dataset held as numpy arrays (M conformers, A atoms, G grid points).

    Attributes:
      R: (M, A, 3) float32 positions, Angstrom; padding rows are zero.
      Z: (M, A) int32 atomic numbers, 0 = padding.
      N: (M,) int32 real atoms.
      esp: (M, G) float32 reference ESP, Hartree/e; zero beyond n_grid.
      grid: (M, G, 3) float32 grid points, Angstrom.
      n_grid: (M,) int32 valid grid points (the first n_grid).
      mono: (M, A) float32 reference atomic charges (e), or None.
      dipole: (M, 3) float32 reference dipole (Debye) about com, or None.
      com: (M, 3) float32 dipole origin, Angstrom.
      Q: (M,) float32 total charge, e.
      mol_id: (M,) str molecule ids; conformers of one id stay in one split.
      mol_id_source: Where the ids come from: "file" (the files' mol_id), "graph" (grouped by
        bond graph, dcmtune.molgraph) or "mixed" (several files, both kinds). Not an array:
        not part of the checksum, kept by `subset`.
    """

    R: np.ndarray
    Z: np.ndarray
    N: np.ndarray
    esp: np.ndarray
    grid: np.ndarray
    n_grid: np.ndarray
    mono: Optional[np.ndarray]
    dipole: Optional[np.ndarray]
    com: np.ndarray
    Q: np.ndarray
    mol_id: np.ndarray
    mol_id_source: str = "file"

    @property
    def num_conformers(self) -> int:
        return int(self.R.shape[0])

    @property
    def num_atoms(self) -> int:
        return int(self.R.shape[1])

    @property
    def num_grid(self) -> int:
        return int(self.grid.shape[1])

    def subset(self, idx: np.ndarray) -> "ESPData":
        """The conformers `idx`, same padding."""
        return dataclasses.replace(self, **{
            name: (None if getattr(self, name) is None else getattr(self, name)[idx])
            for name in _ARRAY_FIELDS})

    def checksum(self) -> str:
        """SHA-256 of the arrays, to recognise the same data later (e.g. when ranking)."""
        h = hashlib.sha256()
        for name in _ARRAY_FIELDS:
            a = getattr(self, name)
            h.update(name.encode())
            if a is not None:
                h.update(np.ascontiguousarray(a).tobytes() if a.dtype.kind != "U"
                         else "\0".join(a.tolist()).encode())
        return h.hexdigest()


_ARRAY_FIELDS = tuple(f.name for f in dataclasses.fields(ESPData) if f.name != "mol_id_source")


def mol_id_source(parts: Sequence[ESPData]) -> str:
    """The grouping source of several datasets together: theirs if they agree, else "mixed"."""
    sources = {p.mol_id_source for p in parts}
    return sources.pop() if len(sources) == 1 else "mixed"


# --------------------------------------------------------------------------- loading


def bundled_dataset_path() -> Path:
    """Path of the embedded demo dataset (package data), from any working directory."""
    res = importlib.resources.files("dcmtune.datasets").joinpath(DEMO_FILE)
    return Path(str(res))


def load_dataset(data_files: Sequence[str | Path] = (), max_atomic_number: int = 36,
                 dipole_units: str = "debye") -> ESPData:
    """Loads `data_files`, or the bundled demo set when none are given."""
    files = list(data_files) or [bundled_dataset_path()]
    return load_npz(files, max_atomic_number=max_atomic_number, dipole_units=dipole_units)


def load_npz(paths: Sequence[str | Path] | str | Path, max_atomic_number: int = 36,
             dipole_units: str = "debye") -> ESPData:
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
            raise DataError(f"{path}: not a readable .npz file (expected a zip archive made by "
                            "numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as f:
            raw = {k: f[k] for k in f.files}
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise DataError(f"{path}: holds object arrays (pickle); expected plain numeric and "
                            "string arrays") from None
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    except Exception as e:  # zipfile.BadZipFile, OSError, EOFError: all mean "not an npz".
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    return validate_arrays(raw, source=str(path), max_atomic_number=max_atomic_number,
                           dipole_units=dipole_units)


def validate_arrays(raw: Mapping[str, np.ndarray], source: str = "<arrays>",
                    max_atomic_number: int = 36, dipole_units: str = "debye") -> ESPData:
    """Checks the arrays of one file against the format and returns a compact `ESPData`.

    Steps: keys; shapes; atoms; grid points (n_grid, espMask or inferred from trailing zero
    rows; kept points moved first); finite values; optional keys and the dipole-units check;
    molecule ids (the file's, else grouped by bond graph); atoms and grid points trimmed to the
    real maxima.

    Raises:
      DataError: one line naming `source`, the key and what was expected.
    """

    def fail(key: str, msg: str) -> DataError:
        return DataError(f"{source}: {key}: {msg}")

    # 1. Keys: aliases, required, ignored extras (logged once the grid step knows about espMask).
    raw = dict(raw)
    if "vdw_surface" not in raw and "esp_grid" in raw:
        raw["vdw_surface"] = raw["esp_grid"]
    for key in ("R", "Z", "N", "esp", "vdw_surface"):
        if key not in raw:
            alias = " (or esp_grid)" if key == "vdw_surface" else ""
            raise fail(key, f"required key missing{alias}; file has {sorted(raw)}")
    ignored = sorted(set(raw) - KNOWN_KEYS)

    # 2. Shapes.
    R = _as_float(raw["R"], "R", fail)
    if R.ndim != 3 or R.shape[2] != 3:
        raise fail("R", f"expected shape (M, A, 3), got {R.shape}")
    M, A = R.shape[:2]
    if M == 0:
        raise fail("R", "file holds no conformers (M = 0)")
    if A == 0:
        raise fail("R", "expected at least one atom per conformer, got A = 0")
    Z = np.asarray(raw["Z"])
    if Z.shape != (M, A):
        raise fail("Z", f"expected shape (M, A) = {(M, A)} like R, got {Z.shape}")
    if Z.dtype.kind == "f":
        if not np.all(np.isfinite(Z)) or not np.all(Z == np.round(Z)):
            raise fail("Z", "expected integer atomic numbers")
    elif Z.dtype.kind not in "iu":
        raise fail("Z", f"expected integer atomic numbers, got dtype {Z.dtype}")
    Z = Z.astype(np.int32)
    N = np.asarray(raw["N"])
    if N.shape == (M, 1):
        N = N[:, 0]
    if N.shape != (M,):
        raise fail("N", f"expected shape (M,) or (M, 1) with M = {M}, got {N.shape}")
    N = N.astype(np.int32)
    esp = _as_float(raw["esp"], "esp", fail, keep_float32=True)
    if esp.ndim != 2 or esp.shape[0] != M:
        raise fail("esp", f"expected shape (M, G) with M = {M}, got {esp.shape}")
    G = esp.shape[1]
    if G == 0:
        raise fail("esp", "expected at least one grid point, got G = 0")
    grid = _as_float(raw["vdw_surface"], "vdw_surface", fail, keep_float32=True)
    if grid.shape != (M, G, 3):
        raise fail("vdw_surface", f"expected shape (M, G, 3) = {(M, G, 3)}, got {grid.shape}")

    # 3. Atom counts and atomic numbers.
    if np.any(Z < 0):
        raise fail("Z", "negative atomic number")
    if np.any(Z > max_atomic_number):
        bad = int(Z.max())
        raise fail("Z", f"atomic number {bad} above max_atomic_number = {max_atomic_number}; "
                        "raise model.max_atomic_number")
    real = Z > 0
    counts = real.sum(axis=1)
    if np.any(N != counts):
        i = int(np.argmax(N != counts))
        raise fail("N", f"conformer {i}: N = {N[i]} but Z has {counts[i]} atoms > 0")
    if np.any(counts == 0):
        raise fail("Z", f"conformer {int(np.argmax(counts == 0))} has no atoms")
    first_pad = np.arange(A)[None, :] >= counts[:, None]
    if np.any(real & first_pad):
        raise fail("Z", "real atoms must come first (Z > 0 after a padding entry)")

    # 4. Grid points: which are real, then those first (n_grid = their count).
    keep, mask_redundant = _grid_keep(raw, esp, grid, fail, source)
    if mask_redundant:
        ignored = sorted(ignored + ["espMask"])
    if ignored:
        log.info("%s: ignoring keys %s", source, ", ".join(ignored))
    esp, grid, n_grid = _kept_first(keep, esp, grid)  # now (M, g), g = max n_grid
    grid_mask = np.arange(esp.shape[1])[None, :] < n_grid[:, None]

    # 5. Finite values where they count (padding may hold anything; it is zeroed below).
    _finite(R[real], "R", fail)
    _finite(esp[grid_mask], "esp", fail)
    _finite(grid[grid_mask], "vdw_surface", fail)

    # 6. Optional keys (padding rows of R may hold anything: zero them before any sum).
    R = np.where(real[..., None], R, 0.0)
    mono = None
    if "mono" in raw:
        mono = _as_float(raw["mono"], "mono", fail)
        if mono.shape != (M, A):
            raise fail("mono", f"expected shape (M, A) = {(M, A)}, got {mono.shape}")
        _finite(mono[real], "mono", fail)
        mono = np.where(real, mono, 0.0)
    com = np.zeros((M, 3))
    if "com" in raw:
        com = _as_float(raw["com"], "com", fail)
        if com.shape != (M, 3):
            raise fail("com", f"expected shape (M, 3) = {(M, 3)}, got {com.shape}")
        _finite(com, "com", fail)
    Q = np.zeros(M)
    if "Q" in raw:
        Q = _as_float(raw["Q"], "Q", fail).reshape(-1)
        if Q.shape != (M,):
            raise fail("Q", f"expected shape (M,) with M = {M}, got {raw['Q'].shape}")
        _finite(Q, "Q", fail)
    dipole = None
    if "Dxyz" in raw:
        dipole = _as_float(raw["Dxyz"], "Dxyz", fail)
        if dipole.shape != (M, 3):
            raise fail("Dxyz", f"expected shape (M, 3) = {(M, 3)}, got {dipole.shape}")
        _finite(dipole, "Dxyz", fail)
        if dipole_units not in DIPOLE_SCALE:
            raise fail("Dxyz", f"dipole_units must be one of {sorted(DIPOLE_SCALE)}, got "
                               f"{dipole_units}")
        dipole = dipole * DIPOLE_SCALE[dipole_units]
        if mono is not None:
            # Without a stored com, Dxyz of an ion may be about another origin: neutral only.
            votes = np.ones(M, bool) if "com" in raw else np.abs(Q) < 1e-3
            ratio, n = _dipole_ratio(dipole[votes], mono[votes], R[votes], real[votes],
                                     com[votes])
            check_dipole_units(ratio, n, dipole_units, source)

    # 7. Molecules: the file's ids win; else conformers sharing a bond graph are one molecule.
    if "mol_id" in raw:
        mol_id = np.asarray(raw["mol_id"]).reshape(-1)
        if mol_id.shape != (M,):
            raise fail("mol_id", f"expected shape (M,) with M = {M}, got {raw['mol_id'].shape}")
        mol_id, source_of_ids = mol_id.astype(str), "file"
    else:
        mol_id, source_of_ids = graph_keys(R, Z), "graph"
        log.info("%s: no mol_id; %d conformers grouped into %d molecules by bond graph", source,
                 M, len(np.unique(mol_id)))

    # 8. Units check: grid points should sit ~1.4-2.0 vdW radii (>= ~1.5 Angstrom) from atoms;
    #    Bohr coordinates make every distance 1.89x too large.
    _warn_if_bohr(R, Z, grid, n_grid, source)

    # 9. Compact: trim atoms (grid points are trimmed already) to the real maxima; padding
    #    costs compute in every step.
    a, g = int(N.max()), esp.shape[1]
    if (a, g) != (A, G):
        log.info("%s: compact layout: atoms %d -> %d, grid points %d -> %d", source, A, a, G, g)
    f32 = np.float32
    return ESPData(
        R=R[:, :a].astype(f32), Z=np.where(real, Z, 0)[:, :a].astype(np.int32), N=N,
        esp=np.where(grid_mask, esp, 0.0).astype(f32),
        grid=np.where(grid_mask[..., None], grid, 0.0).astype(f32), n_grid=n_grid,
        mono=None if mono is None else mono[:, :a].astype(f32),
        dipole=None if dipole is None else dipole.astype(f32), com=com.astype(f32),
        Q=Q.astype(f32), mol_id=mol_id, mol_id_source=source_of_ids)


def _grid_keep(raw: Mapping[str, np.ndarray], esp: np.ndarray, grid: np.ndarray, fail,
               source: str) -> tuple[np.ndarray, bool]:
    """Which grid points are real: the first n_grid (stored, else inferred from trailing
    all-zero rows) and, where `espMask` exists, only those it keeps.

    Args:
      raw: The file's arrays. esp: (M, G). grid: (M, G, 3).

    Returns:
      keep: (M, G) bool, at least one point per conformer.
      mask_redundant: True when espMask exists but keeps every point n_grid keeps.
    """
    M, G = esp.shape
    idx = np.arange(G)[None, :]
    if "n_grid" in raw:
        n_grid = np.asarray(raw["n_grid"]).reshape(-1)
        if n_grid.shape != (M,):
            raise fail("n_grid", f"expected shape (M,) with M = {M}, got {raw['n_grid'].shape}")
        if np.any(n_grid > G) or np.any(n_grid < 1):
            raise fail("n_grid", f"expected 1 <= n_grid <= G = {G}, got range "
                                 f"[{n_grid.min()}, {n_grid.max()}]")
        base = idx < n_grid[:, None]
    else:
        inferred = infer_n_grid(esp, grid)
        if np.any(inferred == 0):
            raise fail("vdw_surface", f"conformer {int(np.argmin(inferred))}: every grid row is "
                                      "zero (coordinates and esp); expected real grid points")
        base = idx < inferred[:, None]
    mask = None
    if "espMask" in raw:
        mask = np.asarray(raw["espMask"])
        if mask.shape != (M, G):
            raise fail("espMask", f"expected shape (M, G) = {(M, G)} like esp, got {mask.shape}")
        if mask.dtype.kind not in "biuf" or not np.all((mask == 0) | (mask == 1)):
            raise fail("espMask", f"expected booleans (True = keep the grid point), got dtype "
                                  f"{mask.dtype}")
        mask = mask.astype(bool)
    keep = base if mask is None else base & mask
    empty = ~keep.any(axis=1)
    if np.any(empty):
        raise fail("espMask", f"conformer {int(np.argmax(empty))} keeps no grid point")
    if "n_grid" not in raw:
        dropped = ~base & (True if mask is None else mask)
        if dropped.any():
            n = base.sum(axis=1)
            log.warning("%s: n_grid missing: inferred from trailing all-zero grid rows "
                        "(coordinates and esp 0) for %d of %d conformers (n_grid %d..%d of "
                        "G = %d); store n_grid to make it explicit", source,
                        int(dropped.any(axis=1).sum()), M, int(n.min()), int(n.max()), G)
    return keep, mask is not None and np.array_equal(keep, base)


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


def _kept_first(keep: np.ndarray, esp: np.ndarray, grid: np.ndarray):
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
    return (np.take_along_axis(esp, order, axis=1),
            np.take_along_axis(grid, order[..., None], axis=1), n_grid)


def _dipole_ratio(dipole: np.ndarray, mono: np.ndarray, R: np.ndarray, real: np.ndarray,
                  com: np.ndarray) -> tuple[float, int]:
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


def dipole_ratio(data: ESPData) -> tuple[float, int]:
    """`check_dipole_units`' evidence for a loaded dataset (dipoles already in Debye): the
    median |Dxyz| / |dipole of mono about com| and the number of conformers that voted."""
    if data.dipole is None or data.mono is None:
        return float("nan"), 0
    return _dipole_ratio(data.dipole.astype(np.float64), data.mono.astype(np.float64),
                         data.R.astype(np.float64), data.Z > 0, data.com.astype(np.float64))


def check_dipole_units(ratio: float, voters: int, declared: str, source: str = "<arrays>",
                       warn: bool = True) -> str:
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
        return (f"not checked ({voters} conformer(s) with a mono dipole >= "
                f"{DIPOLE_CHECK_MIN_DEBYE} Debye; {DIPOLE_CHECK_MIN_CONFORMERS} needed)")
    predicted = {u: DIPOLE_SCALE[declared] / DIPOLE_SCALE[u] for u in DIPOLE_SCALE}
    error = {u: abs(math.log(max(ratio, 1e-12) / p)) for u, p in predicted.items()}
    best = min(error, key=error.get)
    band = math.log(DIPOLE_CHECK_BAND)
    evidence = (f"median |Dxyz| / |dipole of mono about com| over {voters} conformers is "
                f"{ratio:.3f} reading Dxyz as {declared}")
    if best != declared and error[best] <= band:
        raise DataError(
            f"{source}: Dxyz: dipoles look like {best}, not {declared} ({evidence}; "
            f"{ratio / predicted[best]:.3f} as {best}); set --dipole-units {best} "
            f"(config key data.dipole_units)")
    if error[declared] > band:
        msg = (f"not confirmed: {evidence}, matching no unit within a factor "
               f"{DIPOLE_CHECK_BAND} (are mono and Dxyz from the same calculation?)")
        if warn:
            log.warning("%s: Dxyz units %s", source, msg)
        return msg
    return f"{declared} confirmed ({evidence})"


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
        log.warning("%s: grid points lie a median %.2f from the nearest atom; expected ~1.5-3.6 "
                    "Angstrom (are the coordinates in Bohr? 1 Bohr = %.4f Angstrom)",
                    source, median, BOHR)


def concatenate(parts: Sequence[ESPData]) -> ESPData:
    """Concatenates datasets, padding to the largest A and G (of compact parts: the largest
    real ones). Optional keys present in only some parts are dropped with a warning (a partial
    reference would bias the loss)."""
    A = max(p.num_atoms for p in parts)
    G = max(p.num_grid for p in parts)
    parts = [pad_to(p, A, G) for p in parts]
    out = {}
    for name in _ARRAY_FIELDS:
        vals = [getattr(p, name) for p in parts]
        if any(v is None for v in vals):
            if any(v is not None for v in vals):
                log.warning("key %s is missing in some files; not used", name)
            out[name] = None
        else:
            out[name] = np.concatenate(vals)
    source = mol_id_source(parts)
    if source == "mixed":
        log.warning("some files have mol_id and some do not (grouped by bond graph): a molecule "
                    "in both kinds of file forms two groups, which may land in different splits")
    return ESPData(**out, mol_id_source=source)


def compact(data: ESPData) -> ESPData:
    """The same conformers with atoms and grid points trimmed to the real maxima (max N,
    max n_grid); the inverse of `pad_to`. Loading already does this."""
    a, g = int(data.N.max()), int(data.n_grid.max())
    return dataclasses.replace(
        data, R=data.R[:, :a], Z=data.Z[:, :a],
        mono=None if data.mono is None else data.mono[:, :a], esp=data.esp[:, :g],
        grid=data.grid[:, :g])


def to_arrays(data: ESPData, dipole_units: str = "debye") -> dict[str, np.ndarray]:
    """The arrays of a dcmtune file (DESIGN.md section 2) holding `data`: N as (M,), n_grid,
    Dxyz in `dipole_units` (Debye by default), mol_id as str; mono and Dxyz only where
    present. (`pad_to` first gives another padding, e.g. mmml's 60 atoms x 3,200 points.)"""
    out = {"R": data.R, "Z": data.Z, "N": data.N, "esp": data.esp, "vdw_surface": data.grid,
           "n_grid": data.n_grid, "com": data.com, "Q": data.Q, "mol_id": data.mol_id}
    if data.mono is not None:
        out["mono"] = data.mono
    if data.dipole is not None:
        out["Dxyz"] = (data.dipole / DIPOLE_SCALE[dipole_units]).astype(np.float32)
    return out


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
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(f)
                out[name[:-4]] = (tuple(int(n) for n in shape), dtype.str)
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    return out


def pad_to(data: ESPData, num_atoms: int, num_grid: int) -> ESPData:
    """The same conformers padded to `num_atoms` atoms and `num_grid` grid points."""
    if num_atoms < data.num_atoms or num_grid < data.num_grid:
        raise ValueError(f"pad_to: cannot shrink (A, G) = {(data.num_atoms, data.num_grid)} to "
                         f"{(num_atoms, num_grid)}")
    da, dg = num_atoms - data.num_atoms, num_grid - data.num_grid

    def pad(a, axis_pad):
        if a is None:
            return None
        width = [(0, 0)] * a.ndim
        for axis, n in axis_pad:
            width[axis] = (0, n)
        return np.pad(a, width)

    return dataclasses.replace(
        data, R=pad(data.R, [(1, da)]), Z=pad(data.Z, [(1, da)]), mono=pad(data.mono, [(1, da)]),
        esp=pad(data.esp, [(1, dg)]), grid=pad(data.grid, [(1, dg)]))


# --------------------------------------------------------------------------- splits


def split_indices(mol_id: np.ndarray, split_by: str = "molecule", valid_fraction: float = 0.1,
                  test_fraction: float = 0.1, num_train: Optional[int] = None,
                  num_valid: Optional[int] = None, num_test: Optional[int] = None,
                  seed: int = 0, Z: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Assigns conformers to train/valid/test.

    Groups (a mol_id's conformers, or single conformers with `split_by="conformer"`) are
    shuffled with `seed` and dealt to test, then valid, until each holds at least its target
    number of conformers; train takes the rest (or `num_train` of them). Targets are counts
    when any of num_train/num_valid/num_test is given, else fractions of all conformers.

    With `Z` (M, A), a group is never dealt to test or valid if it holds the last remaining
    examples of an element: every element of the data is seen in training (a model cannot be
    judged on an element it never met). Such groups stay in train.

    Returns:
      {"train", "valid", "test"}: sorted conformer indices.

    Raises:
      ValueError: if the data cannot fill a non-empty train and valid split.
    """
    M = len(mol_id)
    if split_by == "molecule":
        _, group = np.unique(np.asarray(mol_id), return_inverse=True)
    elif split_by == "conformer":
        group = np.arange(M)
    else:
        raise ValueError(f"split_by: expected 'molecule' or 'conformer', got {split_by!r}")
    counts_mode = any(n is not None for n in (num_train, num_valid, num_test))
    if counts_mode:
        t_test, t_valid = num_test or 0, num_valid or 0
    else:
        t_test, t_valid = math.ceil(test_fraction * M), math.ceil(valid_fraction * M)
    order = np.random.default_rng(seed).permutation(group.max() + 1)
    members = [np.flatnonzero(group == g) for g in order]
    elements = [set(np.unique(Z[idx])) - {0} if Z is not None else set() for idx in members]
    pool: dict[int, int] = {}  # element -> groups holding it that are not in test/valid
    for els in elements:
        for e in els:
            pool[e] = pool.get(e, 0) + 1
    out: dict[str, list[int]] = {"test": [], "valid": [], "train": []}
    for idx, els in zip(members, elements):
        holdable = all(pool[e] > 1 for e in els)
        if holdable and len(out["test"]) < t_test:
            dest = "test"
        elif holdable and len(out["valid"]) < t_valid:
            dest = "valid"
        elif num_train is None or len(out["train"]) < num_train:
            dest = "train"
        else:
            continue
        if dest != "train":
            for e in els:
                pool[e] -= 1
        out[dest].extend(idx)
    groups = "molecules" if split_by == "molecule" else "conformers"
    if not out["train"]:
        raise ValueError(f"split: no conformers left for training ({M} conformers in "
                         f"{len(members)} {groups}; test {len(out['test'])}, valid "
                         f"{len(out['valid'])})")
    if not out["valid"]:
        raise ValueError(f"split: the validation split is empty ({M} conformers in "
                         f"{len(members)} {groups}); give num_valid or valid_fraction > 0")
    return {k: np.sort(np.asarray(v, dtype=np.int64)) for k, v in out.items()}


def split_dataset(data: ESPData, cfg) -> dict[str, np.ndarray]:
    """`split_indices` with the settings of a `DataConfig` (every element kept in train)."""
    return split_indices(data.mol_id, cfg.split_by, cfg.valid_fraction, cfg.test_fraction,
                         cfg.num_train, cfg.num_valid, cfg.num_test, seed=cfg.split_seed,
                         Z=data.Z)


def split_record(data: ESPData, splits: Mapping[str, np.ndarray], **settings) -> dict:
    """The JSON-able record of a split, written next to every run and reused by ranking.

    Besides the indices and mol_ids per split it names where the molecule ids come from
    (`mol_id_source`: "file", "graph" = grouped by bond graph, or "mixed")."""
    return {
        "settings": settings,
        "checksum": data.checksum(),
        "num_conformers": data.num_conformers,
        "num_molecules": int(len(np.unique(data.mol_id))),
        "mol_id_source": data.mol_id_source,
        "indices": {k: [int(i) for i in v] for k, v in splits.items()},
        "mol_ids": {k: sorted(set(data.mol_id[v].tolist())) for k, v in splits.items()},
    }


# --------------------------------------------------------------------------- batches


def make_batch(data: ESPData, idx: np.ndarray, batch_size: Optional[int] = None
               ) -> dict[str, np.ndarray]:
    """A fixed-shape batch of conformers `idx`, padded with masked dummy molecules to
    `batch_size` (default len(idx)).

    Returns a dict: R (B, A, 3), Z (B, A), atom_mask (B, A), esp (B, G), grid (B, G, 3),
    grid_mask (B, G), mono (B, A), has_mono (B,), dipole (B, 3), has_dipole (B,), com (B, 3),
    Q (B,), mol_mask (B,).
    """
    idx = np.asarray(idx)
    B = len(idx) if batch_size is None else batch_size
    if len(idx) > B:
        raise ValueError(f"make_batch: {len(idx)} conformers do not fit batch_size {B}")
    pad = B - len(idx)
    A, G = data.num_atoms, data.num_grid

    def take(a):
        a = a[idx]
        return np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) if pad else a

    mol_mask = np.arange(B) < len(idx)
    n_grid = take(data.n_grid)
    return {
        "R": take(data.R),
        "Z": take(data.Z),
        "atom_mask": take(data.Z) > 0,
        "esp": take(data.esp),
        "grid": take(data.grid),
        "grid_mask": np.arange(G)[None, :] < n_grid[:, None],
        "mono": take(data.mono) if data.mono is not None else np.zeros((B, A), np.float32),
        "has_mono": mol_mask & (data.mono is not None),
        "dipole": take(data.dipole) if data.dipole is not None else np.zeros((B, 3), np.float32),
        "has_dipole": mol_mask & (data.dipole is not None),
        "com": take(data.com),
        "Q": take(data.Q),
        "mol_mask": mol_mask,
    }


def stacked_batches(data: ESPData, batch_size: int) -> dict[str, np.ndarray]:
    """All conformers of `data` as (nb, batch_size, ...) batches, in order; the last one padded
    with masked dummy molecules."""
    n = data.num_conformers
    batches = [make_batch(data, np.arange(i, min(i + batch_size, n)), batch_size)
               for i in range(0, n, batch_size)]
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


if __name__ == "__main__":  # `python -m dcmtune.data ...`: the CLI lives in data_cli.
    from dcmtune.data_cli import main

    raise SystemExit(main())
