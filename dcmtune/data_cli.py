"""`python -m dcmtune.data {generate,inspect,validate}`: make, summarise and check ESP files.

  generate  PySCF ESP data for ASE g2 molecules, .xyz files and SMILES (needs the `qm` extra)
  inspect   a per-molecule summary table of a dataset and a units check
  validate  the loader's checks; exit 2 on failure
  verify    regenerate a sample of a generated file's molecules and compare within tolerances

Bad inputs exit with status 2 and one line on stderr; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from dcmtune.cli import OneLineParser
from dcmtune.data import DataError, bundled_dataset_path, load_npz
from dcmtune.units import BOHR, HARTREE_TO_KCAL
from dcmtune import qm  # PySCF and ASE load lazily inside its functions.

__all__ = ["main"]

# Element symbols up to Kr (the default max_atomic_number); inspect needs no ASE.
_SYMBOLS = ("X H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu "
            "Zn Ga Ge As Se Br Kr").split()


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m dcmtune.data", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    g = sub.add_parser("generate", help="PySCF ESP data (needs the qm extra)")
    g.add_argument("--molecules", nargs="+", default=[], metavar="NAME",
                   help="ASE g2 molecule names (ase.collections.g2), e.g. H2O NH3 C6H6")
    g.add_argument("--xyz", nargs="+", default=[], metavar="FILE",
                   help=".xyz files (first frame; mol_id = file stem)")
    g.add_argument("--smiles", nargs="+", default=[], metavar="SMILES",
                   help="neutral closed-shell SMILES (RDKit ETKDG + MMFF geometry; mol_id = "
                        "canonical SMILES)")
    g.add_argument("--smiles-file", nargs="+", default=[], metavar="FILE",
                   help="CSV molecule lists with columns name,smiles[,class] (mol_id = name; "
                        "# comments)")
    g.add_argument("--conformers", type=int, default=10,
                   help="conformers per molecule; the first is the input geometry (10)")
    g.add_argument("--out", required=True, type=Path, help="output .npz file")
    g.add_argument("--method", default="HF", help="HF or a DFT functional, e.g. B3LYP (HF)")
    g.add_argument("--basis", default="6-31G*", help="PySCF basis name (6-31G*)")
    g.add_argument("--sigma", type=float, default=0.025,
                   help="Gaussian displacement per coordinate, Angstrom (0.025)")
    g.add_argument("--density", type=float, default=1.0,
                   help="grid points per Angstrom^2 on each vdW shell (1.0)")
    g.add_argument("--max-grid", type=int, default=1200,
                   help="at most this many grid points per conformer (1200)")
    g.add_argument("--seed", type=int, default=0, help="random seed (0)")
    g.add_argument("--charge", type=int, default=0, help="total charge of every molecule (0)")
    g.add_argument("--spin", type=int, default=None,
                   help="2S = unpaired electrons; required for odd electron counts")
    g.add_argument("--workers", type=int, default=2,
                   help="single-threaded worker processes (2); 0 = in this process")

    for name, text in (("inspect", "summary table of a dataset"),
                       ("validate", "run the loader's checks (exit 2 on failure)")):
        s = sub.add_parser(name, help=text)
        s.add_argument("files", nargs="*", type=Path,
                       help="dataset .npz files (default: the bundled demo set)")
        s.add_argument("--max-atomic-number", type=int, default=36)

    v = sub.add_parser("verify", help="regenerate a sample of molecules and compare (qm extra)")
    v.add_argument("file", type=Path, help="a generated .npz with its provenance JSON")
    v.add_argument("--molecules", nargs="+", default=[], metavar="MOL_ID",
                   help="molecules to regenerate (default: --sample of them, seeded)")
    v.add_argument("--sample", type=int, default=3, help="molecules drawn when none given (3)")
    v.add_argument("--seed", type=int, default=0, help="seed of the draw (0)")
    v.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"generate": _generate, "inspect": _inspect, "validate": _validate,
                "verify": _verify}[args.command](args)
    except (DataError, qm.QMError) as e:  # bad input: nothing was written.
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (qm.SCFError, OSError) as e:  # the computation or the disk failed, not the input.
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _symbol(z: int) -> str:
    return _SYMBOLS[z] if 0 < z < len(_SYMBOLS) else f"Z{z}"


# --------------------------------------------------------------------------- generate


def _generate(args) -> int:
    from tqdm import tqdm  # optuna's dependency, so always present.

    settings = qm.GenerationSettings(
        conformers=args.conformers, method=args.method, basis=args.basis, sigma=args.sigma,
        density=args.density, max_grid=args.max_grid, seed=args.seed, charge=args.charge,
        spin=args.spin)
    # Every input check first: a bad input leaves one line on stderr and no progress bar.
    qm.check_output(args.out)
    specs = qm.load_molecules(args.molecules, args.xyz, args.smiles, args.smiles_file,
                              seed=args.seed)
    qm.check_inputs(specs, settings, args.workers)
    with tqdm(total=len(specs) * args.conformers, unit="conf", file=sys.stderr,
              desc="generate", dynamic_ncols=True) as bar:

        def progress(name: str, n: int) -> None:
            bar.set_postfix_str(name, refresh=False)
            bar.update(n)

        prov = qm.generate_dataset(args.out, specs, settings, workers=args.workers,
                                   progress=progress)
    t = prov["timing"]
    print(f"wrote {args.out} ({t['conformers']} conformers of {len(prov['molecules'])} "
          f"molecules) and {qm.provenance_path(args.out)}")
    print(f"{t['wall_seconds']:.0f} s with {t['workers']} workers: "
          f"{t['conformers_per_hour']:.0f} conformers/hour")
    return 0


# --------------------------------------------------------------------------- inspect


def _files(args) -> list[Path]:
    return list(args.files) or [bundled_dataset_path()]


def _inspect(args) -> int:
    files = _files(args)
    d = load_npz(files, max_atomic_number=args.max_atomic_number)
    kcal = HARTREE_TO_KCAL
    ids, first = np.unique(d.mol_id, return_index=True)
    ids = ids[np.argsort(first)]  # file order
    print(f"{'mol_id':<12} {'formula':<10} {'conf':>4} {'atoms':>5} {'grid':>9} "
          f"{'ESP min..max (kcal/mol/e)':>26} {'|D| (Debye)':>11}")
    grid_dist = []
    for mid in ids:
        idx = np.flatnonzero(d.mol_id == mid)
        n = int(d.N[idx[0]])
        z = d.Z[idx[0], :n]
        els, counts = np.unique(z, return_counts=True)
        formula = "".join(f"{_symbol(int(e))}{c if c > 1 else ''}"
                          for e, c in sorted(zip(els, counts), key=lambda t: _hill(t[0])))
        valid = [d.esp[i, : d.n_grid[i]] for i in idx]
        lo = min(v.min() for v in valid) * kcal
        hi = max(v.max() for v in valid) * kcal
        ng = d.n_grid[idx]
        dip = (f"{np.linalg.norm(d.dipole[idx], axis=1).mean():11.3f}"
               if d.dipole is not None else f"{'-':>11}")
        grid = f"{ng.min()}" if ng.min() == ng.max() else f"{ng.min()}-{ng.max()}"
        print(f"{mid:<12} {formula:<10} {len(idx):>4} {n:>5} {grid:>9} "
              f"{lo:>12.1f} .. {hi:<10.1f} {dip}")
        for i in idx:
            g = d.grid[i, : d.n_grid[i]]
            r = d.R[i, : d.N[i]]
            grid_dist.append(np.linalg.norm(g[:, None] - r[None], axis=-1).min(axis=1))
    elements = sorted({int(z) for z in np.unique(d.Z) if z > 0})
    valid_esp = d.esp[np.arange(d.num_grid)[None, :] < d.n_grid[:, None]]
    gd = np.concatenate(grid_dist)
    print()
    print(f"files: {', '.join(map(str, files))}")
    print(f"{len(ids)} molecules, {d.num_conformers} conformers, up to {d.num_atoms} atoms, "
          f"up to {d.num_grid} grid points ({int(d.n_grid.sum())} in all)")
    print(f"elements: {' '.join(_symbol(z) for z in elements)}")
    print(f"ESP: {valid_esp.min():.4f} .. {valid_esp.max():.4f} Hartree/e "
          f"({valid_esp.min() * kcal:.1f} .. {valid_esp.max() * kcal:.1f} kcal/mol/e)")
    ok = 1.0 <= np.median(gd) <= 3.6
    print(f"units check: grid-to-nearest-atom distance {gd.min():.2f} .. {gd.max():.2f}, "
          f"median {np.median(gd):.2f} Angstrom "
          f"({'Angstrom as expected' if ok else f'looks like Bohr? 1 Bohr = {BOHR:.4f} A'})")
    if d.mono is not None:
        dev = np.abs(d.mono.sum(axis=1) - d.Q).max()
        print(f"mono: sum(mono) - Q at most {dev:.1e} e; range {d.mono.min():.3f} .. "
              f"{d.mono.max():.3f} e")
    if d.dipole is not None:
        print(f"Dxyz: |D| {np.linalg.norm(d.dipole, axis=1).min():.3f} .. "
              f"{np.linalg.norm(d.dipole, axis=1).max():.3f} Debye about com")
    print(f"Q: {sorted(set(np.round(d.Q, 6).tolist()))} e")
    for f in files:
        prov = qm.provenance_path(f)
        if prov.is_file():
            p = json.loads(prov.read_text())
            print(f"provenance ({prov.name}): {p.get('qm', {}).get('method')}/"
                  f"{p.get('qm', {}).get('basis')}; rebuild: {p.get('command')}")
    return 0


def _hill(z: int) -> tuple:
    """Hill order: C, H, then the rest by atomic number."""
    return (0 if z == 6 else 1 if z == 1 else 2, z)


# --------------------------------------------------------------------------- validate


def _validate(args) -> int:
    files = _files(args)
    d = load_npz(files, max_atomic_number=args.max_atomic_number)
    print(f"ok: {', '.join(map(str, files))}: {d.num_conformers} conformers of "
          f"{len(np.unique(d.mol_id))} molecules, up to {d.num_atoms} atoms and "
          f"{d.num_grid} grid points")
    return 0


# --------------------------------------------------------------------------- verify


def _verify(args) -> int:
    from dcmtune.verify import TOLERANCES, verify_sample

    if args.sample < 1:
        raise qm.QMError(f"--sample: expected >= 1, got {args.sample}")
    rows = verify_sample(args.file, args.molecules, args.sample, args.seed, args.workers)
    keys = list(TOLERANCES)
    print(f"{'mol_id':<24} {'conf':>4} " + " ".join(f"{k:>11}" for k in keys) + "  result")
    print(f"{'tolerance':<24} {'':>4} " + " ".join(f"{TOLERANCES[k]:>11.0e}" for k in keys))
    for r in rows:
        devs = " ".join(f"{r['max_abs'].get(k, float('nan')):>11.1e}" for k in keys)
        verdict = "ok" if r["ok"] else f"DIFFERS {r.get('problem', '')}".rstrip()
        print(f"{r['mol_id']:<24} {r['conformers']:>4} {devs}  {verdict}")
    bad = [r["mol_id"] for r in rows if not r["ok"]]
    if bad:
        print(f"error: {args.file}: {len(bad)} of {len(rows)} regenerated molecules differ "
              f"beyond tolerance: {', '.join(bad)}", file=sys.stderr)
        return 1
    print(f"ok: {len(rows)} molecules of {args.file} regenerated within tolerance")
    return 0
