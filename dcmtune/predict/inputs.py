"""Reading molecules for prediction: files, ASE atoms, arrays, data sets and SMILES.

Every input becomes a list of `Molecule` (n real atoms, Angstrom), in input order:

* an xyz/extxyz file: every frame (ASE);
* an SDF (`.sdf`, `.sd`, `.mol`): every record (RDKit), its total charge the sum of its formal
  charges, its bond graph kept; a record must hold all its hydrogens and 3D coordinates;
* a Tripos mol2 file: every `@<TRIPOS>MOLECULE` record (read here: elements from the atom
  types, bonds from the `@<TRIPOS>BOND` section), its total charge the rounded sum of its
  partial charges, with a warning when that sum is not integral;
* a `.smi` file (`SMILES [name]` per line, `#` comments) or SMILES strings (`smiles_molecules`):
  RDKit, explicit hydrogens, one ETKDGv3 + MMFF94 geometry (`dcmtune.qm.conformers.embed`),
  recorded with the molecule; the total charge from the formal charges;
* any other file ASE reads (pdb, ...): every frame, total charge 0 unless given;
* a dcmtune `.npz` data file or an `ESPData`: every conformer, with its Q, com, grid, ESP;
* `(Z, R)` arrays; `ase.Atoms`; `Molecule`; or a list mixing these.

A total charge given by the caller overrides what the input says (`total_charges`).
RDKit (the `qm` extra) is needed for SDF and SMILES only.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dcmtune.data.dataset import ESPData
from dcmtune.data.file_format import DataError
from dcmtune.data.load import load_npz

__all__ = [
    "PredictError",
    "Molecule",
    "gather",
    "smiles_molecules",
    "total_charges",
    "SDF_SUFFIXES",
]

SDF_SUFFIXES = (".sdf", ".sd", ".mol")
# A mol2 record's partial charges that sum further than this from an integer get a warning.
INTEGRAL_TOLERANCE = 0.01
_RDKIT_HINT = "install the qm extra: pip install 'dcmtune[qm]'"


class PredictError(ValueError):
    """A model or an input cannot be used; the one-line message names the path or molecule."""


@dataclasses.dataclass(frozen=True)
class Molecule:
    """One input molecule on the host (n real atoms).

    Attributes:
      source: Where it came from ("mol.sdf:3:aspirin", "data.npz:3:H2O", "molecules[2]").
      numbers: (n,) int32 atomic numbers.
      positions: (n, 3) float64, Angstrom.
      charge: The total charge the input states (a data file's Q, SDF formal charges, ...), e;
        None = not stated.
      com: A data file's dipole origin (3,); None = the centre of mass.
      points: A data file's grid (g, 3); reference: its ESP (g,); dipole: its Dxyz (3,).
      bonds: (b, 2) bonded atom pairs when the input gives a graph (SDF, mol2, SMILES), else None.
      smiles: The SMILES it was built from, or None.
      geometry: How its geometry was made when not given (e.g. "RDKit ETKDGv3 ... MMFF94").
      warnings: What the input reader found doubtful (e.g. non-integral partial charges).
    """

    source: str
    numbers: np.ndarray
    positions: np.ndarray
    charge: float | None = None
    com: np.ndarray | None = None
    points: np.ndarray | None = None
    reference: np.ndarray | None = None
    dipole: np.ndarray | None = None
    bonds: np.ndarray | None = None
    smiles: str | None = None
    geometry: str | None = None
    warnings: tuple[str, ...] = ()


def molecule(source: str, Z, R, **data) -> Molecule:
    """A validated Molecule: integer, positive Z (n,) and finite-typed R (n, 3)."""
    Z, R = np.asarray(Z), np.asarray(R)
    if Z.dtype.kind == "f" and np.all(np.isfinite(Z)) and np.all(Z == np.round(Z)):
        Z = Z.astype(np.int64)
    if Z.dtype.kind not in "iu":
        raise PredictError(f"{source}: Z: expected integer atomic numbers, got dtype {Z.dtype}")
    if Z.ndim != 1 or len(Z) == 0:
        raise PredictError(
            f"{source}: Z: expected a non-empty (n,) array of atomic numbers, got shape {Z.shape}"
        )
    if R.dtype.kind not in "fiu" or R.shape != (len(Z), 3):
        raise PredictError(
            f"{source}: R: expected ({len(Z)}, 3) positions in Angstrom, got "
            f"shape {R.shape} dtype {R.dtype}"
        )
    if np.any(Z <= 0):
        k = int(np.argmax(Z <= 0))
        raise PredictError(
            f"{source}: atom {k} has atomic number {int(Z[k])} (a dummy or "
            "charge site 'X'?); expected real elements"
        )
    return Molecule(source, Z.astype(np.int32), R.astype(np.float64), **data)


# --------------------------------------------------------------------------- arrays, data


def _from_data(data: ESPData, source: str) -> list[Molecule]:
    return [
        molecule(
            f"{source}:{i}:{data.mol_id[i]}",
            data.Z[i, :n],
            data.R[i, :n],
            charge=float(data.Q[i]),
            com=data.com[i].astype(np.float64),
            points=data.grid[i, :g],
            reference=data.esp[i, :g],
            dipole=None if data.dipole is None else data.dipole[i],
        )
        for i, (n, g) in enumerate(zip(data.N, data.n_grid, strict=True))
    ]


def _from_arrays(Z, R, source: str) -> list[Molecule]:
    Z, R = np.asarray(Z), np.asarray(R)
    if Z.ndim == 1:
        return [molecule(source, Z, R)]
    if Z.ndim != 2 or R.shape != Z.shape + (3,):
        raise PredictError(
            f"{source}: expected Z (n,) with R (n, 3), or Z (M, A) with R "
            f"(M, A, 3); got {Z.shape} and {R.shape}"
        )
    out = []
    for i in range(len(Z)):
        n = int(np.sum(Z[i] > 0))
        if np.any(Z[i, n:] != 0):
            raise PredictError(f"{source}[{i}]: Z: real atoms must come first (padding is 0)")
        out.append(molecule(f"{source}[{i}]", Z[i, :n], R[i, :n]))
    return out


# --------------------------------------------------------------------------- RDKit: SDF, SMILES


def _rdkit(where: str):
    try:
        from rdkit import Chem
    except ImportError:
        raise PredictError(f"{where}: reading it needs RDKit; {_RDKIT_HINT}") from None
    return Chem


def _rdkit_molecule(mol, source: str, **extra) -> Molecule:
    """A Molecule of an RDKit molecule with explicit hydrogens and one conformer."""
    Chem = _rdkit(source)
    bonds = np.array(
        [(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()], np.int64
    ).reshape(-1, 2)
    return molecule(
        source,
        [a.GetAtomicNum() for a in mol.GetAtoms()],
        mol.GetConformer().GetPositions(),
        charge=float(Chem.GetFormalCharge(mol)),
        bonds=bonds,
        **extra,
    )


def _read_sdf(path: Path) -> list[Molecule]:
    """Every record of an SDF: all atoms, 3D coordinates, formal charges summed."""
    Chem = _rdkit(str(path))
    from rdkit import rdBase

    out = []
    with rdBase.BlockLogs():  # RDKit would print its own multi-line complaints on stderr
        records = list(Chem.SDMolSupplier(str(path), removeHs=False, sanitize=True))
    if not records:
        raise PredictError(f"{path}: holds no SDF records (expected molfile records)")
    for k, mol in enumerate(records):
        if mol is None:
            raise PredictError(f"{path}: record {k} cannot be read by RDKit (not a valid molfile)")
        name = mol.GetProp("_Name").strip() if mol.HasProp("_Name") else ""
        where = f"{path.name}:{k}" + (f":{name}" if name else "")
        implicit = sum(a.GetNumImplicitHs() for a in mol.GetAtoms())
        if implicit:
            raise PredictError(
                f"{path}: record {k} ({name or 'unnamed'}) lacks {implicit} hydrogen(s); "
                "expected every atom with 3D coordinates (add them, e.g. RDKit "
                "Chem.AddHs(mol, addCoords=True))"
            )
        if mol.GetNumConformers() == 0 or not mol.GetConformer().Is3D():
            raise PredictError(
                f"{path}: record {k} ({name or 'unnamed'}) has no 3D coordinates; expected "
                "3D (or give its SMILES)"
            )
        out.append(_rdkit_molecule(mol, where))
    return out


def smiles_molecules(
    smiles: Sequence[str], names: Sequence[str] | None = None, where: str = "--smiles"
) -> list[Molecule]:
    """Molecules from SMILES: explicit hydrogens, one seeded ETKDGv3 geometry after MMFF94
    optimisation (`dcmtune.qm.conformers.embed`; the seed comes from the canonical SMILES, so a
    molecule gets the same geometry in every call), total charge from the formal charges.

    Raises:
      PredictError: an invalid SMILES, several fragments, or no embedding (naming `where`).
    """
    from dcmtune.qm.conformers import embed, embed_seed
    from dcmtune.qm.specs import QMError

    Chem = _rdkit(where)
    from rdkit import rdBase

    names = list(names) if names is not None else list(smiles)
    out = []
    for s, name in zip(smiles, names, strict=True):
        label = f"{where} {s!r}" if where == "--smiles" else f"{where} ({s!r})"
        with rdBase.BlockLogs():
            mol = Chem.MolFromSmiles(s.strip()) if isinstance(s, str) and s.strip() else None
        if mol is None:
            raise PredictError(f"{label}: not a valid SMILES (RDKit cannot parse or sanitise it)")
        if len(Chem.GetMolFrags(mol)) > 1:
            raise PredictError(f"{label}: several fragments; give one molecule per SMILES")
        mol = Chem.AddHs(mol)
        canonical = Chem.MolToSmiles(Chem.RemoveHs(mol))
        try:
            positions, how = embed(mol, embed_seed(0, canonical), num_embeddings=10, name=name)
        except QMError as e:
            raise PredictError(f"{label}: {e}") from None
        conf = mol.GetConformer()
        for i, p in enumerate(positions):
            conf.SetAtomPosition(i, p.tolist())
        out.append(_rdkit_molecule(mol, name, smiles=s.strip(), geometry=how))
    return out


def _read_smi(path: Path) -> list[Molecule]:
    """A SMILES file: `SMILES [name]` per line; blank lines and `#` comments skipped."""
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            rows.append((i, fields[0], " ".join(fields[1:])))
    if not rows:
        raise PredictError(f"{path}: holds no SMILES (expected 'SMILES [name]' per line)")
    out = []
    for k, (i, s, name) in enumerate(rows):
        where = f"{path} line {i}"
        [m] = smiles_molecules([s], [f"{path.name}:{k}" + (f":{name}" if name else "")], where)
        out.append(m)
    return out


# --------------------------------------------------------------------------- mol2


def _mol2_sections(text: str) -> list[dict[str, list[str]]]:
    """Per `@<TRIPOS>MOLECULE` record: {section name: its non-empty lines}."""
    records: list[dict[str, list[str]]] = []
    section = None
    for line in text.splitlines():
        if line.startswith("@<TRIPOS>"):
            section = line[9:].strip().upper()
            if section == "MOLECULE":
                records.append({})
            if records:
                records[-1].setdefault(section, [])
        elif records and section and line.strip() and not line.startswith("#"):
            records[-1][section].append(line)
    return records


def _mol2_record(rec: dict[str, list[str]], path: Path, k: int) -> Molecule:
    from ase.data import atomic_numbers

    head = rec.get("MOLECULE", [])
    name = head[0].strip() if head else ""
    where = f"{path.name}:{k}" + (f":{name}" if name else "")
    Z, R, q = [], [], []
    for line in rec.get("ATOM", []):
        f = line.split()
        element = f[5].split(".")[0].capitalize() if len(f) >= 6 else ""
        if element not in atomic_numbers or atomic_numbers[element] == 0:
            raise PredictError(
                f"{path}: record {k}: atom line {line.strip()!r}: expected 'id name x y z "
                "type [subst_id subst_name charge]' with an element as the type"
            )
        try:
            R.append([float(v) for v in f[2:5]])
            q.append(float(f[8]) if len(f) >= 9 else 0.0)
        except ValueError:
            raise PredictError(
                f"{path}: record {k}: atom line {line.strip()!r}: expected numbers for x y z "
                "and the charge"
            ) from None
        Z.append(atomic_numbers[element])
    if not Z:
        raise PredictError(f"{path}: record {k} ({name or 'unnamed'}) has no @<TRIPOS>ATOM lines")
    try:
        bonds = np.array(
            [[int(v) - 1 for v in line.split()[1:3]] for line in rec.get("BOND", [])], np.int64
        ).reshape(-1, 2)
    except ValueError:
        raise PredictError(f"{path}: record {k}: unreadable @<TRIPOS>BOND line") from None
    total = float(np.sum(q))
    warnings = ()
    if abs(total - round(total)) > INTEGRAL_TOLERANCE:
        warnings = (
            f"mol2 partial charges sum to {total:.4f}, not an integer; total charge taken as "
            f"{round(total):d} (set it with --charge / charge=)",
        )
    return molecule(where, Z, R, charge=float(round(total)), bonds=bonds, warnings=warnings)


def _read_mol2(path: Path) -> list[Molecule]:
    """Every record of a Tripos mol2 file; total charge = the rounded sum of partial charges."""
    records = _mol2_sections(path.read_text(errors="replace"))
    if not records:
        raise PredictError(f"{path}: no @<TRIPOS>MOLECULE record; expected a Tripos mol2 file")
    return [_mol2_record(rec, path, k) for k, rec in enumerate(records)]


# --------------------------------------------------------------------------- files, lists


def _read_ase(path: Path) -> list[Molecule]:
    import ase.io

    try:
        frames = ase.io.read(path, index=":")
    except Exception as e:  # ASE's readers raise many unrelated types for a bad file
        msg = " ".join(str(e).split()) or type(e).__name__
        raise PredictError(f"{path}: ASE cannot read it as molecules ({msg})") from None
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise PredictError(f"{path}: holds no molecules")
    return [molecule(f"{path.name}:{k}", a.numbers, a.positions) for k, a in enumerate(frames)]


def _read_file(path: Path, max_atomic_number: int) -> list[Molecule]:
    if not path.is_file():
        raise PredictError(f"{path}: input file not found")
    if path.stat().st_size == 0:
        raise PredictError(f"{path}: the file is empty; expected molecules")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            return _from_data(load_npz(path, max_atomic_number=max_atomic_number), path.name)
        except DataError as e:
            raise PredictError(str(e)) from None
    readers = {".mol2": _read_mol2, ".smi": _read_smi, **dict.fromkeys(SDF_SUFFIXES, _read_sdf)}
    return readers.get(suffix, _read_ase)(path)


def _is_pair(x) -> bool:
    from ase import Atoms

    return (
        isinstance(x, tuple)
        and len(x) == 2
        and not any(isinstance(v, (Atoms, ESPData, Molecule, str, os.PathLike, tuple)) for v in x)
    )


def gather(x, max_atomic_number: int, where: str) -> list[Molecule]:
    """The input molecules, flattened, in order (see the module docstring)."""
    from ase import Atoms

    if isinstance(x, Molecule):
        return [x]
    if isinstance(x, Atoms):
        return [molecule(where, x.numbers, x.positions)]
    if isinstance(x, (str, os.PathLike)):
        return _read_file(Path(x), max_atomic_number)
    if isinstance(x, ESPData):
        return _from_data(x, where)
    if _is_pair(x):
        return _from_arrays(x[0], x[1], where)
    if isinstance(x, (list, tuple)):
        return [
            m for k, item in enumerate(x) for m in gather(item, max_atomic_number, f"{where}[{k}]")
        ]
    raise PredictError(
        f"{where}: expected ase.Atoms, a file path, ESPData, (Z, R) arrays, a Molecule or a "
        f"list of these; got {type(x).__name__}"
    )


def total_charges(charge, mols: Sequence[Molecule]) -> np.ndarray:
    """(M,) total charges: as given, else what the input states, else 0."""
    if charge is None:
        q = np.array([0.0 if m.charge is None else m.charge for m in mols])
    else:
        q = np.asarray(charge, dtype=np.float64) if not isinstance(charge, bool) else None
        if q is None or q.ndim > 1 or (q.ndim == 1 and len(q) != len(mols)):
            raise PredictError(
                f"charge: expected a number or one per molecule ({len(mols)}), got {charge!r}"
            )
        q = np.broadcast_to(q, (len(mols),))
    if not np.all(np.isfinite(q)):
        raise PredictError(f"charge: expected finite total charges (e), got {charge!r}")
    return q
