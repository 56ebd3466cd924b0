"""ESP datasets: load and validate `.npz` files, split them, and cut fixed-shape batches.

File format (DESIGN.md section 2; compatible with the mmml DCMNet files), per file M conformers
padded to A atoms and G grid points, real atoms first:

  R (M, A, 3) Angstrom, Z (M, A) int (0 = padding), N (M,) or (M, 1), esp (M, G) Hartree/e,
  vdw_surface or esp_grid (M, G, 3) Angstrom; optional n_grid (M,), mono (M, A) e,
  Dxyz (M, 3) Debye, com (M, 3) Angstrom, Q (M,) e, mol_id (M,).

Everything here is numpy: the sweep driver loads data without starting a JAX backend. Batches
are dicts of arrays with fixed shapes (B, A, ...) and masks, so one compiled step serves a run.
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

from dcmtune.units import BOHR, EANG_TO_DEBYE, EBOHR_TO_DEBYE

__all__ = [
    "DataError",
    "ESPData",
    "load_npz",
    "load_dataset",
    "bundled_dataset_path",
    "concatenate",
    "pad_to",
    "split_indices",
    "split_dataset",
    "split_record",
    "mol_id_source",
    "make_batch",
    "stacked_batches",
]

log = logging.getLogger(__name__)

KNOWN_KEYS = {"R", "Z", "N", "esp", "vdw_surface", "esp_grid", "n_grid", "mono", "Dxyz", "com",
              "Q", "mol_id"}
DEMO_FILE = "demo_esp.npz"



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
            f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[idx])
            for f in dataclasses.fields(self)})

    def checksum(self) -> str:
        """SHA-256 of the arrays, to recognise the same data later (e.g. when ranking)."""
        h = hashlib.sha256()
        for f in dataclasses.fields(self):
            a = getattr(self, f.name)
            h.update(f.name.encode())
            if a is not None:
                h.update(np.ascontiguousarray(a).tobytes() if a.dtype.kind != "U"
                         else "\0".join(a.tolist()).encode())
        return h.hexdigest()


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
    """Checks the arrays of one file against the format and returns an `ESPData`."""

    def fail(key: str, msg: str) -> DataError:
        return DataError(f"{source}: {key}: {msg}")

    # 1. Keys: aliases, required, ignored extras.
    raw = dict(raw)
    if "vdw_surface" not in raw and "esp_grid" in raw:
        raw["vdw_surface"] = raw["esp_grid"]
    for key in ("R", "Z", "N", "esp", "vdw_surface"):
        if key not in raw:
            alias = " (or esp_grid)" if key == "vdw_surface" else ""
            raise fail(key, f"required key missing{alias}; file has {sorted(raw)}")
    extra = sorted(set(raw) - KNOWN_KEYS)
    if extra:
        log.info("%s: ignoring keys %s", source, ", ".join(extra))

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
    esp = _as_float(raw["esp"], "esp", fail)
    if esp.ndim != 2 or esp.shape[0] != M:
        raise fail("esp", f"expected shape (M, G) with M = {M}, got {esp.shape}")
    G = esp.shape[1]
    if G == 0:
        raise fail("esp", "expected at least one grid point, got G = 0")
    grid = _as_float(raw["vdw_surface"], "vdw_surface", fail)
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

    # 4. Grid counts.
    if "n_grid" in raw:
        n_grid = np.asarray(raw["n_grid"]).reshape(-1)
        if n_grid.shape != (M,):
            raise fail("n_grid", f"expected shape (M,) with M = {M}, got {raw['n_grid'].shape}")
        if np.any(n_grid > G) or np.any(n_grid < 1):
            raise fail("n_grid", f"expected 1 <= n_grid <= G = {G}, got range "
                                 f"[{n_grid.min()}, {n_grid.max()}]")
        n_grid = n_grid.astype(np.int32)
    else:
        n_grid = np.full(M, G, np.int32)
    grid_mask = np.arange(G)[None, :] < n_grid[:, None]

    # 5. Finite values where they count (padding may hold anything; it is zeroed below).
    _finite(R[real], "R", fail)
    _finite(esp[grid_mask], "esp", fail)
    _finite(grid[grid_mask], "vdw_surface", fail)

    # 6. Optional keys.
    mono = None
    if "mono" in raw:
        mono = _as_float(raw["mono"], "mono", fail)
        if mono.shape != (M, A):
            raise fail("mono", f"expected shape (M, A) = {(M, A)}, got {mono.shape}")
        _finite(mono[real], "mono", fail)
        mono = np.where(real, mono, 0.0).astype(np.float32)
    dipole = None
    if "Dxyz" in raw:
        dipole = _as_float(raw["Dxyz"], "Dxyz", fail)
        if dipole.shape != (M, 3):
            raise fail("Dxyz", f"expected shape (M, 3) = {(M, 3)}, got {dipole.shape}")
        _finite(dipole, "Dxyz", fail)
        scale = {"debye": 1.0, "e_bohr": EBOHR_TO_DEBYE, "e_angstrom": EANG_TO_DEBYE}
        if dipole_units not in scale:
            raise fail("Dxyz", f"dipole_units must be one of {sorted(scale)}, got {dipole_units}")
        dipole = (dipole * scale[dipole_units]).astype(np.float32)
    com = np.zeros((M, 3), np.float32)
    if "com" in raw:
        com = _as_float(raw["com"], "com", fail)
        if com.shape != (M, 3):
            raise fail("com", f"expected shape (M, 3) = {(M, 3)}, got {com.shape}")
        _finite(com, "com", fail)
    Q = np.zeros(M, np.float32)
    if "Q" in raw:
        Q = _as_float(raw["Q"], "Q", fail).reshape(-1)
        if Q.shape != (M,):
            raise fail("Q", f"expected shape (M,) with M = {M}, got {raw['Q'].shape}")
        _finite(Q, "Q", fail)
    if "mol_id" in raw:
        mol_id = np.asarray(raw["mol_id"]).reshape(-1)
        if mol_id.shape != (M,):
            raise fail("mol_id", f"expected shape (M,) with M = {M}, got {raw['mol_id'].shape}")
        mol_id = mol_id.astype(str)
    else:
        mol_id = np.array([f"{Path(source).stem}:{i}" for i in range(M)])
        log.warning("%s: no mol_id; each conformer is its own group, so split_by: molecule "
                    "splits by conformer (conformers of one molecule may land in both training "
                    "and test)", source)

    # 7. Units check: grid points should sit ~1.4-2.0 vdW radii (>= ~1.5 Angstrom) from atoms;
    #    Bohr coordinates make every distance 1.89x too large.
    _warn_if_bohr(R, Z, grid, n_grid, source)

    R = np.where(real[..., None], R, 0.0).astype(np.float32)
    esp = np.where(grid_mask, esp, 0.0).astype(np.float32)
    grid = np.where(grid_mask[..., None], grid, 0.0).astype(np.float32)
    return ESPData(R=R, Z=np.where(real, Z, 0).astype(np.int32), N=N, esp=esp, grid=grid,
                   n_grid=n_grid, mono=mono, dipole=dipole, com=com.astype(np.float32),
                   Q=Q.astype(np.float32), mol_id=mol_id)


def _as_float(a, key, fail) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "fiu":
        raise fail(key, f"expected a numeric array, got dtype {a.dtype}")
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
    """Concatenates datasets, padding to the largest A and G. Optional keys present in only
    some parts are dropped with a warning (a partial reference would bias the loss)."""
    A = max(p.num_atoms for p in parts)
    G = max(p.num_grid for p in parts)
    parts = [pad_to(p, A, G) for p in parts]
    out = {}
    for f in dataclasses.fields(ESPData):
        vals = [getattr(p, f.name) for p in parts]
        if any(v is None for v in vals):
            if any(v is not None for v in vals):
                log.warning("key %s is missing in some files; not used", f.name)
            out[f.name] = None
        else:
            out[f.name] = np.concatenate(vals)
    return ESPData(**out)


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


def mol_id_source(data: ESPData, data_files: Sequence[str | Path] = ()) -> str:
    """"file" when the molecule ids came from the data, "conformer" when a file had none and
    every conformer got its own id (`<file stem>:<index>`, see `validate_arrays`)."""
    stems = {Path(f).stem for f in data_files} or {Path(DEMO_FILE).stem}
    own = [m.rpartition(":") for m in data.mol_id.tolist()]
    synthetic = [stem in stems and idx.isdigit() for stem, _, idx in own]
    return "conformer" if any(synthetic) else "file"


def split_record(data: ESPData, splits: Mapping[str, np.ndarray], **settings) -> dict:
    """The JSON-able record of a split, written next to every run and reused by ranking.

    `mol_id_source` and `guarantee` say what the test split really holds out: whole
    molecules only when the files carry mol_id and split_by is "molecule".
    """
    source = mol_id_source(data, settings.get("data_files") or ())
    by_molecule = settings.get("split_by", "molecule") == "molecule" and source == "file"
    return {
        "mol_id_source": source,
        "guarantee": ("molecules: no mol_id of a held-out split is in training" if by_molecule
                      else "conformers only: conformers of one molecule may be in training "
                      "and in a held-out split"),
        "settings": settings,
        "checksum": data.checksum(),
        "num_conformers": data.num_conformers,
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
