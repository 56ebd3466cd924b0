"""The data commands of `python -m dcmtune.data`: inspect, validate and convert ESP files.

  inspect   a per-molecule summary table of a dataset, its size distribution, padding
            efficiency, grouping and units checks
  validate  the loader's checks; exit 2 on failure
  convert   mmml-layout (or any loadable) files -> one compact dcmtune file + provenance JSON

`add_commands` registers them on the command's sub-parsers; `python -m dcmtune.data` (its
`__main__`) adds the generator's commands from `dcmtune.qm.commands` beside them. Bad inputs
raise `DataError` (one line, exit 2); nothing is written.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dcmtune import _io
from dcmtune.data.dataset import (
    ESPData,
    bundled_dataset_path,
    data_file_path,
    dipole_ratio,
    to_arrays,
)
from dcmtune.data.file_format import (
    DIPOLE_SCALE,
    DataError,
    check_dipole_units,
    provenance_path,
    stored_layout,
)
from dcmtune.data.load import load_npz, validate_arrays
from dcmtune.data.molgraph import DEFAULT_BOND_TOLERANCE, hill_formula
from dcmtune.units import BOHR, HARTREE_TO_KCAL

__all__ = ["add_commands", "COMMANDS"]


def add_commands(sub) -> None:
    """Registers inspect, validate and convert on `sub` (argparse sub-parsers)."""
    for name, text in (
        ("inspect", "summary table of a dataset"),
        ("validate", "run the loader's checks (exit 2 on failure)"),
    ):
        s = sub.add_parser(name, help=text)
        s.add_argument(
            "files",
            nargs="*",
            type=Path,
            help="dataset .npz files or bundled set names, e.g. organic (default: demo)",
        )
        s.add_argument("--max-atomic-number", type=int, default=36)
        _dipole_units_option(s)

    c = sub.add_parser(
        "convert",
        help="write one compact dcmtune file (real maxima, mol_id, "
        "Dxyz in Debye) and its provenance JSON",
    )
    c.add_argument("files", nargs="+", type=Path, help="input .npz files (mmml layout or ours)")
    c.add_argument("--out", required=True, type=Path, help="output .npz file")
    c.add_argument("--force", action="store_true", help="replace an existing output file")
    c.add_argument("--max-atomic-number", type=int, default=36)
    _dipole_units_option(c)


def _dipole_units_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dipole-units",
        choices=sorted(DIPOLE_SCALE),
        default="debye",
        help="units of Dxyz in the files (debye); mmml-era files often hold e_bohr",
    )


def _symbol(z: int) -> str:
    return hill_formula(np.array([z])) if z > 0 else "X"


# --------------------------------------------------------------------------- inspect


def _files(args) -> list[Path]:
    return [data_file_path(str(f)) for f in args.files] or [bundled_dataset_path()]


def _load(args, files: Sequence[Path]) -> ESPData:
    return load_npz(files, max_atomic_number=args.max_atomic_number, dipole_units=args.dipole_units)


_GROUPING = {
    "file": "mol_id from the file(s)",
    "graph": "grouped by bond graph: no mol_id in the files",
    "mixed": "mol_id from some files, bond graph for the others",
}


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
        grid_from = "n_grid" if "n_grid" in has else "inferred from trailing zero rows"
        if "espMask" in has:
            grid_from += " + espMask"
        real_atoms, real_grid = int(d.N[rows].sum()), int(d.n_grid[rows].sum())
        out.append(
            {
                "path": str(f),
                "conformers": int(M),
                "stored_atoms": int(A),
                "stored_grid_points": int(G),
                "N_shape": list(layout["N"][0]),
                "grid_points_from": grid_from,
                "mol_id": "file" if "mol_id" in has else "graph",
                "real_atoms": real_atoms,
                "real_grid_points": real_grid,
                "atom_efficiency": real_atoms / (M * A),
                "grid_efficiency": real_grid / (M * G),
                "real_max_atoms": int(d.N[rows].max()),
                "real_max_grid": int(d.n_grid[rows].max()),
            }
        )
    return out


def _efficiency(d: ESPData) -> tuple[float, float]:
    """(atoms, grid points) real / held, as loaded (compact)."""
    return (
        float(d.N.sum() / d.N.size / d.num_atoms),
        float(d.n_grid.sum() / d.n_grid.size / d.num_grid),
    )


def _dipole_check_line(d: ESPData, declared: str) -> str:
    ratio, n = dipole_ratio(d)  # the loaded dipoles are in Debye already
    verdict = check_dipole_units(ratio, n, "debye", "inspect", warn=False)
    if verdict.startswith("not checked"):
        return f"Dxyz units: declared {declared}; {verdict}"
    ok = "consistent" if verdict.startswith("debye confirmed") else "NOT confirmed"
    return (
        f"Dxyz units: declared {declared}; median |Dxyz| / |dipole of mono about com| = "
        f"{ratio:.3f} over {n} conformers ({ok}; 0.393 / 0.208 would mean e*Bohr / e*A "
        f"read as Debye)"
    )


def _molecule_ids(d: ESPData) -> np.ndarray:
    """The distinct mol_ids in file order."""
    ids, first = np.unique(d.mol_id, return_index=True)
    return ids[np.argsort(first)]


def _molecule_rows(d: ESPData) -> list[str]:
    """One table line per molecule: formula, conformers, atoms, grid points, ESP range, |D|."""
    ids = _molecule_ids(d)
    w = max(12, max(len(i) for i in ids))
    lines = [
        f"{'mol_id':<{w}} {'formula':<10} {'conf':>4} {'atoms':>5} {'grid':>9} "
        f"{'ESP min..max (kcal/mol/e)':>26} {'|D| (Debye)':>11}"
    ]
    for mid in ids:
        idx = np.flatnonzero(d.mol_id == mid)
        n = int(d.N[idx[0]])
        valid = [d.esp[i, : d.n_grid[i]] for i in idx]
        lo = min(v.min() for v in valid) * HARTREE_TO_KCAL
        hi = max(v.max() for v in valid) * HARTREE_TO_KCAL
        ng = d.n_grid[idx]
        dip = (
            f"{np.linalg.norm(d.dipole[idx], axis=1).mean():11.3f}"
            if d.dipole is not None
            else f"{'-':>11}"
        )
        grid = f"{ng.min()}" if ng.min() == ng.max() else f"{ng.min()}-{ng.max()}"
        lines.append(
            f"{mid:<{w}} {hill_formula(d.Z[idx[0], :n]):<10} {len(idx):>4} {n:>5} "
            f"{grid:>9} {lo:>12.1f} .. {hi:<10.1f} {dip}"
        )
    return lines


def _size_distribution(d: ESPData) -> list[str]:
    """Molecules per heavy-atom count (each molecule once), as a one-line histogram."""
    _, first = np.unique(d.mol_id, return_index=True)
    heavy = ((d.Z[first] > 1).sum(axis=1)).astype(int)
    counts = np.bincount(heavy)
    cells = [f"{k}:{c}" for k, c in enumerate(counts) if c]
    return [
        f"heavy atoms per molecule (count: molecules): {' '.join(cells)}; "
        f"median {int(np.median(heavy))}, max {int(heavy.max())}; atoms per conformer "
        f"{int(d.N.min())}..{int(d.N.max())}"
    ]


def _grid_distances(d: ESPData) -> np.ndarray:
    """Every valid grid point's distance to its nearest atom, Angstrom."""
    out = []
    for i in range(d.num_conformers):
        g, r = d.grid[i, : d.n_grid[i]], d.R[i, : d.N[i]]
        out.append(np.linalg.norm(g[:, None] - r[None], axis=-1).min(axis=1))
    return np.concatenate(out)


def _layout_lines(files: Sequence[Path], d: ESPData) -> list[str]:
    """How the files were stored and how much of them is real."""
    lines = []
    for s in _file_summaries(files, d):
        lines.append(
            f"stored {s['path']}: {s['conformers']} conformers x {s['stored_atoms']} "
            f"atoms x {s['stored_grid_points']} grid points; N {tuple(s['N_shape'])}; "
            f"grid points: {s['grid_points_from']}; molecules: "
            f"{'mol_id' if s['mol_id'] == 'file' else 'bond graph'}"
        )
        lines.append(
            f"  padding efficiency (real / stored): atoms {s['real_atoms']} / "
            f"{s['conformers'] * s['stored_atoms']} = {100 * s['atom_efficiency']:.1f}%"
            f", grid points {s['real_grid_points']} / "
            f"{s['conformers'] * s['stored_grid_points']} = "
            f"{100 * s['grid_efficiency']:.1f}%"
        )
    ea, eg = _efficiency(d)
    lines.append(
        f"as loaded (compact, {d.num_atoms} atoms x {d.num_grid} grid points): atoms "
        f"{100 * ea:.1f}%, grid points {100 * eg:.1f}% real"
    )
    return lines


def _physics_lines(args, d: ESPData) -> list[str]:
    """Elements, ESP range, the units checks, charges and dipoles."""
    kcal = HARTREE_TO_KCAL
    elements = sorted({int(z) for z in np.unique(d.Z) if z > 0})
    valid_esp = d.esp[np.arange(d.num_grid)[None, :] < d.n_grid[:, None]]
    gd = _grid_distances(d)
    ok = 1.0 <= np.median(gd) <= 3.6
    lines = [
        f"elements: {' '.join(_symbol(z) for z in elements)}",
        f"ESP: {valid_esp.min():.4f} .. {valid_esp.max():.4f} Hartree/e "
        f"({valid_esp.min() * kcal:.1f} .. {valid_esp.max() * kcal:.1f} kcal/mol/e)",
        f"units check: grid-to-nearest-atom distance {gd.min():.2f} .. {gd.max():.2f}, "
        f"median {np.median(gd):.2f} Angstrom "
        f"({'Angstrom as expected' if ok else f'looks like Bohr? 1 Bohr = {BOHR:.4f} A'})",
    ]
    if d.mono is not None:
        dev = np.abs(d.mono.sum(axis=1) - d.Q).max()
        lines.append(
            f"mono: sum(mono) - Q at most {dev:.1e} e; range {d.mono.min():.3f} .. "
            f"{d.mono.max():.3f} e"
        )
    if d.dipole is not None:
        size = np.linalg.norm(d.dipole, axis=1)
        lines.append(f"Dxyz: |D| {size.min():.3f} .. {size.max():.3f} Debye about com")
        if d.mono is not None:
            lines.append(_dipole_check_line(d, args.dipole_units))
    lines.append(f"Q: {sorted(set(np.round(d.Q, 6).tolist()))} e")
    return lines


def _provenance_lines(files: Sequence[Path]) -> list[str]:
    lines = []
    for f in files:
        prov = provenance_path(f)
        if prov.is_file():
            p = json.loads(prov.read_text())
            if "qm" in p:
                lines.append(
                    f"provenance ({prov.name}): {p['qm'].get('method')}/"
                    f"{p['qm'].get('basis')}; rebuild: {p.get('command')}"
                )
            else:
                lines.append(f"provenance ({prov.name}): {p.get('command')}")
    return lines


def _inspect(args) -> int:
    files = _files(args)
    d = _load(args, files)
    print("\n".join(_molecule_rows(d)))
    print()
    print(f"files: {', '.join(map(str, files))}")
    print(
        f"{len(_molecule_ids(d))} molecules, {d.num_conformers} conformers, up to "
        f"{d.num_atoms} atoms, up to {d.num_grid} grid points ({int(d.n_grid.sum())} in all)"
    )
    print(f"molecules: {_GROUPING[d.mol_id_source]}")
    print(
        "\n".join(
            _size_distribution(d)
            + _layout_lines(files, d)
            + _physics_lines(args, d)
            + _provenance_lines(files)
        )
    )
    return 0


# --------------------------------------------------------------------------- validate, convert


def _validate(args) -> int:
    files = _files(args)
    d = _load(args, files)
    print(
        f"ok: {', '.join(map(str, files))}: {d.num_conformers} conformers of "
        f"{len(np.unique(d.mol_id))} molecules ({_GROUPING[d.mol_id_source]}), up to "
        f"{d.num_atoms} atoms and {d.num_grid} grid points"
    )
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
        same = (
            out.exists() and f.exists() and os.path.samefile(f, out)
        ) or f.resolve() == out.resolve()
        if same:
            raise DataError(
                f"{out}: --out is also an input file; an input is never "
                "overwritten (choose another --out)"
            )
    prov = provenance_path(out)
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
    cmd = [
        "python",
        "-m",
        "dcmtune.data",
        "convert",
        *map(str, args.files),
        "--out",
        str(args.out),
        "--dipole-units",
        args.dipole_units,
    ]
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
    back = validate_arrays(arrays, source=str(args.out), max_atomic_number=args.max_atomic_number)
    assert back.checksum() == d.checksum(), "convert: output would not load back identically"
    ratio, voters = dipole_ratio(d)
    dipole_check = (
        check_dipole_units(ratio, voters, "debye", str(args.out), warn=False)
        if d.dipole is not None and d.mono is not None
        else "no Dxyz and mono"
    )
    ea, eg = _efficiency(d)
    provenance = {
        "kind": "dcmtune.data convert",
        "command": _convert_command(args),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": {"dcmtune": __version__, "numpy": np.__version__},
        "inputs": [dict(s, sha256=_sha256(Path(s["path"]))) for s in summaries],
        "dipole_units": {"declared": args.dipole_units, "written": "debye", "check": dipole_check},
        "grouping": {
            "mol_id_source": d.mol_id_source,
            "molecules": int(len(set(d.mol_id))),
            "bond_rule": f"d < {DEFAULT_BOND_TOLERANCE} * (r_cov(a) + r_cov(b)), "
            "Cordero 2008 radii; key = Hill formula + Weisfeiler-Lehman "
            "hash of the element-labelled bond graph",
        },
        "output": {
            "path": str(args.out),
            "conformers": d.num_conformers,
            "atoms": d.num_atoms,
            "grid_points": d.num_grid,
            "atom_efficiency": ea,
            "grid_efficiency": eg,
            "keys": sorted(arrays),
            "data_checksum": d.checksum(),
        },
    }
    _io.atomic_write(args.out, lambda f: np.savez_compressed(f, **arrays))
    _io.write_json(prov_path, provenance)
    before = sum(s["conformers"] * s["stored_atoms"] for s in summaries)
    before_g = sum(s["conformers"] * s["stored_grid_points"] for s in summaries)
    print(
        f"wrote {args.out} ({d.num_conformers} conformers of {len(set(d.mol_id))} molecules, "
        f"{_GROUPING[d.mol_id_source]}; {d.num_atoms} atoms x {d.num_grid} grid points) and "
        f"{prov_path}"
    )
    print(
        f"padding efficiency: atoms {100 * d.N.sum() / before:.1f}% -> {100 * ea:.1f}%, grid "
        f"points {100 * d.n_grid.sum() / before_g:.1f}% -> {100 * eg:.1f}%; Dxyz: "
        f"{dipole_check}"
    )
    return 0


COMMANDS = {"inspect": _inspect, "validate": _validate, "convert": _convert}
