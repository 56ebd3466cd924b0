"""SMILES input for the ESP generator: RDKit molecules, 3D geometries, identity, reserved set.

A SMILES string becomes a `dcmtune.qm.specs.MoleculeSpec` in four steps:

  1. parse (RDKit, sanitised), refuse charged or open-shell molecules, add explicit hydrogens;
  2. embed several ETKDGv3 geometries with a seeded `randomSeed` (Riniker & Landrum, J. Chem.
     Inf. Model. 55, 2562 (2015));
  3. optimise each with MMFF94 (UFF where MMFF has no parameters) and keep the lowest-energy
     one: that is the spec's input geometry, conformer 0 of the generator;
  4. the generator then draws the other conformers as today
     (`dcmtune.qm.specs.make_conformers`, Gaussian
     displacements of 0.02-0.03 Angstrom per coordinate).

Identity is the RDKit canonical SMILES with stereo ignored. Molecules listed in
`datasets/reserved_molecules.txt` are kept aside for independent evaluation: `check_not_reserved`
refuses them whatever the input (SMILES, ASE g2 name or .xyz file). Geometry inputs are compared
by their bond graph with explicit hydrogens (bond orders and charges ignored), which a SMILES
determines as well, so `--molecules CH3CHO` is refused like `--smiles CC=O`.

RDKit is imported inside the functions (it comes with the `qm` extra).
"""

from __future__ import annotations

import csv
import importlib.resources
import io
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from dcmtune.qm.specs import _EXTRA_HINT, MoleculeSpec, QMError, molecule_seed

__all__ = [
    "FUNCTIONAL_CLASSES",
    "RESERVED_FILE",
    "SMILES_SOURCE",
    "parse_smiles",
    "canonical_smiles",
    "graph_key",
    "geometry_key",
    "functional_classes",
    "embed",
    "embed_seed",
    "smiles_spec",
    "read_smiles_file",
    "load_smiles",
    "read_reserved",
    "reserved_molecules",
    "check_not_reserved",
]

log = logging.getLogger(__name__)

RESERVED_FILE = "reserved_molecules.txt"
SMILES_SOURCE = "smiles"  # MoleculeSpec.source of a molecule given with --smiles.
EMBEDDINGS = 10  # ETKDG embeddings per molecule; the lowest force-field energy one is kept.

# Functional classes by SMARTS, matched on the molecule without explicit hydrogens. A molecule
# may belong to several classes (glycine: amines and acids).
FUNCTIONAL_CLASSES: dict[str, tuple[str, ...]] = {
    "alcohols": ("[CX4][OX2H1]",),
    # Ether oxygen: two carbons, not aromatic (furan is a heterocycle), not an ester/acid O.
    "ethers": ("[OX2;!a;!$(O[#6]=[#7,#8,#16])]([#6])[#6]",),
    "aldehydes_ketones": ("[CX3;$([CH2]),$([CH1][#6]),$(C([#6])[#6])]=[OX1]",),
    "acids": ("[CX3](=[OX1])[OX2H1]",),
    "esters": ("[CX3](=[OX1])[OX2H0][#6]",),
    "amides": ("[NX3][CX3]=[OX1]",),
    # Amine nitrogen: bonded to carbon, and only to C/H; not amide, amidine, nitro or aromatic.
    "amines": ("[NX3;!a;!$(N=*);!$(N#*);!$(N~[!#6;!#1]);!$(N-[#6]=[#7,#8,#16]);$(N-[#6])]",),
    "nitriles": ("[#6][CX2]#[NX1]",),
    "halides": ("[#6][F,Cl,Br,I]",),
    "aromatics": ("c1ccccc1",),  # a benzene ring (carbocyclic aromatic)
    "heterocycles": ("[!#6;!#1;R]",),  # a ring holding N, O or S (aromatic or not)
    # Capped amino acids and peptides: an acetyl-capped residue, CH3-C(=O)-N-Calpha-C(=O)-N.
    "peptides": ("[CH3]C(=O)[NX3][CX4][CX3](=O)[NX3]",),
}


def _rdkit():
    try:
        from rdkit import Chem
    except ImportError:
        raise QMError(
            f"SMILES input and the reserved-molecule check need RDKit; {_EXTRA_HINT}"
        ) from None
    return Chem


# --------------------------------------------------------------------------- parsing, identity


def parse_smiles(smiles: str, name: str | None = None):
    """A sanitised RDKit molecule with explicit hydrogens.

    Args:
      smiles: the SMILES string.
      name: for error messages (default: the SMILES).

    Raises:
      QMError: one line naming the input, for invalid SMILES, several fragments, a non-zero
        total charge or unpaired electrons.
    """
    Chem = _rdkit()
    from rdkit import rdBase

    label = f"{name} ({smiles!r})" if name and name != smiles else repr(smiles)
    if not isinstance(smiles, str) or not smiles.strip():
        raise QMError(f"SMILES {label}: empty")
    with rdBase.BlockLogs():  # RDKit would print its own multi-line complaint on stderr.
        mol = Chem.MolFromSmiles(smiles.strip())
    if mol is None:
        raise QMError(f"SMILES {label}: not a valid SMILES (RDKit cannot parse or sanitise it)")
    if len(Chem.GetMolFrags(mol)) > 1:
        raise QMError(
            f"SMILES {label}: {len(Chem.GetMolFrags(mol))} fragments; give one molecule per SMILES"
        )
    charge = Chem.GetFormalCharge(mol)
    if charge:
        raise QMError(f"SMILES {label}: total charge {charge:+d}; only neutral molecules")
    radicals = sum(a.GetNumRadicalElectrons() for a in mol.GetAtoms())
    if radicals:
        raise QMError(
            f"SMILES {label}: {radicals} unpaired electron(s); only closed-shell molecules"
        )
    return Chem.AddHs(mol)


def canonical_smiles(mol) -> str:
    """RDKit canonical SMILES without stereo and without explicit hydrogens (the identity)."""
    Chem = _rdkit()
    if isinstance(mol, str):
        mol = parse_smiles(mol)
    return Chem.MolToSmiles(Chem.RemoveHs(mol), isomericSmiles=False)


def graph_key(mol) -> str:
    """The bond graph with explicit hydrogens as a canonical string: elements and connectivity,
    bond orders, aromaticity and charges ignored.

    A SMILES and a 3D geometry of the same molecule give the same key (for a geometry, bonds come
    from `rdDetermineBonds.DetermineConnectivity`), so the reserved set is recognised in any input.
    """
    Chem = _rdkit()
    rw = Chem.RWMol(mol)  # hydrogens are atoms already (parse_smiles, _geometry_mol).
    for b in rw.GetBonds():
        b.SetBondType(Chem.BondType.SINGLE)
        b.SetIsAromatic(False)
    for a in rw.GetAtoms():
        a.SetFormalCharge(0)
        a.SetIsAromatic(False)
        a.SetNoImplicit(True)
        a.SetNumExplicitHs(0)
        a.SetNumRadicalElectrons(0)
    out = rw.GetMol()
    out.UpdatePropertyCache(strict=False)
    Chem.FastFindRings(out)
    return Chem.MolToSmiles(out, isomericSmiles=False)


def geometry_key(numbers: Sequence[int], positions: np.ndarray) -> str:
    """`graph_key` of a 3D structure: bonds perceived from interatomic distances.

    Args:
      numbers: (A,) atomic numbers, hydrogens included.
      positions: (A, 3) Angstrom.
    """
    return graph_key(_geometry_mol(numbers, positions))


def _geometry_mol(numbers: Sequence[int], positions: np.ndarray):
    """An RDKit molecule with bonds perceived from interatomic distances (no bond orders)."""
    Chem = _rdkit()
    from rdkit.Chem import rdDetermineBonds
    from rdkit.Geometry import Point3D

    rw = Chem.RWMol()
    conf = Chem.Conformer(len(numbers))
    for i, (z, p) in enumerate(zip(numbers, positions, strict=True)):
        rw.AddAtom(Chem.Atom(int(z)))
        conf.SetAtomPosition(i, Point3D(*map(float, p)))
    mol = rw.GetMol()
    mol.AddConformer(conf, assignId=True)
    rdDetermineBonds.DetermineConnectivity(mol)
    return mol


def functional_classes(mol) -> set[str]:
    """The `FUNCTIONAL_CLASSES` names whose SMARTS match `mol` (an RDKit molecule, with or
    without explicit hydrogens, or a SMILES)."""
    Chem = _rdkit()
    if isinstance(mol, str):
        mol = parse_smiles(mol)
    heavy = Chem.RemoveHs(mol)
    return {
        name
        for name, patterns in FUNCTIONAL_CLASSES.items()
        if any(heavy.HasSubstructMatch(_smarts(p)) for p in patterns)
    }


_SMARTS_CACHE: dict = {}


def _smarts(pattern: str):
    if pattern not in _SMARTS_CACHE:
        q = _rdkit().MolFromSmarts(pattern)
        assert q is not None, pattern  # the table above is fixed; a typo is a bug.
        _SMARTS_CACHE[pattern] = q
    return _SMARTS_CACHE[pattern]


# --------------------------------------------------------------------------- geometry


def embed(
    mol, seed: int, num_embeddings: int = EMBEDDINGS, name: str = ""
) -> tuple[np.ndarray, str]:
    """The lowest-energy of `num_embeddings` seeded ETKDGv3 geometries after force-field
    optimisation.

    Args:
      mol: RDKit molecule with explicit hydrogens (`parse_smiles`); the embeddings are added
        to it as conformers.
      seed: RDKit `randomSeed` (0 <= seed < 2**31); the result depends on it and on the RDKit
        version only (one thread).
      name: for error messages.

    Returns:
      ((A, 3) positions in Angstrom in the atom order of `mol`, a description of the method).

    Raises:
      QMError: when RDKit cannot embed the molecule.
    """
    _rdkit()
    from rdkit.Chem import rdDistGeom
    from rdkit.Chem import rdForceFieldHelpers as ff

    params = rdDistGeom.ETKDGv3()
    params.randomSeed = int(seed)
    params.numThreads = 1
    ids = list(rdDistGeom.EmbedMultipleConfs(mol, num_embeddings, params))
    if not ids:
        raise QMError(f"{name or 'molecule'}: RDKit could not embed a 3D geometry")
    if ff.MMFFHasAllMoleculeParams(mol):
        results, method = ff.MMFFOptimizeMoleculeConfs(mol, numThreads=1, maxIters=2000), "MMFF94"
    elif ff.UFFHasAllMoleculeParams(mol):
        results, method = ff.UFFOptimizeMoleculeConfs(mol, numThreads=1, maxIters=2000), "UFF"
    else:
        results, method = [(0, 0.0)] * len(ids), "none"
    energies = [e if not_converged == 0 else np.inf for not_converged, e in results]
    best = int(np.argmin(energies)) if np.isfinite(min(energies)) else 0
    if not np.isfinite(min(energies)):
        log.warning(
            "%s: %s optimisation did not converge; using embedding %d", name, method, ids[best]
        )
    positions = np.array(mol.GetConformer(ids[best]).GetPositions(), np.float64)
    how = f"RDKit ETKDGv3, lowest-energy of {len(ids)} seeded embeddings after " + (
        f"{method} optimisation" if method != "none" else "no force-field optimisation"
    )
    return positions, how


def embed_seed(seed: int, name: str) -> int:
    """RDKit's randomSeed for one molecule: from (seed, name) like the generator's streams."""
    return int(molecule_seed(seed, name).generate_state(1)[0] % (2**31))


def smiles_spec(name: str, smiles: str, seed: int = 0, source: str = SMILES_SOURCE) -> MoleculeSpec:
    """A generator input from a SMILES string: explicit hydrogens, ETKDG + MMFF geometry.

    Args:
      name: the molecule's id (`mol_id`).
      smiles: as given (the atom order, hence the geometry, follows it).
      seed: the run's root seed; the embedding seed is derived from (seed, name).
      source: the .csv path, or `SMILES_SOURCE` for a SMILES given on the command line.
    """
    from ase.data import atomic_masses

    mol = parse_smiles(smiles, name)
    positions, how = embed(mol, embed_seed(seed, name), name=name)
    numbers = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], np.int64)
    return MoleculeSpec(
        name=name,
        numbers=numbers,
        positions=positions,
        masses=np.asarray(atomic_masses[numbers], np.float64),
        source=source,
        smiles=smiles,
        geometry=how,
    )


# --------------------------------------------------------------------------- inputs


def read_smiles_file(path: str | Path) -> list[dict]:
    """Rows of a molecule list: a CSV with columns `name,smiles[,class]`; lines starting with
    `#` and blank lines are comments.

    Returns:
      [{"name", "smiles", "class", "line"}] in file order (`class` "" when absent).

    Raises:
      QMError: missing file, missing columns, empty name or SMILES, duplicate names.
    """
    p = Path(path)
    if not p.is_file():
        raise QMError(f"{path}: SMILES file not found")
    lines = [
        (i, s)
        for i, s in enumerate(p.read_text().splitlines(), 1)
        if s.strip() and not s.lstrip().startswith("#")
    ]
    if not lines:
        raise QMError(f"{path}: no header line (expected columns name,smiles[,class])")
    reader = csv.DictReader(io.StringIO("\n".join(s for _, s in lines)), skipinitialspace=True)
    missing = {"name", "smiles"} - set(reader.fieldnames or ())
    if missing:
        raise QMError(
            f"{path} line {lines[0][0]}: missing column(s) {sorted(missing)}; "
            f"expected name,smiles[,class], got {reader.fieldnames}"
        )
    rows, seen = [], {}
    for (lineno, _), row in zip(lines[1:], reader, strict=True):
        name, smiles = (row.get("name") or "").strip(), (row.get("smiles") or "").strip()
        if not name or not smiles:
            raise QMError(f"{path} line {lineno}: empty name or SMILES")
        if name in seen:
            raise QMError(f"{path} line {lineno}: name {name!r} already on line {seen[name]}")
        seen[name] = lineno
        rows.append(
            {
                "name": name,
                "smiles": smiles,
                "class": (row.get("class") or "").strip(),
                "line": lineno,
            }
        )
    return rows


def load_smiles(
    smiles: Sequence[str] = (), smiles_files: Sequence[str | Path] = (), seed: int = 0
) -> list[MoleculeSpec]:
    """Generator inputs from SMILES strings (mol_id = canonical SMILES) and molecule lists
    (mol_id = the `name` column).

    Raises:
      QMError: a bad file or SMILES (naming file and line), or two inputs that are the same
        molecule (same canonical SMILES).
    """
    items = [(canonical_smiles(parse_smiles(s)), s, SMILES_SOURCE, "--smiles") for s in smiles]
    for path in smiles_files:
        items += [
            (r["name"], r["smiles"], str(path), f"{path} line {r['line']}")
            for r in read_smiles_file(path)
        ]
    specs, seen = [], {}
    for name, s, source, where in items:
        try:
            spec = smiles_spec(name, s, seed, source)
        except QMError as e:
            raise QMError(f"{where}: {e}") from None
        key = canonical_smiles(parse_smiles(s))
        if key in seen:
            raise QMError(
                f"{where}: {name} ({s}) is the same molecule as {seen[key]} "
                f"(canonical SMILES {key})"
            )
        seen[key] = f"{name} ({where})"
        specs.append(spec)
    return specs


# --------------------------------------------------------------------------- reserved set


def read_reserved(path: str | Path) -> dict[str, str]:
    """A reserved-molecule list: `name SMILES` per line, `#` comments. Returns
    {graph_key: "name (canonical SMILES)"}.

    Raises:
      QMError: a line without two fields or with an invalid SMILES.
    """
    out = {}
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2:
            raise QMError(f"{path} line {i}: expected 'name SMILES', got {line.strip()!r}")
        mol = parse_smiles(fields[1], fields[0])
        out[graph_key(mol)] = f"{fields[0]} ({canonical_smiles(mol)})"
    return out


def reserved_molecules() -> dict[str, str]:
    """The package's reserved list (`dcmtune/datasets/reserved_molecules.txt`); see
    `read_reserved`."""
    res = importlib.resources.files("dcmtune.datasets").joinpath(RESERVED_FILE)
    return read_reserved(Path(str(res)))


def check_not_reserved(
    specs: Iterable[MoleculeSpec], reserved: dict[str, str] | None = None
) -> None:
    """Raises QMError for the first spec that is a reserved molecule.

    SMILES inputs are compared by their parsed graph, geometry inputs (g2 names, .xyz files) by
    the graph perceived from their coordinates; both with explicit hydrogens.
    """
    reserved = reserved_molecules() if reserved is None else reserved
    for spec in specs:
        if spec.smiles is not None:
            key = graph_key(parse_smiles(spec.smiles, spec.name))
        else:
            key = geometry_key(spec.numbers, spec.positions)
        if key in reserved:
            raise QMError(
                f"molecule {spec.name!r} ({spec.source}) is {reserved[key]}, reserved "
                f"for independent evaluation ({RESERVED_FILE}); it may not be "
                "generated"
            )
