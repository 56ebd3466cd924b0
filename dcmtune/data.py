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
are dicts of arrays with fixed shapes (B, A, ...) and masks; molecules of mixed sizes are grouped
into size buckets (`group_by_bucket`: powers of two for prediction, bounds fitted to the data by
`bucket_bounds` for training), each padded only to its own atoms and grid points, so a few
compiled steps serve any mix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import logging
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from dcmtune.layout import (DIPOLE_SCALE, DataError, check_dipole_units, infer_n_grid,
                            kept_first, mono_dipole_ratio, real_grid_points, stored_layout)
from dcmtune.molgraph import graph_keys
from dcmtune.units import BOHR

__all__ = [
    "DataError",
    "ESPData",
    "load_npz",
    "load_dataset",
    "bundled_dataset_path",
    "concatenate",
    "pad_to",
    "mol_id_source",
    "dipole_ratio",
    "check_dipole_units",
    "stored_layout",
    "infer_n_grid",
    "to_arrays",
    "split_indices",
    "limit_train_molecules",
    "split_dataset",
    "split_record",
    "make_batch",
    "stacked_batches",
    "size_bucket",
    "group_by_bucket",
    "bucket_bounds",
]

log = logging.getLogger(__name__)

KNOWN_KEYS = {"R", "Z", "N", "esp", "vdw_surface", "esp_grid", "n_grid", "espMask", "mono",
              "Dxyz", "com", "Q", "mol_id"}
DEMO_FILE = "demo_esp.npz"


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
    keep, mask_redundant = real_grid_points(raw, esp, grid, fail, source)
    if mask_redundant:
        ignored = sorted(ignored + ["espMask"])
    if ignored:
        log.info("%s: ignoring keys %s", source, ", ".join(ignored))
    esp, grid, n_grid = kept_first(keep, esp, grid)  # now (M, g), g = max n_grid
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
            ratio, n = mono_dipole_ratio(dipole[votes], mono[votes], R[votes], real[votes],
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
        log.warning("%s: no mol_id; %d conformers grouped into %d molecules by bond graph "
                    "(isomers apart, stereoisomers together); give mol_id to choose the groups",
                    source, M, len(np.unique(mol_id)))

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


def dipole_ratio(data: ESPData) -> tuple[float, int]:
    """`check_dipole_units`' evidence for a loaded dataset (dipoles already in Debye): the
    median |Dxyz| / |dipole of mono about com| and the number of conformers that voted."""
    if data.dipole is None or data.mono is None:
        return float("nan"), 0
    return mono_dipole_ratio(data.dipole.astype(np.float64), data.mono.astype(np.float64),
                             data.R.astype(np.float64), data.Z > 0,
                             data.com.astype(np.float64))


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


def limit_train_molecules(mol_id: np.ndarray, train: np.ndarray, n: int, seed: int = 0,
                          Z: Optional[np.ndarray] = None) -> np.ndarray:
    """The training conformers of `n` of the training split's molecules, for learning curves
    (valid and test are not touched, so points of one curve share them).

    1. The training split's distinct mol_ids are put in one order drawn from `seed` (a stream
       separate from the split's own shuffle) that does not depend on `n`, so the choice is
       nested: the molecules kept for n are among those kept for any larger n.
    2. With `Z` (M, A), the order starts with the molecules that, taken greedily in that order,
       hold every element of the training split, so every element is still seen in training.
    3. The first `n` molecules of the order keep all their training conformers.

    Returns:
      The kept conformer indices, sorted (a subset of `train`).

    Raises:
      ValueError: "train_molecules: ..." if n is not in [1, number of training molecules], or is
        below the number of molecules needed to hold every element.
    """
    train = np.asarray(train, dtype=np.int64)
    mols = np.unique(np.asarray(mol_id)[train])                       # (T,) training mol_ids
    if not 1 <= n <= len(mols):
        raise ValueError(f"train_molecules: expected an integer in [1, {len(mols)}] (the "
                         f"training split's molecules), got {n}")
    # 1. One seeded order, independent of n.
    order = list(mols[np.random.default_rng((seed, 1)).permutation(len(mols))])
    # 2. Molecules that bring an element not yet covered go first (greedy, in that order).
    cover: list = []
    if Z is not None:
        Zt, mt = np.asarray(Z)[train], np.asarray(mol_id)[train]
        missing = set(np.unique(Zt).tolist()) - {0}
        for m in order:
            els = set(np.unique(Zt[mt == m]).tolist()) - {0}
            if els & missing:
                cover.append(m)
                missing -= els
        if n < len(cover):
            raise ValueError(f"train_molecules: expected at least {len(cover)} (molecules needed "
                             f"to keep every element of the training split), got {n}")
        order = cover + [m for m in order if m not in set(cover)]
    # 3. The first n molecules, all their training conformers.
    keep = np.isin(np.asarray(mol_id)[train], np.asarray(order[:n]))
    return np.sort(train[keep])


def split_dataset(data: ESPData, cfg) -> dict[str, np.ndarray]:
    """`split_indices` with the settings of a `DataConfig` (every element kept in train), then,
    with `cfg.train_molecules`, only that many training molecules (`limit_train_molecules`)."""
    splits = split_indices(data.mol_id, cfg.split_by, cfg.valid_fraction, cfg.test_fraction,
                           cfg.num_train, cfg.num_valid, cfg.num_test, seed=cfg.split_seed,
                           Z=data.Z)
    if cfg.train_molecules is not None:
        splits["train"] = limit_train_molecules(data.mol_id, splits["train"],
                                                cfg.train_molecules, cfg.split_seed, data.Z)
    return splits


def split_record(data: ESPData, splits: Mapping[str, np.ndarray], **settings) -> dict:
    """The JSON-able record of a split, written next to every run and reused by ranking.

    Besides the indices and mol_ids per split it names where the molecule ids come from
    (`mol_id_source`: "file", "graph" = grouped by bond graph, or "mixed") and what the held-out
    splits really guarantee (`guarantee`: whole molecules only with split_by "molecule").
    """
    by_molecule = settings.get("split_by", "molecule") == "molecule"
    how = {"file": "", "graph": " (molecules grouped by bond graph: the files have no mol_id)",
           "mixed": " (some files' molecules grouped by bond graph)"}[data.mol_id_source]
    return {
        "guarantee": ("molecules: no mol_id of a held-out split is in training" + how
                      if by_molecule else "conformers only: conformers of one molecule may be "
                      "in training and in a held-out split"),
        "settings": settings,
        "checksum": data.checksum(),
        "num_conformers": data.num_conformers,
        "num_molecules": int(len(np.unique(data.mol_id))),
        "mol_id_source": data.mol_id_source,
        "indices": {k: [int(i) for i in v] for k, v in splits.items()},
        "mol_ids": {k: sorted(set(data.mol_id[v].tolist())) for k, v in splits.items()},
    }


# --------------------------------------------------------------------------- batches


def make_batch(data: ESPData, idx: np.ndarray, batch_size: Optional[int] = None,
               num_atoms: Optional[int] = None, num_grid: Optional[int] = None
               ) -> dict[str, np.ndarray]:
    """A fixed-shape batch of conformers `idx`, padded with masked dummy molecules to
    `batch_size` (default len(idx)), and to `num_atoms` atoms and `num_grid` grid points
    (default: the data's; a size bucket's may be smaller, never below the real counts of `idx`).

    Returns a dict: R (B, A, 3), Z (B, A), atom_mask (B, A), esp (B, G), grid (B, G, 3),
    grid_mask (B, G), mono (B, A), has_mono (B,), dipole (B, 3), has_dipole (B,), com (B, 3),
    Q (B,), mol_mask (B,).
    """
    idx = np.asarray(idx, dtype=np.int64)
    B = len(idx) if batch_size is None else batch_size
    if len(idx) > B:
        raise ValueError(f"make_batch: {len(idx)} conformers do not fit batch_size {B}")
    pad = B - len(idx)
    A = data.num_atoms if num_atoms is None else int(num_atoms)
    G = data.num_grid if num_grid is None else int(num_grid)
    if len(idx) and (data.N[idx].max() > A or data.n_grid[idx].max() > G):
        raise ValueError(f"make_batch: conformers of up to {data.N[idx].max()} atoms and "
                         f"{data.n_grid[idx].max()} grid points do not fit ({A}, {G})")

    def take(a, axis_size=None):
        a = a[idx]
        if axis_size is not None:  # trim or zero-pad axis 1 (atoms or grid points)
            a = a[:, :axis_size]
            if a.shape[1] < axis_size:
                width = [(0, 0)] * a.ndim
                width[1] = (0, axis_size - a.shape[1])
                a = np.pad(a, width)
        return np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) if pad else a

    mol_mask = np.arange(B) < len(idx)
    n_grid = take(data.n_grid)
    Z = take(data.Z, A)
    return {
        "R": take(data.R, A),
        "Z": Z,
        "atom_mask": Z > 0,
        "esp": take(data.esp, G),
        "grid": take(data.grid, G),
        "grid_mask": np.arange(G)[None, :] < n_grid[:, None],
        "mono": take(data.mono, A) if data.mono is not None else np.zeros((B, A), np.float32),
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


# --------------------------------------------------------------------------- size buckets


def size_bucket(n, minimum: int = 8, bounds: Optional[Sequence[int]] = None):
    """The padded size for `n` atoms (or grid points, or molecules): the smallest power of two
    >= max(n, minimum), or with `bounds` (ascending sizes, e.g. from `bucket_bounds`) the
    smallest bound >= n. Works on ints and on integer arrays (elementwise).

    Shared by prediction and training: every shape a jitted step sees is a bucket, so a mix of
    sizes costs one compiled program per bucket, not one per size. Powers of two (prediction:
    shapes stable across calls) never more than double the work; training knows its data and
    fits its bounds to it (`bucket_bounds`).

    Raises:
      ValueError: with `bounds`, for a size above the largest bound.
    """
    if bounds is not None:
        b = np.asarray(bounds, dtype=np.int64)
        n_arr = np.asarray(n, dtype=np.int64)
        if n_arr.size and n_arr.max() > b[-1]:
            raise ValueError(f"size_bucket: size {int(n_arr.max())} above the largest bound "
                             f"{int(b[-1])}")
        out = b[np.searchsorted(b, n_arr, side="left")]
        return int(out) if out.ndim == 0 else out
    m = np.maximum(np.asarray(n, dtype=np.int64), max(int(minimum), 1))
    out = np.left_shift(1, np.ceil(np.log2(m)).astype(np.int64))
    out = np.where(out < m, out * 2, out)  # guard against log2 rounding at exact powers
    return int(out) if out.ndim == 0 else out


def group_by_bucket(sizes: Sequence[int], minimum: int = 8,
                    bounds: Optional[Sequence[int]] = None) -> dict[int, np.ndarray]:
    """Indices of `sizes` grouped by `size_bucket`: {bucket: indices in input order}, buckets
    ascending. Example: sizes (3, 12, 5, 20) -> {8: [0, 2], 16: [1], 32: [3]}; with
    bounds (5, 20) -> {5: [0, 2], 20: [1, 3]}."""
    buckets = size_bucket(np.asarray(sizes, dtype=np.int64).reshape(-1), minimum, bounds)
    return {int(b): np.flatnonzero(buckets == b) for b in np.unique(buckets)}


def bucket_bounds(num_atoms: Sequence[int], num_grid: Sequence[int], cost, slots: int,
                  max_buckets: int, min_members: int = 1, bucket_cost: float = 0.0
                  ) -> list[int]:
    """Atom-count bounds of at most `max_buckets` size buckets that minimise the padded work.

    A bucket of n conformers runs ceil(n / slots) updates of `slots` molecules, each padded to
    the bucket's largest atom count and grid size, costing `cost(atoms, grid points)` per
    molecule; each bucket also costs `bucket_cost` (its compile, in the same units). Exact
    dynamic programming over the distinct atom counts; every bucket holds at least
    `min_members` conformers.

    Args:
      num_atoms, num_grid: (M,) real atoms and grid points per conformer.
      cost: cost(atoms, grid) -> float, the work of one padded molecule slot.

    Returns:
      Ascending atom bounds; the last is max(num_atoms).
    """
    n_atoms = np.asarray(num_atoms, dtype=np.int64).reshape(-1)
    n_grid = np.asarray(num_grid, dtype=np.int64).reshape(-1)
    sizes, inverse = np.unique(n_atoms, return_inverse=True)
    count = np.bincount(inverse, minlength=len(sizes))
    grid_max = np.zeros(len(sizes), np.int64)
    np.maximum.at(grid_max, inverse, n_grid)
    S = len(sizes)
    cum = np.concatenate([[0], np.cumsum(count)])
    seg_grid = np.zeros((S, S), np.int64)  # seg_grid[i, j]: largest grid of sizes i..j
    for i in range(S):
        seg_grid[i, i:] = np.maximum.accumulate(grid_max[i:])

    def seg_cost(i: int, j: int) -> float:  # one bucket of the distinct sizes i..j
        n = int(cum[j + 1] - cum[i])
        if n < min_members:
            return math.inf
        return math.ceil(n / slots) * slots * cost(int(sizes[j]), int(seg_grid[i, j]))

    K = max(1, min(int(max_buckets), S))
    # best[k][j]: the cheapest k buckets covering the sizes 0..j (ending a bucket at j).
    best = np.full((K + 1, S), math.inf)
    back = np.zeros((K + 1, S), np.int64)
    for j in range(S):
        best[1, j] = seg_cost(0, j)
    for k in range(2, K + 1):
        for j in range(S):
            for i in range(1, j + 1):
                c = best[k - 1, i - 1] + seg_cost(i, j)
                if c < best[k, j]:
                    best[k, j], back[k, j] = c, i
    totals = best[1:, S - 1]
    if not np.isfinite(totals).any():  # fewer than min_members conformers: one bucket
        return [int(sizes[-1])]
    k = 1 + int(np.argmin(totals + bucket_cost * np.arange(1, K + 1)))
    bounds, j = [], S - 1
    while k >= 1:
        bounds.append(int(sizes[j]))
        j, k = int(back[k, j]) - 1, k - 1
    return sorted(bounds)


if __name__ == "__main__":  # `python -m dcmtune.data ...`: the CLI lives in data_cli.
    from dcmtune.data_cli import main

    raise SystemExit(main())
