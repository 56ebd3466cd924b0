"""Writes the real geometries of bench/scaling.py: RDKit conformers of drug-like molecules.

Four sets of about 10, 20, 40 and 60 atoms (hydrogens included), three molecules each, none of them
in dcmtune/datasets/reserved_molecules.txt (checked here). Each molecule: ETKDGv3 embeddings
(seeded, one thread), each optimised with MMFF94, the CONFORMERS lowest-energy distinct ones
kept (heavy-atom RMSD > 0.1 A after alignment; a rigid molecule with fewer is filled up with
copies of them displaced by N(0, 0.025 A) per coordinate, as dcmtune's generator draws
conformers), written as one multi-frame .xyz file whose
comment lines give the name, SMILES and MMFF energy (kcal/mol). The geometries depend on the
RDKit version only; the committed files were written with RDKit 2026.09.1.

  python bench/molecules/make_molecules.py   (needs the `qm` extra: RDKit)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CONFORMERS = 16
EMBEDDINGS = 60
SEED = 24

# set -> (name, SMILES); atom counts with hydrogens in the comments.
MOLECULES = {
    "drug10": (
        ("hydroxyurea", "NC(=O)NO"),  # CH4N2O2, 9
        ("glycine", "NCC(=O)O"),  # C2H5NO2, 10
        ("cysteamine", "NCCS"),  # C2H7NS, 11
    ),
    "drug20": (
        ("amphetamine", "CC(N)Cc1ccccc1"),  # C9H13N, 23
        ("ethosuximide", "CCC1(C)CC(=O)NC1=O"),  # C7H11NO2, 21
        ("metronidazole", "Cc1ncc([N+](=O)[O-])n1CCO"),  # C6H9N3O3, 21
    ),
    "drug40": (
        ("lidocaine", "CCN(CC)CC(=O)Nc1c(C)cccc1C"),  # C14H22N2O, 39
        ("propranolol", "CC(C)NCC(O)COc1cccc2ccccc12"),  # C16H21NO2, 40
        ("diphenhydramine", "CN(C)CCOC(c1ccccc1)c1ccccc1"),  # C17H21NO, 40
    ),
    "drug60": (
        ("tamoxifen", "CC/C(=C(\\c1ccccc1)c1ccc(OCCN(C)C)cc1)c1ccccc1"),  # C26H29NO, 57
        ("donepezil", "COc1cc2c(cc1OC)C(=O)C(CC1CCN(Cc3ccccc3)CC1)C2"),  # C24H29NO3, 57
        ("sildenafil", "CCCc1nn(C)c2c(=O)[nH]c(-c3cc(S(=O)(=O)N4CCN(C)CC4)ccc3OCC)nc12"),  # 63
    ),
}


def conformers(smiles: str, seed: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(atomic numbers, (C, A, 3) positions, (C,) MMFF energies) of the lowest-energy distinct
    conformers."""
    from rdkit import Chem
    from rdkit.Chem import rdDistGeom, rdMolAlign
    from rdkit.Chem import rdForceFieldHelpers as ff

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = rdDistGeom.ETKDGv3()
    params.randomSeed, params.numThreads = seed, 1
    ids = list(rdDistGeom.EmbedMultipleConfs(mol, EMBEDDINGS, params))
    results = ff.MMFFOptimizeMoleculeConfs(mol, numThreads=1, maxIters=5000)
    energies = np.array([e for _, e in results])
    heavy = Chem.RemoveHs(mol)
    kept: list[int] = []
    for i in np.argsort(energies):
        if all(rdMolAlign.GetBestRMS(heavy, heavy, ids[j], ids[int(i)]) > 0.1 for j in kept):
            kept.append(int(i))
        if len(kept) == CONFORMERS:
            break
    numbers = [a.GetAtomicNum() for a in mol.GetAtoms()]
    positions = np.stack([mol.GetConformer(ids[i]).GetPositions() for i in kept])
    rng = np.random.default_rng(seed)
    extra = [positions[i % len(kept)] for i in range(CONFORMERS - len(kept))]
    if extra:
        positions = np.concatenate(
            [positions, extra + rng.normal(scale=0.025, size=(len(extra),) + positions.shape[1:])]
        )
    return numbers, positions, energies[[kept[i % len(kept)] for i in range(len(positions))]]


def write_xyz(path: Path, name: str, smiles: str, numbers, positions, energies) -> None:
    from ase.data import chemical_symbols

    lines = []
    for R, e in zip(positions, energies, strict=True):
        lines += [str(len(numbers)), f"{name} {smiles} mmff_kcal_mol={e:.4f}"]
        lines += [
            f"{chemical_symbols[z]:<2} {x:12.6f} {y:12.6f} {w:12.6f}"
            for z, (x, y, w) in zip(numbers, R, strict=True)
        ]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    from dcmtune.qm.conformers import graph_key, parse_smiles, reserved_molecules

    reserved = reserved_molecules()
    for group, molecules in MOLECULES.items():
        (HERE / group).mkdir(exist_ok=True)
        for k, (name, smiles) in enumerate(molecules):
            if graph_key(parse_smiles(smiles, name)) in reserved:
                raise SystemExit(f"{name}: reserved for independent evaluation")
            numbers, positions, energies = conformers(smiles, SEED + k)
            write_xyz(HERE / group / f"{name}.xyz", name, smiles, numbers, positions, energies)
            print(f"{group}/{name}.xyz: {len(numbers)} atoms, {len(positions)} conformers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
