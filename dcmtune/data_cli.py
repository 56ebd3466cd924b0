"""`python -m dcmtune.data {generate,inspect,validate,convert,verify}`: make, summarise, check,
convert and verify ESP files.

  generate  PySCF ESP data for ASE g2 molecules, .xyz files and SMILES (needs the `qm` extra)
  inspect   a per-molecule summary table of a dataset, padding efficiency, grouping, units checks
  validate  the loader's checks; exit 2 on failure
  convert   mmml-layout (or any loadable) files -> one compact dcmtune file + provenance JSON
  verify    regenerate a sample of a generated file's molecules and compare within tolerances

Bad inputs exit with status 2 and one line on stderr; nothing is written.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from dcmtune import _io
from dcmtune.cli import OneLineParser, run_cli
from dcmtune.data import (DIPOLE_SCALE, DataError, ESPData, bundled_dataset_path,
                          check_dipole_units, dipole_ratio, load_npz, stored_layout, to_arrays,
                          validate_arrays)
from dcmtune.molgraph import DEFAULT_BOND_TOLERANCE
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
        _dipole_units_option(s)

    c = sub.add_parser("convert", help="write one compact dcmtune file (real maxima, mol_id, "
                                       "Dxyz in Debye) and its provenance JSON")
    c.add_argument("files", nargs="+", type=Path, help="input .npz files (mmml layout or ours)")
    c.add_argument("--out", required=True, type=Path, help="output .npz file")
    c.add_argument("--force", action="store_true", help="replace an existing output file")
    c.add_argument("--max-atomic-number", type=int, default=36)
    _dipole_units_option(c)

    v = sub.add_parser("verify", help="regenerate a sample of molecules and compare (qm extra)")
    v.add_argument("file", type=Path, help="a generated .npz with its provenance JSON")
    v.add_argument("--molecules", nargs="+", default=[], metavar="MOL_ID",
                   help="molecules to regenerate (default: --sample of them, seeded)")
    v.add_argument("--sample", type=int, default=3, help="molecules drawn when none given (3)")
    v.add_argument("--seed", type=int, default=0, help="seed of the draw (0)")
    v.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    return p


def _dipole_units_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dipole-units", choices=sorted(DIPOLE_SCALE), default="debye",
                   help="units of Dxyz in the files (debye); mmml-era files often hold e_bohr")


def _run(args: argparse.Namespace) -> int:
    return {"generate": _generate, "inspect": _inspect, "validate": _validate,
            "convert": _convert, "verify": _verify}[args.command](args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit 0 done, 2 bad input (nothing written), 1 the computation or the disk failed."""
    return run_cli(_run, _parser(), argv, bad_input=(DataError, qm.QMError),
                   failures=(qm.SCFError, OSError), verbose=lambda args: args.verbose)


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


def _load(args, files: Sequence[Path]) -> ESPData:
    return load_npz(files, max_atomic_number=args.max_atomic_number,
                    dipole_units=args.dipole_units)


_GROUPING = {"file": "mol_id from the file(s)",
             "graph": "grouped by bond graph: no mol_id in the files",
             "mixed": "mol_id from some files, bond graph for the others"}


def _file_summaries(files: Sequence[Path], d: ESPData) -> list[dict]:
    """Per input file: stored layout (from the .npy headers) and how much of it is real.

    Files are concatenated in order, so file i holds rows [offset, offset + M_i) of `d`.
    """
    out, offset = [], 0
    for f in files:
        layout = stored_layout(f)
        M, A = layout["R"][0][:2]
        G = layout["esp"][0][1]
        rows = slice(offset, offset + M)
        offset += M
        has = set(layout)
        grid_from = ("n_grid" if "n_grid" in has else "inferred from trailing zero rows")
        if "espMask" in has:
            grid_from += " + espMask"
        real_atoms, real_grid = int(d.N[rows].sum()), int(d.n_grid[rows].sum())
        out.append({
            "path": str(f), "conformers": int(M), "stored_atoms": int(A),
            "stored_grid_points": int(G), "N_shape": list(layout["N"][0]),
            "grid_points_from": grid_from,
            "mol_id": "file" if "mol_id" in has else "graph",
            "real_atoms": real_atoms, "real_grid_points": real_grid,
            "atom_efficiency": real_atoms / (M * A), "grid_efficiency": real_grid / (M * G),
            "real_max_atoms": int(d.N[rows].max()), "real_max_grid": int(d.n_grid[rows].max()),
        })
    return out


def _efficiency(d: ESPData) -> tuple[float, float]:
    """(atoms, grid points) real / held, as loaded (compact)."""
    return (float(d.N.sum() / d.N.size / d.num_atoms),
            float(d.n_grid.sum() / d.n_grid.size / d.num_grid))


def _dipole_check_line(d: ESPData, declared: str) -> str:
    ratio, n = dipole_ratio(d)  # the loaded dipoles are in Debye already
    verdict = check_dipole_units(ratio, n, "debye", "inspect", warn=False)
    if verdict.startswith("not checked"):
        return f"Dxyz units: declared {declared}; {verdict}"
    ok = "consistent" if verdict.startswith("debye confirmed") else "NOT confirmed"
    return (f"Dxyz units: declared {declared}; median |Dxyz| / |dipole of mono about com| = "
            f"{ratio:.3f} over {n} conformers ({ok}; 0.393 / 0.208 would mean e*Bohr / e*A "
            f"read as Debye)")


def _inspect(args) -> int:
    files = _files(args)
    d = _load(args, files)
    summaries = _file_summaries(files, d)
    kcal = HARTREE_TO_KCAL
    ids, first = np.unique(d.mol_id, return_index=True)
    ids = ids[np.argsort(first)]  # file order
    w = max(12, max(len(i) for i in ids))
    print(f"{'mol_id':<{w}} {'formula':<10} {'conf':>4} {'atoms':>5} {'grid':>9} "
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
        print(f"{mid:<{w}} {formula:<10} {len(idx):>4} {n:>5} {grid:>9} "
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
    print(f"molecules: {_GROUPING[d.mol_id_source]}")
    for s in summaries:
        print(f"stored {s['path']}: {s['conformers']} conformers x {s['stored_atoms']} atoms x "
              f"{s['stored_grid_points']} grid points; N {tuple(s['N_shape'])}; grid points: "
              f"{s['grid_points_from']}; molecules: "
              f"{'mol_id' if s['mol_id'] == 'file' else 'bond graph'}")
        print(f"  padding efficiency (real / stored): atoms {s['real_atoms']} / "
              f"{s['conformers'] * s['stored_atoms']} = {100 * s['atom_efficiency']:.1f}%, "
              f"grid points {s['real_grid_points']} / "
              f"{s['conformers'] * s['stored_grid_points']} = {100 * s['grid_efficiency']:.1f}%")
    ea, eg = _efficiency(d)
    print(f"as loaded (compact, {d.num_atoms} atoms x {d.num_grid} grid points): atoms "
          f"{100 * ea:.1f}%, grid points {100 * eg:.1f}% real")
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
        if d.mono is not None:
            print(_dipole_check_line(d, args.dipole_units))
    print(f"Q: {sorted(set(np.round(d.Q, 6).tolist()))} e")
    for f in files:
        prov = qm.provenance_path(f)
        if prov.is_file():
            p = json.loads(prov.read_text())
            if "qm" in p:
                print(f"provenance ({prov.name}): {p['qm'].get('method')}/"
                      f"{p['qm'].get('basis')}; rebuild: {p.get('command')}")
            else:
                print(f"provenance ({prov.name}): {p.get('command')}")
    return 0


def _hill(z: int) -> tuple:
    """Hill order: C, H, then the rest by atomic number."""
    return (0 if z == 6 else 1 if z == 1 else 2, z)


# --------------------------------------------------------------------------- validate


def _validate(args) -> int:
    files = _files(args)
    d = _load(args, files)
    print(f"ok: {', '.join(map(str, files))}: {d.num_conformers} conformers of "
          f"{len(np.unique(d.mol_id))} molecules ({_GROUPING[d.mol_id_source]}), up to "
          f"{d.num_atoms} atoms and {d.num_grid} grid points")
    return 0


# --------------------------------------------------------------------------- convert


def _check_convert_paths(files: Sequence[Path], out: Path, force: bool) -> Path:
    """Raises DataError unless `out` is a new (or --force) .npz that is none of the inputs.

    Returns:
      The provenance path beside `out`.
    """
    if out.suffix != ".npz":
        raise DataError(f"{out}: --out: the output file name must end in .npz")
    if not out.parent.is_dir():
        raise DataError(f"{out}: --out: directory {out.parent} does not exist")
    for f in files:
        same = (out.exists() and f.exists() and os.path.samefile(f, out)) or \
            f.resolve() == out.resolve()
        if same:
            raise DataError(f"{out}: --out is also an input file; an input is never "
                            "overwritten (choose another --out)")
    prov = qm.provenance_path(out)
    if not force:
        for p in (out, prov):
            if p.exists():
                raise DataError(f"{p}: already exists; pass --force to replace it")
    return prov


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _convert_command(args) -> str:
    cmd = ["python", "-m", "dcmtune.data", "convert", *map(str, args.files), "--out",
           str(args.out), "--dipole-units", args.dipole_units]
    if args.max_atomic_number != 36:
        cmd += ["--max-atomic-number", str(args.max_atomic_number)]
    return shlex.join(cmd)


def _convert(args) -> int:
    from dcmtune import __version__

    files = list(args.files)
    prov_path = _check_convert_paths(files, args.out, args.force)
    d = _load(args, files)
    summaries = _file_summaries(files, d)
    arrays = to_arrays(d)
    # Proves, before anything is written, that the output loads back to the same data.
    back = validate_arrays(arrays, source=str(args.out),
                           max_atomic_number=args.max_atomic_number)
    assert back.checksum() == d.checksum(), "convert: output would not load back identically"
    ratio, voters = dipole_ratio(d)
    dipole_check = (check_dipole_units(ratio, voters, "debye", str(args.out), warn=False)
                    if d.dipole is not None and d.mono is not None else "no Dxyz and mono")
    ea, eg = _efficiency(d)
    provenance = {
        "kind": "dcmtune.data convert",
        "command": _convert_command(args),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": {"dcmtune": __version__, "numpy": np.__version__},
        "inputs": [dict(s, sha256=_sha256(Path(s["path"]))) for s in summaries],
        "dipole_units": {"declared": args.dipole_units, "written": "debye",
                         "check": dipole_check},
        "grouping": {"mol_id_source": d.mol_id_source, "molecules": int(len(set(d.mol_id))),
                     "bond_rule": f"d < {DEFAULT_BOND_TOLERANCE} * (r_cov(a) + r_cov(b)), "
                                  "Cordero 2008 radii; key = Hill formula + Weisfeiler-Lehman "
                                  "hash of the element-labelled bond graph"},
        "output": {"path": str(args.out), "conformers": d.num_conformers,
                   "atoms": d.num_atoms, "grid_points": d.num_grid, "atom_efficiency": ea,
                   "grid_efficiency": eg, "keys": sorted(arrays),
                   "data_checksum": d.checksum()},
    }
    _io.atomic_write(args.out, lambda f: np.savez_compressed(f, **arrays))
    _io.write_json(prov_path, provenance)
    before = sum(s["conformers"] * s["stored_atoms"] for s in summaries)
    before_g = sum(s["conformers"] * s["stored_grid_points"] for s in summaries)
    print(f"wrote {args.out} ({d.num_conformers} conformers of {len(set(d.mol_id))} molecules, "
          f"{_GROUPING[d.mol_id_source]}; {d.num_atoms} atoms x {d.num_grid} grid points) and "
          f"{prov_path}")
    print(f"padding efficiency: atoms {100 * d.N.sum() / before:.1f}% -> {100 * ea:.1f}%, grid "
          f"points {100 * d.n_grid.sum() / before_g:.1f}% -> {100 * eg:.1f}%; Dxyz: "
          f"{dipole_check}")
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
