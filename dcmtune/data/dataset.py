"""`ESPData`: a validated ESP dataset in memory, and what is done to it whole.

M conformers padded to A atoms and G grid points, real atoms first (DESIGN.md section 2; files
are read and validated by `dcmtune.data.load`). Operations here keep that layout: `subset`,
`checksum` (to recognise the same data later), `concatenate` (several files), `pad_to` (another
padding, e.g. mmml's 60 atoms x 3,200 points) and `to_arrays` (the arrays of a dcmtune file).
Plain numpy: the sweep driver uses it without importing JAX.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dcmtune.data.file_format import DIPOLE_SCALE, DataError, mono_dipole_ratio

__all__ = [
    "ESPData",
    "DEMO_FILE",
    "bundled_dataset_path",
    "BUNDLED",
    "is_bundled_name",
    "data_file_path",
    "mol_id_source",
    "dipole_ratio",
    "concatenate",
    "to_arrays",
    "pad_to",
]

log = logging.getLogger(__name__)

DEMO_FILE = "demo_esp.npz"
# The data sets shipped with the package (dcmtune/datasets/): a name in data_files, a spec's
# data.data_files or --data stands for its file.
BUNDLED = {"demo": DEMO_FILE, "organic": "organic_esp.npz", "large": "large_esp.npz"}


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
      shell: (M, G) float32 vdW-radius factor of the shell each grid point was generated on
        (the generator's optional key `shell`), 0 where unknown and on padding; or None.
      part: (M,) int32 index of the data file each conformer came from when several were
        loaded together (molecule splits deal each file's molecules on their own), or None.
      `shell` and `part` describe the data without changing it: not part of the checksum.
    """

    R: np.ndarray
    Z: np.ndarray
    N: np.ndarray
    esp: np.ndarray
    grid: np.ndarray
    n_grid: np.ndarray
    mono: np.ndarray | None
    dipole: np.ndarray | None
    com: np.ndarray
    Q: np.ndarray
    mol_id: np.ndarray
    mol_id_source: str = "file"
    shell: np.ndarray | None = None
    part: np.ndarray | None = None

    @property
    def num_conformers(self) -> int:
        return int(self.R.shape[0])

    @property
    def num_atoms(self) -> int:
        return int(self.R.shape[1])

    @property
    def num_grid(self) -> int:
        return int(self.grid.shape[1])

    def subset(self, idx: np.ndarray) -> ESPData:
        """The conformers `idx`, same padding."""
        arrays: dict[str, Any] = {
            name: (None if getattr(self, name) is None else getattr(self, name)[idx])
            for name in _ARRAY_FIELDS
        }
        return dataclasses.replace(self, **arrays)

    def domain(self) -> dict:
        """What a model trained on these conformers has seen, as JSON: the elements (sorted
        atomic numbers), the largest molecule (atoms) and the total charges (e, sorted,
        rounded to 1e-3). Prediction warns outside it (`dcmtune.predict.domain`)."""
        return {
            "elements": sorted(int(z) for z in np.unique(self.Z[self.Z > 0])),
            "max_atoms": int(self.N.max(initial=0)),
            "total_charges": sorted({round(float(q), 3) for q in self.Q}),
        }

    def checksum(self) -> str:
        """SHA-256 of the arrays, to recognise the same data later (e.g. when ranking)."""
        h = hashlib.sha256()
        for name in _CHECKSUM_FIELDS:
            a = getattr(self, name)
            h.update(name.encode())
            if a is not None:
                h.update(
                    np.ascontiguousarray(a).tobytes()
                    if a.dtype.kind != "U"
                    else "\0".join(a.tolist()).encode()
                )
        return h.hexdigest()


_ARRAY_FIELDS = tuple(f.name for f in dataclasses.fields(ESPData) if f.name != "mol_id_source")
_CHECKSUM_FIELDS = tuple(f for f in _ARRAY_FIELDS if f not in ("shell", "part"))


def mol_id_source(parts: Sequence[ESPData]) -> str:
    """The grouping source of several datasets together: theirs if they agree, else "mixed"."""
    sources = {p.mol_id_source for p in parts}
    return sources.pop() if len(sources) == 1 else "mixed"


# --------------------------------------------------------------------------- loading


def bundled_dataset_path(name: str = "demo") -> Path:
    """Path of a data set shipped with the package (package data), from any working
    directory: "demo" (24 molecules x 10 conformers), "organic" (174 x 5, <= 9 heavy atoms) or
    "large" (10-18 heavy atoms x 3; docs/data.md).

    Raises:
      DataError: an unknown name.
    """
    if name not in BUNDLED:
        raise DataError(f"{name}: not a bundled data set; expected one of {', '.join(BUNDLED)}")
    return Path(str(importlib.resources.files("dcmtune.datasets").joinpath(BUNDLED[name])))


def is_bundled_name(entry: str | Path) -> bool:
    """Whether a data file entry names a bundled set (a bare name such as "organic", not a
    path)."""
    return isinstance(entry, str) and entry in BUNDLED


def data_file_path(entry: str | Path) -> Path:
    """The file of a data-file entry: a bundled set's name ("organic"), else the path."""
    return bundled_dataset_path(str(entry)) if is_bundled_name(entry) else Path(entry)


def dipole_ratio(data: ESPData) -> tuple[float, int]:
    """`check_dipole_units`' evidence for a loaded dataset (dipoles already in Debye): the
    median |Dxyz| / |dipole of mono about com| and the number of conformers that voted."""
    if data.dipole is None or data.mono is None:
        return float("nan"), 0
    return mono_dipole_ratio(
        data.dipole.astype(np.float64),
        data.mono.astype(np.float64),
        data.R.astype(np.float64),
        data.Z > 0,
        data.com.astype(np.float64),
    )


def concatenate(parts: Sequence[ESPData]) -> ESPData:
    """Concatenates datasets, padding to the largest A and G (of compact parts: the largest
    real ones). Optional keys present in only some parts are dropped with a warning (a partial
    reference would bias the loss)."""
    A = max(p.num_atoms for p in parts)
    G = max(p.num_grid for p in parts)
    parts = [pad_to(p, A, G) for p in parts]
    out: dict[str, Any] = {}
    # Descriptions, not references: unknown shells are 0; each part keeps its own index.
    if any(p.shell is not None for p in parts):
        out["shell"] = np.concatenate(
            [
                np.zeros((p.num_conformers, G), np.float32) if p.shell is None else p.shell
                for p in parts
            ]
        )
    out["part"] = np.concatenate(
        [np.full(p.num_conformers, i, np.int32) for i, p in enumerate(parts)]
    )
    for name in _CHECKSUM_FIELDS:
        vals = [getattr(p, name) for p in parts]
        if any(v is None for v in vals):
            if any(v is not None for v in vals):
                log.warning("key %s is missing in some files; not used", name)
            out[name] = None
        else:
            out[name] = np.concatenate(vals)
    source = mol_id_source(parts)
    if source == "mixed":
        log.warning(
            "some files have mol_id and some do not (grouped by bond graph): a molecule "
            "in both kinds of file forms two groups, which may land in different splits"
        )
    return ESPData(**out, mol_id_source=source)


def to_arrays(data: ESPData, dipole_units: str = "debye") -> dict[str, np.ndarray]:
    """The arrays of a dcmtune file (DESIGN.md section 2) holding `data`: N as (M,), n_grid,
    Dxyz in `dipole_units` (Debye by default), mol_id as str; mono, Dxyz and shell only where
    present. (`pad_to` first gives another padding, e.g. mmml's 60 atoms x 3,200 points.)"""
    out = {
        "R": data.R,
        "Z": data.Z,
        "N": data.N,
        "esp": data.esp,
        "vdw_surface": data.grid,
        "n_grid": data.n_grid,
        "com": data.com,
        "Q": data.Q,
        "mol_id": data.mol_id,
    }
    if data.mono is not None:
        out["mono"] = data.mono
    if data.dipole is not None:
        out["Dxyz"] = (data.dipole / DIPOLE_SCALE[dipole_units]).astype(np.float32)
    if data.shell is not None:
        out["shell"] = data.shell
    return out


def pad_to(data: ESPData, num_atoms: int, num_grid: int) -> ESPData:
    """The same conformers padded to `num_atoms` atoms and `num_grid` grid points."""
    if num_atoms < data.num_atoms or num_grid < data.num_grid:
        raise ValueError(
            f"pad_to: cannot shrink (A, G) = {(data.num_atoms, data.num_grid)} to "
            f"{(num_atoms, num_grid)}"
        )
    da, dg = num_atoms - data.num_atoms, num_grid - data.num_grid

    def pad(a, axis_pad):
        if a is None:
            return None
        width = [(0, 0)] * a.ndim
        for axis, n in axis_pad:
            width[axis] = (0, n)
        return np.pad(a, width)

    return dataclasses.replace(
        data,
        R=pad(data.R, [(1, da)]),
        Z=pad(data.Z, [(1, da)]),
        mono=pad(data.mono, [(1, da)]),
        esp=pad(data.esp, [(1, dg)]),
        grid=pad(data.grid, [(1, dg)]),
        shell=pad(data.shell, [(1, dg)]),
    )
