"""What the ESP generator takes: its settings, one molecule's spec, and its conformers.

`GenerationSettings` (every setting is recorded in the provenance), `MoleculeSpec` (an ASE g2
name, an .xyz file or a SMILES made into atoms and an equilibrium geometry: `dcmtune.qm.inputs`,
`dcmtune.qm.conformers`), the random streams (one per molecule, from (seed, name)), and the
conformers drawn around a geometry. Plain numpy; the `qm` extra (PySCF, ASE, RDKit) is imported
only where a function needs it.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import zlib

import numpy as np

__all__ = [
    "QMError",
    "SCFError",
    "GenerationSettings",
    "MoleculeSpec",
    "G2_SOURCE",
    "check_electrons",
    "make_conformers",
    "center_of_mass",
    "molecule_seed",
]

G2_SOURCE = "ase.collections.g2"
_EXTRA_HINT = "install the qm extra: pip install 'dcmtune[qm]'"


class QMError(ValueError):
    """Bad generator input (molecule name, .xyz file, charge/spin, settings)."""


class SCFError(RuntimeError):
    """An SCF calculation failed to converge."""


class TaskLost(RuntimeError):
    """A molecule's compute task was lost more often than its retries allow (its worker or
    node died); the molecules already finished are kept, so the same command continues."""


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Settings of one generation run; all of them are recorded in the provenance.

    Attributes:
      conformers: conformers per molecule; the first is the input (equilibrium) geometry.
      method: "HF" or a PySCF exchange-correlation functional name (e.g. "B3LYP").
      basis: PySCF basis name.
      sigma: standard deviation of the Gaussian displacement per coordinate, Angstrom.
      min_distance: geometries with an atom pair closer than this (Angstrom) are redrawn.
      shells: sphere radii as multiples of the van der Waals radius.
      density: grid points per Angstrom^2 on each sphere.
      max_grid: at most this many grid points per conformer (seeded subsample).
      seed: root seed; each molecule's stream is derived from (seed, molecule name).
      charge: total charge of every molecule, e.
      spin: 2S = N_alpha - N_beta; None means 0 and refuses odd electron counts.
      conv_tol: SCF energy convergence threshold, Hartree.
      density_fit: auxiliary basis for density-fitted (RI-JK) Coulomb and exchange, e.g.
        "cc-pVDZ-JKFIT"; "" (default) uses exact four-centre integrals. Several times faster
        for molecules of 10+ heavy atoms; docs/data.md gives the ESP difference it makes.
    """

    conformers: int = 10
    method: str = "HF"
    basis: str = "6-31G*"
    sigma: float = 0.025
    min_distance: float = 0.7
    shells: tuple[float, ...] = (1.4, 1.6, 1.8, 2.0)
    density: float = 1.0
    max_grid: int = 1200
    seed: int = 0
    charge: int = 0
    spin: int | None = None
    conv_tol: float = 1e-10
    density_fit: str = ""

    def __post_init__(self):
        if self.conformers < 1:
            raise QMError(f"conformers: expected >= 1, got {self.conformers}")
        if not (self.sigma >= 0 and math.isfinite(self.sigma)):
            raise QMError(f"sigma: expected a finite value >= 0 (Angstrom), got {self.sigma}")
        if not self.shells or any(not (s > 0) for s in self.shells):
            raise QMError(f"shells: expected positive vdW-radius factors, got {self.shells}")
        if not (self.density > 0 and math.isfinite(self.density)):
            raise QMError(f"density: expected points/Angstrom^2 > 0, got {self.density}")
        if self.max_grid < 1:
            raise QMError(f"max_grid: expected >= 1, got {self.max_grid}")
        if self.spin is not None and self.spin < 0:
            raise QMError(f"spin: expected 2S >= 0, got {self.spin}")
        if not self.method.strip() or not self.basis.strip():
            raise QMError("method and basis must be non-empty")


@dataclasses.dataclass(frozen=True)
class MoleculeSpec:
    """One input molecule.

    Attributes:
      name: the molecule's id (`mol_id`): the g2 name or the .xyz file's stem.
      numbers: (A,) atomic numbers.
      positions: (A, 3) equilibrium geometry, Angstrom.
      masses: (A,) atomic masses (standard atomic weights), for the centre of mass.
      source: "ase.collections.g2", the .xyz or .csv path as given, or "smiles".
      smiles: the SMILES as given (SMILES inputs only).
      geometry: how the input geometry was made (SMILES inputs only).
    """

    name: str
    numbers: np.ndarray
    positions: np.ndarray
    masses: np.ndarray
    source: str
    smiles: str | None = None
    geometry: str | None = None

    @property
    def formula(self) -> str:
        from collections import Counter

        from ase.data import chemical_symbols

        c = Counter(chemical_symbols[int(z)] for z in self.numbers)
        order = [e for e in ("C", "H") if e in c] + sorted(e for e in c if e not in ("C", "H"))
        return "".join(f"{e}{c[e] if c[e] > 1 else ''}" for e in order)


# --------------------------------------------------------------------------- inputs


def _import_ase():
    try:
        importlib.import_module("ase")
    except ImportError:
        raise QMError(f"the data generator needs ASE; {_EXTRA_HINT}") from None


def check_electrons(spec: MoleculeSpec, charge: int, spin: int | None) -> int:
    """The electron count of `spec`; raises QMError when `charge`/`spin` cannot fit it."""
    n = int(spec.numbers.sum()) - charge
    if n < 1:
        raise QMError(f"{spec.name}: charge {charge} leaves {n} electrons")
    if spin is None and n % 2:
        raise QMError(
            f"{spec.name}: odd electron count {n} (charge {charge}); give --spin "
            "(2S = number of unpaired electrons, e.g. --spin 1)"
        )
    if spin is not None and (n - spin) % 2:
        raise QMError(f"{spec.name}: {n} electrons cannot have spin 2S = {spin}")
    if spin is not None and spin > n:
        raise QMError(f"{spec.name}: spin 2S = {spin} exceeds the {n} electrons")
    return n


# --------------------------------------------------------------------------- geometry, grid


def make_conformers(
    positions: np.ndarray,
    num: int,
    sigma: float,
    rng: np.random.Generator,
    min_distance: float = 0.7,
    max_tries: int = 1000,
) -> np.ndarray:
    """`num` conformers: the input geometry, then Gaussian displacements of it.

    Args:
      positions: (A, 3) equilibrium geometry, Angstrom.
      sigma: displacement standard deviation per coordinate, Angstrom.
      rng: the random stream (seeded by the caller).
      min_distance: a draw with any atom pair closer than this is rejected and redrawn.

    Returns:
      (num, A, 3), Angstrom; row 0 is `positions`.
    """
    out = [np.asarray(positions, np.float64)]
    tries = 0
    while len(out) < num:
        tries += 1
        if tries > max_tries:
            raise QMError(
                f"no conformer with all atom pairs >= {min_distance} Angstrom in "
                f"{max_tries} draws (sigma {sigma} Angstrom too large?)"
            )
        R = out[0] + rng.normal(scale=sigma, size=out[0].shape)
        if len(R) > 1 and _min_pair_distance(R) < min_distance:
            continue
        out.append(R)
    return np.stack(out)


def _min_pair_distance(R: np.ndarray) -> float:
    d = np.linalg.norm(R[:, None] - R[None], axis=-1)
    return float(d[np.triu_indices(len(R), 1)].min())


def center_of_mass(positions: np.ndarray, masses: np.ndarray) -> np.ndarray:
    """(3,) mass-weighted centre of `positions` (A, 3)."""
    return (masses[:, None] * positions).sum(axis=0) / masses.sum()


# --------------------------------------------------------------------------- one molecule


def molecule_seed(seed: int, name: str) -> np.random.SeedSequence:
    """Each molecule's stream depends on (seed, name) only: not on order or worker count."""
    return np.random.SeedSequence([seed, zlib.crc32(name.encode())])
