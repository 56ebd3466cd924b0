"""One molecule's quantum chemistry with PySCF: SCF, ESP on the grid, dipole, fitted charges.

For each conformer of a molecule (`compute_molecule`, run inside a worker process):

  * `esp`: the electrostatic potential of the SCF density plus nuclei at the grid points,
    Hartree/e (`esp_on_grid`: PySCF's grid integrals take Bohr, so the grid is converted);
  * `mono`: ESP-fitted atom-centred charges (least squares, total charge constrained to Q);
  * `Dxyz`: the SCF dipole about the centre of mass, Debye;
  * `mulliken`: Mulliken charges (an extra key the loader ignores; for baselines).

Grid (Singh & Kollman, J. Comput. Chem. 5, 129 (1984); Besler, Merz & Kollman, J. Comput.
Chem. 11, 431 (1990)): points on spheres of 1.4, 1.6, 1.8 and 2.0 x the van der Waals radius
around every atom (`dcmtune.data.grids.shell_grid`). PySCF is imported inside the functions.
"""

from __future__ import annotations

import importlib
import logging
import time
import warnings

import numpy as np

from dcmtune.data.baselines import fit_esp_charges
from dcmtune.data.grids import shell_grid_with_shells
from dcmtune.qm.specs import (
    _EXTRA_HINT,
    GenerationSettings,
    MoleculeSpec,
    QMError,
    SCFError,
    center_of_mass,
    make_conformers,
    molecule_seed,
)
from dcmtune.units import BOHR, EBOHR_TO_DEBYE

__all__ = [
    "build_mol",
    "check_method",
    "check_auxbasis",
    "run_scf",
    "esp_on_grid",
    "scf_dipole",
    "compute_molecule",
]

log = logging.getLogger(__name__)


def _import_pyscf():
    try:
        importlib.import_module("pyscf")
    except ImportError:
        raise QMError(f"the data generator needs PySCF; {_EXTRA_HINT}") from None


# --------------------------------------------------------------------------- SCF, ESP, dipole


def build_mol(
    numbers: np.ndarray, positions: np.ndarray, basis: str, charge: int = 0, spin: int | None = None
):
    """A PySCF `Mole` from atomic numbers and positions in Angstrom (quiet)."""
    _import_pyscf()
    from pyscf import gto

    mol = gto.Mole()
    mol.atom = [(int(z), tuple(map(float, p))) for z, p in zip(numbers, positions, strict=True)]
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


def _make_mf(mol, method: str, density_fit: str = ""):
    from pyscf import dft, scf

    if method.upper() == "HF":
        mf = scf.HF(mol)  # RHF when spin == 0, else UHF.
    else:
        mf = dft.KS(mol)
        mf.xc = method
    if density_fit:
        mf = mf.density_fit(auxbasis=density_fit)
    return mf


def check_auxbasis(auxbasis: str, mol) -> None:
    """Raises QMError unless PySCF has the auxiliary basis `auxbasis` for every element of mol."""
    _import_pyscf()
    from pyscf import gto

    for symbol in sorted({mol.atom_pure_symbol(i) for i in range(mol.natm)}):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gto.basis.load(auxbasis, symbol)
        except (KeyError, RuntimeError, ValueError, TypeError):
            raise QMError(
                f"density_fit: PySCF has no auxiliary basis {auxbasis!r} for {symbol}"
            ) from None


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


def run_scf(mol, method: str = "HF", conv_tol: float = 1e-10, dm0=None, density_fit: str = ""):
    """Runs the SCF; returns (mf, total density matrix (nao, nao) in the AO basis).

    Args:
      dm0: initial guess (e.g. the previous conformer's density); None = PySCF's default.
      density_fit: auxiliary basis for RI-JK ("" = exact four-centre integrals).

    Raises:
      SCFError: if neither DIIS nor the second-order solver converges.
    """
    mf = _make_mf(mol, method, density_fit)
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


def esp_on_grid(mol, dm: np.ndarray, grid: np.ndarray, block_size: int | None = None) -> np.ndarray:
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
        block = grid_bohr[start : start + block_size]
        ints = mol.intor("int1e_grids", grids=block)  # Shape (g, nao, nao).
        v_el[start : start + len(block)] = np.einsum("gij,ij->g", ints, dm)
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


def compute_molecule(spec: MoleculeSpec, settings: GenerationSettings) -> dict:
    """All conformers of one molecule (runs inside a worker process).

    Returns:
      dict of per-conformer arrays (R, grid, shell, esp, mono, mulliken, Dxyz, com, energy) as
      lists,
      plus `seconds` (wall time) and `scf_cycles`.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(molecule_seed(settings.seed, spec.name))
    conformers = make_conformers(
        spec.positions, settings.conformers, settings.sigma, rng, settings.min_distance
    )
    out = {
        k: []
        for k in (
            "R",
            "grid",
            "shell",
            "esp",
            "mono",
            "mulliken",
            "Dxyz",
            "com",
            "energy",
            "scf_cycles",
        )
    }
    dm = None
    for i, R in enumerate(conformers):
        mol = build_mol(spec.numbers, R, settings.basis, settings.charge, settings.spin)
        try:
            # The previous conformer's density is the guess (same atoms, nearby geometry).
            mf, dm = run_scf(
                mol, settings.method, settings.conv_tol, dm0=dm, density_fit=settings.density_fit
            )
        except SCFError as e:
            raise SCFError(f"{spec.name} conformer {i}: {e}") from None
        grid, shell = shell_grid_with_shells(
            R, spec.numbers, rng, settings.shells, settings.density, settings.max_grid
        )
        esp = esp_on_grid(mol, dm, grid)
        com = center_of_mass(R, spec.masses)
        _, mulliken = mf.mulliken_pop(verbose=0)
        out["R"].append(R)
        out["grid"].append(grid)
        out["shell"].append(shell)
        out["esp"].append(esp)
        out["mono"].append(fit_esp_charges(R, grid, esp, settings.charge))
        out["mulliken"].append(np.asarray(mulliken, np.float64))
        out["Dxyz"].append(scf_dipole(mol, dm, com))
        out["com"].append(com)
        out["energy"].append(float(mf.e_tot))
        out["scf_cycles"].append(int(getattr(mf, "cycles", -1)))
    out["seconds"] = time.perf_counter() - t0
    return out
