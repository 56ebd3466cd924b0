"""Density fitting (RI-JK) against exact four-centre integrals for the generator's SCF.

For one molecule (default: the capped dipeptide Ace-Leu-Gly-NMe, 38 atoms, 280 basis functions
at 6-31G*), one thread: the SCF wall time with exact integrals and with `--density-fit AUX`,
their ratio, and the difference of the two ESPs on the generator's grid (1,200 points), in
kcal/mol/e (RMS and largest), beside the ESP's own RMS.

  python bench/density_fit.py [--smiles SMILES] [--auxbasis cc-pVDZ-JKFIT] [--basis 6-31G*]
  python bench/density_fit.py --smoke   (water, STO-3G)
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dcmtune.data.grids import shell_grid
from dcmtune.qm.conformers import smiles_spec
from dcmtune.qm.pyscf_esp import build_mol, esp_on_grid, run_scf
from dcmtune.units import HARTREE_TO_KCAL

DIPEPTIDE = "CC(=O)NC(CC(C)C)C(=O)NCC(=O)NC"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smiles", default=DIPEPTIDE)
    p.add_argument("--basis", default="6-31G*")
    p.add_argument("--auxbasis", default="cc-pVDZ-JKFIT")
    p.add_argument("--threads", type=int, default=1, help="PySCF threads (1: one generator worker)")
    p.add_argument("--smoke", action="store_true", help="water, STO-3G")
    args = p.parse_args(argv)
    from pyscf import lib

    lib.num_threads(args.threads)
    if args.smoke:
        args.smiles, args.basis = "O", "sto-3g"
    spec = smiles_spec("molecule", args.smiles)
    mol = build_mol(spec.numbers, spec.positions, args.basis)
    grid = shell_grid(spec.positions, spec.numbers, np.random.default_rng(0), max_grid=1200)
    esp, seconds = {}, {}
    for name, aux in (("exact", ""), ("density-fitted", args.auxbasis)):
        t0 = time.perf_counter()
        _, dm = run_scf(mol, density_fit=aux)
        seconds[name] = time.perf_counter() - t0
        esp[name] = esp_on_grid(mol, dm, grid) * HARTREE_TO_KCAL
    d = esp["density-fitted"] - esp["exact"]
    print(f"{args.smiles}: {mol.natm} atoms, {mol.nao_nr()} basis functions ({args.basis})")
    ratio = seconds["exact"] / seconds["density-fitted"]
    print(
        f"SCF exact {seconds['exact']:.1f} s, density-fitted ({args.auxbasis}) "
        f"{seconds['density-fitted']:.1f} s: ratio {ratio:.1f}x"
    )
    print(
        f"ESP difference on {len(grid)} points: RMS {np.sqrt(np.mean(d**2)):.4f}, largest "
        f"{np.abs(d).max():.4f} kcal/mol/e (ESP RMS {np.sqrt(np.mean(esp['exact'] ** 2)):.2f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
