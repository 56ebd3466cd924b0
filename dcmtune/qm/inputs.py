"""Generator inputs: molecules from ASE g2 names, .xyz files and SMILES, checked together."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dcmtune.data.grids import VDW_RADII
from dcmtune.qm.conformers import load_smiles
from dcmtune.qm.specs import G2_SOURCE, MoleculeSpec, QMError, _import_ase

__all__ = ["load_molecules"]


def load_molecules(
    names: Sequence[str] = (),
    xyz_files: Sequence[str | Path] = (),
    smiles: Sequence[str] = (),
    smiles_files: Sequence[str | Path] = (),
    seed: int = 0,
) -> list[MoleculeSpec]:
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
        specs += load_smiles(smiles, smiles_files, seed)
    if not specs:
        raise QMError(
            "no molecules given (use --molecules NAME, --xyz FILE, --smiles SMILES "
            "and/or --smiles-file FILE)"
        )
    seen = set()
    for s in specs:
        if s.name in seen:
            raise QMError(f"molecule {s.name!r} given twice; mol_id must be unique")
        seen.add(s.name)
        missing = sorted({int(z) for z in s.numbers} - set(VDW_RADII))
        if missing:
            raise QMError(
                f"{s.name}: no van der Waals radius for atomic number(s) {missing}; "
                f"known: {sorted(VDW_RADII)}"
            )
    return specs


def _spec(name: str, atoms, source: str) -> MoleculeSpec:
    from ase.data import atomic_masses

    numbers = np.asarray(atoms.numbers, dtype=np.int64)
    positions = np.asarray(atoms.positions, dtype=np.float64)
    if not np.all(np.isfinite(positions)):
        raise QMError(f"{source}: non-finite coordinates")
    return MoleculeSpec(
        name=name,
        numbers=numbers,
        positions=positions,
        masses=np.asarray(atomic_masses[numbers], np.float64),
        source=source,
    )
