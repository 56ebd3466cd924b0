"""Quantum-chemical ESP data with PySCF (optional extra `qm`: pyscf, ase, rdkit).

For each molecule (an ASE g2 name, an .xyz file or a SMILES, see `dcmtune.conformers`) this
draws conformers, runs an SCF per conformer, and evaluates on Merz-Kollman-style shells:

  * `esp`: the electrostatic potential of the SCF density plus nuclei, Hartree/e;
  * `mono`: ESP-fitted atom-centred charges (least squares, total charge constrained to Q);
  * `Dxyz`: the SCF dipole about the centre of mass, Debye;
  * `mulliken`: Mulliken charges (an extra key the loader ignores; for baselines).

The output is the `.npz` layout of DESIGN.md section 2 plus a provenance JSON. PySCF and ASE
are imported inside the functions that need them, so `import dcmtune.qm` works without the
extra and only generation asks for it.

Grid (Singh & Kollman, J. Comput. Chem. 5, 129 (1984); Besler, Merz & Kollman, J. Comput.
Chem. 11, 431 (1990)): points on spheres of 1.4, 1.6, 1.8 and 2.0 x the van der Waals radius
around every atom at a given density (points/Angstrom^2); points inside any atom's innermost
(1.4 x vdW) sphere are dropped, and at most `max_grid` points are kept by a seeded subsample.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import math
import multiprocessing
import os
import shlex
import time
import warnings
import zlib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from dcmtune import _io
# The least-squares charge fits live with the other classical charge models (re-exported).
from dcmtune.baselines import esp_design_matrix, fit_esp_charges, fit_esp_charges_shared
from dcmtune.grids import VDW_RADII, shell_grid
from dcmtune.units import BOHR, EANG_TO_DEBYE, HARTREE_TO_KCAL

__all__ = [
    "QMError",
    "SCFError",
    "GenerationSettings",
    "MoleculeSpec",
    "load_molecules",
    "check_electrons",
    "make_conformers",
    "center_of_mass",
    "build_mol",
    "run_scf",
    "esp_on_grid",
    "scf_dipole",
    "esp_design_matrix",
    "fit_esp_charges",
    "fit_esp_charges_shared",
    "compute_molecule",
    "generate",
    "to_arrays",
    "check_inputs",
    "check_output",
    "generate_dataset",
    "rebuild_command",
    "provenance_path",
]

log = logging.getLogger(__name__)

EBOHR_TO_DEBYE = EANG_TO_DEBYE * BOHR  # 2.541746 Debye per e*Bohr.
# Environment of the worker processes: one thread for OpenMP (PySCF) and BLAS each. Two
# single-threaded processes beat one two-threaded process (DESIGN.md 3b).
_SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                      "MKL_NUM_THREADS": "1"}
G2_SOURCE = "ase.collections.g2"
_EXTRA_HINT = "install the qm extra: pip install 'dcmtune[qm]'"


class QMError(ValueError):
    """Bad generator input (molecule name, .xyz file, charge/spin, settings)."""


class SCFError(RuntimeError):
    """An SCF calculation failed to converge."""


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
    spin: Optional[int] = None
    conv_tol: float = 1e-10

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
    smiles: Optional[str] = None
    geometry: Optional[str] = None

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
        import ase  # noqa: F401
    except ImportError:
        raise QMError(f"the data generator needs ASE; {_EXTRA_HINT}") from None


def _import_pyscf():
    try:
        import pyscf  # noqa: F401
    except ImportError:
        raise QMError(f"the data generator needs PySCF; {_EXTRA_HINT}") from None


def load_molecules(names: Sequence[str] = (), xyz_files: Sequence[str | Path] = (),
                   smiles: Sequence[str] = (), smiles_files: Sequence[str | Path] = (),
                   seed: int = 0) -> list[MoleculeSpec]:
    """Molecules from ASE g2 names, .xyz files (the first frame of each file), SMILES and
    SMILES files (`dcmtune.conformers.load_smiles`; `seed` seeds their embedding).

    Raises:
      QMError: unknown g2 name, unreadable/empty .xyz file, duplicate molecule names, an
        element without a van der Waals radius, or no molecules at all.
    """
    _import_ase()
    from ase.build import molecule
    from ase.collections import g2
    from ase.io import read

    specs = []
    for name in names:
        if name not in g2.names:
            close = [n for n in g2.names if n.lower() == name.lower()]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise QMError(f"unknown molecule name {name!r}: not in ase.collections.g2{hint}")
        specs.append(_spec(name, molecule(name), G2_SOURCE))
    for path in xyz_files:
        p = Path(path)
        if not p.is_file():
            raise QMError(f"{path}: .xyz file not found")
        try:
            atoms = read(p, index=0, format="xyz")
        except Exception as e:  # ASE raises many types for malformed files; all mean "bad file".
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise QMError(f"{path}: not a readable .xyz file ({msg})") from None
        if len(atoms) == 0:
            raise QMError(f"{path}: .xyz file holds no atoms")
        specs.append(_spec(p.stem, atoms, str(path)))
    if smiles or smiles_files:
        from dcmtune.conformers import load_smiles

        specs += load_smiles(smiles, smiles_files, seed)
    if not specs:
        raise QMError("no molecules given (use --molecules NAME, --xyz FILE, --smiles SMILES "
                      "and/or --smiles-file FILE)")
    seen = set()
    for s in specs:
        if s.name in seen:
            raise QMError(f"molecule {s.name!r} given twice; mol_id must be unique")
        seen.add(s.name)
        missing = sorted({int(z) for z in s.numbers} - set(VDW_RADII))
        if missing:
            raise QMError(f"{s.name}: no van der Waals radius for atomic number(s) {missing}; "
                          f"known: {sorted(VDW_RADII)}")
    return specs


def _spec(name: str, atoms, source: str) -> MoleculeSpec:
    from ase.data import atomic_masses

    numbers = np.asarray(atoms.numbers, dtype=np.int64)
    positions = np.asarray(atoms.positions, dtype=np.float64)
    if not np.all(np.isfinite(positions)):
        raise QMError(f"{source}: non-finite coordinates")
    return MoleculeSpec(name=name, numbers=numbers, positions=positions,
                        masses=np.asarray(atomic_masses[numbers], np.float64), source=source)


def check_electrons(spec: MoleculeSpec, charge: int, spin: Optional[int]) -> int:
    """The electron count of `spec`; raises QMError when `charge`/`spin` cannot fit it."""
    n = int(spec.numbers.sum()) - charge
    if n < 1:
        raise QMError(f"{spec.name}: charge {charge} leaves {n} electrons")
    if spin is None and n % 2:
        raise QMError(f"{spec.name}: odd electron count {n} (charge {charge}); give --spin "
                      "(2S = number of unpaired electrons, e.g. --spin 1)")
    if spin is not None and (n - spin) % 2:
        raise QMError(f"{spec.name}: {n} electrons cannot have spin 2S = {spin}")
    if spin is not None and spin > n:
        raise QMError(f"{spec.name}: spin 2S = {spin} exceeds the {n} electrons")
    return n


# --------------------------------------------------------------------------- geometry, grid


def make_conformers(positions: np.ndarray, num: int, sigma: float, rng: np.random.Generator,
                    min_distance: float = 0.7, max_tries: int = 1000) -> np.ndarray:
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
            raise QMError(f"no conformer with all atom pairs >= {min_distance} Angstrom in "
                          f"{max_tries} draws (sigma {sigma} Angstrom too large?)")
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


# --------------------------------------------------------------------------- SCF, ESP, dipole


def build_mol(numbers: np.ndarray, positions: np.ndarray, basis: str, charge: int = 0,
              spin: Optional[int] = None):
    """A PySCF `Mole` from atomic numbers and positions in Angstrom (quiet)."""
    _import_pyscf()
    from pyscf import gto

    mol = gto.Mole()
    mol.atom = [(int(z), tuple(map(float, p))) for z, p in zip(numbers, positions)]
    mol.unit = "Angstrom"
    mol.basis = basis
    mol.charge = charge
    mol.spin = 0 if spin is None else spin
    mol.verbose = 0
    # PySCF warns (stderr) before raising on an unknown basis; the error below says it all.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mol.build()
        except (KeyError, RuntimeError, ValueError) as e:
            # pyscf's BasisNotFoundError is a RuntimeError; element-basis gaps are KeyErrors.
            msg = " ".join(str(e).split())
            raise QMError(f"cannot build the molecule with basis {basis!r}: {msg}") from None
    for w in caught:
        log.warning("pyscf: %s", w.message)
    return mol


def _make_mf(mol, method: str):
    from pyscf import dft, scf

    if method.upper() == "HF":
        return scf.HF(mol)  # RHF when spin == 0, else UHF.
    mf = dft.KS(mol)
    mf.xc = method
    return mf


def check_method(method: str) -> None:
    """Raises QMError unless `method` is "HF" or a functional PySCF knows."""
    if method.upper() == "HF":
        return
    _import_pyscf()
    from pyscf.dft import libxc

    try:
        libxc.parse_xc(method)
    except (KeyError, ValueError) as e:
        raise QMError(f"method: {method!r} is neither HF nor a known functional ({e})") from None


def run_scf(mol, method: str = "HF", conv_tol: float = 1e-10, dm0=None):
    """Runs the SCF; returns (mf, total density matrix (nao, nao) in the AO basis).

    Args:
      dm0: initial guess (e.g. the previous conformer's density); None = PySCF's default.

    Raises:
      SCFError: if neither DIIS nor the second-order solver converges.
    """
    mf = _make_mf(mol, method)
    mf.conv_tol = conv_tol
    mf.verbose = 0
    mf.kernel(dm0=dm0)
    if not mf.converged:
        log.info("SCF not converged with DIIS; trying the second-order solver")
        mf = mf.newton()
        mf.kernel(dm0=mf.make_rdm1())
        if not mf.converged:
            raise SCFError(f"SCF ({method}/{mol.basis}) did not converge")
    dm = np.asarray(mf.make_rdm1())
    if dm.ndim == 3:  # unrestricted: alpha + beta.
        dm = dm[0] + dm[1]
    return mf, dm


def esp_on_grid(mol, dm: np.ndarray, grid: np.ndarray, block_size: Optional[int] = None
                ) -> np.ndarray:
    """Electrostatic potential of the nuclei and the electron density at grid points.

    V(g) = sum_A Z_A / |g - R_A| - sum_ij D_ij <i| 1/|r - g| |j>, atomic units. PySCF's grid
    integrals take Bohr even when the molecule was built in Angstrom, so the grid is converted
    first. The electronic part is one batched `int1e_grids` call per block of points.

    Args:
      mol: PySCF `Mole`.
      dm: (nao, nao) total density matrix.
      grid: (G, 3) points, Angstrom.
      block_size: points per integral call; default keeps a block's integrals near 32 MB.

    Returns:
      (G,) ESP in Hartree/e.
    """
    grid_bohr = np.asarray(grid, np.float64) / BOHR  # Shape (G, 3).
    # 1. Nuclei (atom_coords() are Bohr).
    d = np.linalg.norm(grid_bohr[:, None, :] - mol.atom_coords()[None, :, :], axis=-1)
    v_nuc = (mol.atom_charges()[None, :] / d).sum(axis=1)  # Shape (G,).
    # 2. Electrons, in blocks of one batched integral each.
    nao = mol.nao_nr()
    if block_size is None:
        block_size = max(1, 4_000_000 // (nao * nao))
    v_el = np.empty(len(grid_bohr))
    for start in range(0, len(grid_bohr), block_size):
        block = grid_bohr[start:start + block_size]
        ints = mol.intor("int1e_grids", grids=block)  # Shape (g, nao, nao).
        v_el[start:start + len(block)] = np.einsum("gij,ij->g", ints, dm)
    return v_nuc - v_el


def scf_dipole(mol, dm: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Dipole of nuclei + electron density about `origin` (Angstrom), in Debye.

    The same quantity as PySCF's `mf.dip_moment(origin=origin / BOHR)`.
    """
    origin_bohr = np.asarray(origin, np.float64) / BOHR
    with mol.with_common_orig(origin_bohr):
        r = mol.intor_symmetric("int1e_r", comp=3)  # Shape (3, nao, nao), Bohr.
    electrons = np.einsum("xij,ji->x", r, dm)
    nuclei = np.einsum("a,ax->x", mol.atom_charges(), mol.atom_coords() - origin_bohr)
    return (nuclei - electrons) * EBOHR_TO_DEBYE


# --------------------------------------------------------------------------- one molecule


def _molecule_seed(seed: int, name: str) -> np.random.SeedSequence:
    """Each molecule's stream depends on (seed, name) only: not on order or worker count."""
    return np.random.SeedSequence([seed, zlib.crc32(name.encode())])


def compute_molecule(spec: MoleculeSpec, settings: GenerationSettings) -> dict:
    """All conformers of one molecule (runs inside a worker process).

    Returns:
      dict of per-conformer arrays (R, grid, esp, mono, mulliken, Dxyz, com, energy) as lists,
      plus `seconds` (wall time) and `scf_cycles`.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(_molecule_seed(settings.seed, spec.name))
    conformers = make_conformers(spec.positions, settings.conformers, settings.sigma, rng,
                                 settings.min_distance)
    out = {k: [] for k in ("R", "grid", "esp", "mono", "mulliken", "Dxyz", "com", "energy",
                           "scf_cycles")}
    dm = None
    for i, R in enumerate(conformers):
        mol = build_mol(spec.numbers, R, settings.basis, settings.charge, settings.spin)
        try:
            # The previous conformer's density is the guess (same atoms, nearby geometry).
            mf, dm = run_scf(mol, settings.method, settings.conv_tol, dm0=dm)
        except SCFError as e:
            raise SCFError(f"{spec.name} conformer {i}: {e}") from None
        grid = shell_grid(R, spec.numbers, rng, settings.shells, settings.density,
                       settings.max_grid)
        esp = esp_on_grid(mol, dm, grid)
        com = center_of_mass(R, spec.masses)
        _, mulliken = mf.mulliken_pop(verbose=0)
        out["R"].append(R)
        out["grid"].append(grid)
        out["esp"].append(esp)
        out["mono"].append(fit_esp_charges(R, grid, esp, settings.charge))
        out["mulliken"].append(np.asarray(mulliken, np.float64))
        out["Dxyz"].append(scf_dipole(mol, dm, com))
        out["com"].append(com)
        out["energy"].append(float(mf.e_tot))
        out["scf_cycles"].append(int(getattr(mf, "cycles", -1)))
    out["seconds"] = time.perf_counter() - t0
    return out


def _init_worker() -> None:
    os.environ.update(_SINGLE_THREAD_ENV)
    from pyscf import lib

    lib.num_threads(1)


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """Temporarily sets environment variables (inherited by processes started meanwhile)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def generate(specs: Sequence[MoleculeSpec], settings: GenerationSettings, workers: int = 2,
             progress: Optional[Callable[[str, int], None]] = None) -> list[dict]:
    """Computes every molecule; returns `compute_molecule` results in the order of `specs`.

    Args:
      workers: processes, each single-threaded (OpenMP and BLAS); molecules are dealt out
        largest first. 0 runs in this process (for debugging; threads as configured).
      progress: called as progress(name, num_conformers) when a molecule finishes.

    Raises:
      QMError: bad settings/inputs (checked for every molecule before any SCF).
      SCFError: an SCF did not converge.
    """
    check_inputs(specs, settings, workers)  # fail fast, before any compute.
    results: list[Optional[dict]] = [None] * len(specs)
    if workers == 0:
        for i, spec in enumerate(specs):
            results[i] = compute_molecule(spec, settings)
            if progress:
                progress(spec.name, settings.conformers)
        return results
    # Largest molecules first keeps both workers busy until the end.
    order = sorted(range(len(specs)), key=lambda i: -int(specs[i].numbers.sum()))
    # Spawned workers inherit the single-thread environment before NumPy/PySCF load their
    # BLAS/OpenMP runtimes (setting it inside a worker would come too late for BLAS).
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(specs)), mp_context=ctx,
                             initializer=_init_worker) as pool:
        with _environment(_SINGLE_THREAD_ENV):
            futures = {pool.submit(compute_molecule, specs[i], settings): i for i in order}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = futures[fut]
                    results[i] = fut.result()
                    if progress:
                        progress(specs[i].name, settings.conformers)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
    return results


# --------------------------------------------------------------------------- output


def to_arrays(specs: Sequence[MoleculeSpec], results: Sequence[dict],
              settings: GenerationSettings) -> dict[str, np.ndarray]:
    """The DESIGN.md section 2 arrays (padded, real atoms first, float32) plus the extra keys
    `mulliken` (M, A) e and `scf_energy` (M,) Hartree."""
    M = sum(len(r["R"]) for r in results)
    A = max(len(s.numbers) for s in specs)
    G = max(len(g) for r in results for g in r["grid"])
    f32 = np.float32
    out = {"R": np.zeros((M, A, 3), f32), "Z": np.zeros((M, A), np.int32),
           "N": np.zeros(M, np.int32), "esp": np.zeros((M, G), f32),
           "vdw_surface": np.zeros((M, G, 3), f32), "n_grid": np.zeros(M, np.int32),
           "mono": np.zeros((M, A), f32), "Dxyz": np.zeros((M, 3), f32),
           "com": np.zeros((M, 3), f32), "Q": np.full(M, settings.charge, f32),
           "mol_id": np.array([s.name for s, r in zip(specs, results) for _ in r["R"]]),
           "mulliken": np.zeros((M, A), f32), "scf_energy": np.zeros(M, np.float64)}
    m = 0
    for spec, res in zip(specs, results):
        n = len(spec.numbers)
        for c in range(len(res["R"])):
            g = len(res["grid"][c])
            out["R"][m, :n] = res["R"][c]
            out["Z"][m, :n] = spec.numbers
            out["N"][m] = n
            out["esp"][m, :g] = res["esp"][c]
            out["vdw_surface"][m, :g] = res["grid"][c]
            out["n_grid"][m] = g
            out["mono"][m, :n] = res["mono"][c]
            out["mulliken"][m, :n] = res["mulliken"][c]
            out["Dxyz"][m] = res["Dxyz"][c]
            out["com"][m] = res["com"][c]
            out["scf_energy"][m] = res["energy"][c]
            m += 1
    return out


def molecule_records(specs: Sequence[MoleculeSpec], results: Sequence[dict]) -> list[dict]:
    """Per-molecule provenance: source, formula, timings, conformer energies, grid sizes."""
    rows = []
    for spec, res in zip(specs, results):
        e = np.asarray(res["energy"])
        above = (e[1:] - e[0]) * HARTREE_TO_KCAL if len(e) > 1 else np.zeros(0)
        rows.append({
            "mol_id": spec.name,
            "source": spec.source,
            "formula": spec.formula,
            "atoms": int(len(spec.numbers)),
            "conformers": int(len(e)),
            "seconds": round(float(res["seconds"]), 3),
            "seconds_per_conformer": round(float(res["seconds"]) / len(e), 3),
            "scf_cycles": res["scf_cycles"],
            "energy_equilibrium_hartree": float(e[0]),
            "energy_above_equilibrium_kcal_mol": {
                "mean": round(float(above.mean()), 3) if len(above) else 0.0,
                "max": round(float(above.max()), 3) if len(above) else 0.0},
            "grid_points": {"min": int(min(len(g) for g in res["grid"])),
                            "max": int(max(len(g) for g in res["grid"]))},
            **({"smiles": spec.smiles, "geometry": spec.geometry} if spec.smiles else {}),
        })
    return rows


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the numbers."""
    import importlib.metadata
    import platform

    out = {"python": platform.python_version()}
    for pkg in ("dcmtune", "numpy", "pyscf", "ase", "rdkit"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def provenance_path(out: str | Path) -> Path:
    """The provenance JSON next to a dataset: `x.npz` -> `x.provenance.json`."""
    out = Path(out)
    return out.with_name(out.name[:-4] + ".provenance.json" if out.name.endswith(".npz")
                         else out.name + ".provenance.json")


def rebuild_command(names: Sequence[str], xyz_files: Sequence[str | Path],
                    settings: GenerationSettings, out: str | Path, workers: int,
                    smiles: Sequence[str] = (), smiles_files: Sequence[str | Path] = ()
                    ) -> Optional[str]:
    """The shell command that regenerates a dataset with these settings, or None when a
    setting the CLI does not expose (shells, min_distance, conv_tol) differs from its default.
    """
    default = GenerationSettings()
    if any(getattr(settings, k) != getattr(default, k)
           for k in ("shells", "min_distance", "conv_tol")):
        return None
    args = ["python", "-m", "dcmtune.data", "generate"]
    if names:
        args += ["--molecules", *names]
    if xyz_files:
        args += ["--xyz", *map(str, xyz_files)]
    if smiles:
        args += ["--smiles", *smiles]
    if smiles_files:
        args += ["--smiles-file", *map(str, smiles_files)]
    args += ["--conformers", str(settings.conformers), "--method", settings.method,
             "--basis", settings.basis, "--sigma", repr(settings.sigma),
             "--density", repr(settings.density), "--max-grid", str(settings.max_grid),
             "--seed", str(settings.seed), "--charge", str(settings.charge)]
    if settings.spin is not None:
        args += ["--spin", str(settings.spin)]
    args += ["--workers", str(workers), "--out", str(out)]
    return shlex.join(args)


def check_output(out: str | Path) -> Path:
    """Raises QMError unless `out` is a writable-looking .npz path."""
    out = Path(out)
    if out.suffix != ".npz":
        raise QMError(f"{out}: the output file name must end in .npz")
    if not out.parent.is_dir():
        raise QMError(f"{out}: directory {out.parent} does not exist")
    return out


def check_inputs(specs: Sequence[MoleculeSpec], settings: GenerationSettings,
                 workers: int = 2) -> None:
    """Every check that can fail before any SCF: method, basis, electrons, workers.

    Raises:
      QMError: naming the molecule and the problem.
    """
    if workers < 0:
        raise QMError(f"workers: expected >= 0, got {workers}")
    if not specs:
        raise QMError("no molecules given")
    check_method(settings.method)
    from dcmtune.conformers import check_not_reserved

    check_not_reserved(specs)
    for spec in specs:
        if spec.smiles is not None and (settings.charge or settings.spin):
            raise QMError(f"{spec.name}: SMILES inputs are neutral closed-shell molecules; "
                          "drop --charge/--spin")
        check_electrons(spec, settings.charge, settings.spin)
        build_mol(spec.numbers, spec.positions, settings.basis, settings.charge, settings.spin)


def generate_dataset(out: str | Path, specs: Sequence[MoleculeSpec],
                     settings: GenerationSettings = GenerationSettings(), workers: int = 2,
                     progress: Optional[Callable[[str, int], None]] = None) -> dict:
    """Generates a dataset file `out` (.npz) and its provenance JSON; returns the provenance.

    All inputs are checked before any SCF runs; nothing is written unless everything succeeds
    (both files are written to temporary names, then renamed).

    Args:
      out: the .npz path; the provenance goes to `provenance_path(out)`.
      specs: from `load_molecules`.
      workers: see `generate`.
      progress: see `generate`.

    Raises:
      QMError: bad inputs (charge/spin, basis, method, output path).
      SCFError: an SCF did not converge.
    """
    from dcmtune.data import load_npz

    out = check_output(out)
    check_inputs(specs, settings, workers)
    t0 = time.perf_counter()
    results = generate(specs, settings, workers=workers, progress=progress)
    wall = time.perf_counter() - t0
    arrays = to_arrays(specs, results, settings)
    _io.atomic_write(out, lambda f: np.savez_compressed(f, **arrays))
    checksum = load_npz([out]).checksum()  # also proves the file loads.
    provenance = _provenance(out, specs, results, settings, workers, wall, checksum)
    _io.write_text(provenance_path(out), json.dumps(provenance, indent=1) + "\n")
    return provenance


def _provenance(out: Path, specs, results, settings: GenerationSettings, workers: int,
                wall: float, checksum: str) -> dict:
    names = [s.name for s in specs if s.source == G2_SOURCE]
    xyz_files = [s.source for s in specs if s.source != G2_SOURCE and s.smiles is None]
    smiles = [s.smiles for s in specs if s.smiles is not None and s.source == "smiles"]
    smiles_files = list(dict.fromkeys(s.source for s in specs if s.smiles is not None
                                      and s.source != "smiles"))
    M = sum(len(r["R"]) for r in results)
    scf = "RHF (UHF if spin > 0)" if settings.method.upper() == "HF" else "RKS (UKS if spin > 0)"
    return {
        "file": out.name,
        "format": "dcmtune ESP .npz, DESIGN.md section 2 (mmml DCMNet compatible)",
        "command": rebuild_command(names, xyz_files, settings, out, workers, smiles,
                                   smiles_files),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "data_checksum": checksum,
        "settings": dataclasses.asdict(settings),
        "qm": {"code": "PySCF", "method": settings.method, "basis": settings.basis,
               "scf": f"{scf}, conv_tol {settings.conv_tol} Hartree; initial guess: PySCF's "
                      "default for conformer 0, then the previous conformer's density"},
        "conformers": {"first": "the input (equilibrium) geometry; for SMILES inputs see "
                                "molecules[].geometry",
                       "others": f"Gaussian displacement, sigma {settings.sigma} Angstrom per "
                                 "coordinate, redrawn if any atom pair is closer than "
                                 f"{settings.min_distance} Angstrom",
                       "seed": f"numpy SeedSequence([seed, crc32(mol_id)]), seed {settings.seed}"},
        "grid": {"kind": "Merz-Kollman shells (golden-spiral points on spheres)",
                 "shells_vdw_factor": list(settings.shells),
                 "density_points_per_A2": settings.density,
                 "exclusion": f"points inside any atom's {min(settings.shells)} x vdW sphere "
                              "dropped",
                 "max_grid": settings.max_grid,
                 "subsample": "uniform without replacement (seeded) when more points survive",
                 "vdw_radii_angstrom": {str(k): v for k, v in sorted(VDW_RADII.items())}},
        "keys": {
            "R": "(M, A, 3) Angstrom", "Z": "(M, A) int", "N": "(M,)",
            "esp": "(M, G) Hartree/e: nuclei + SCF electron density (int1e_grids)",
            "vdw_surface": "(M, G, 3) Angstrom", "n_grid": "(M,)",
            "mono": "(M, A) e: ESP-fitted least-squares atom-centred charges per conformer, "
                    "total charge constrained to Q (Lagrange multiplier); not Mulliken, not RESP",
            "Dxyz": "(M, 3) Debye: SCF dipole (nuclei + electron density) about com",
            "com": "(M, 3) Angstrom: centre of mass (standard atomic weights)",
            "Q": "(M,) e", "mol_id": "(M,) str: molecule name",
            "mulliken": "(M, A) e: Mulliken charges (extra key, for baselines)",
            "scf_energy": "(M,) Hartree: SCF total energy (extra key)"},
        "versions": package_versions(),
        "timing": {"wall_seconds": round(wall, 1), "workers": workers,
                   "cpus": os.cpu_count(), "conformers": M,
                   "conformers_per_hour": round(M / wall * 3600.0, 1),
                   "note": "wall time of the SCF/ESP stage (all processes)"},
        "molecules": molecule_records(specs, results),
    }
