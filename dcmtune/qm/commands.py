"""The generator's commands of `python -m dcmtune.data`: generate and verify ESP files.

  generate  PySCF ESP data for ASE g2 molecules, .xyz files and SMILES (needs the `qm` extra)
  verify    regenerate a sample of a generated file's molecules and compare within tolerances

`add_commands` registers them on the command's sub-parsers (`dcmtune.data.__main__`). Bad
inputs raise `QMError` (one line, exit 2) before any SCF runs; nothing is written. `generate
--address` runs on an existing Ray cluster: the data command hands `generate` a `connect`
(`dcmtune.sweep.ray_generate.connect`; no Ray below the sweep).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from dcmtune.data.file_format import provenance_path
from dcmtune.qm import generator as gen
from dcmtune.qm.inputs import load_molecules
from dcmtune.qm.specs import GenerationSettings, QMError
from dcmtune.qm.verify import TOLERANCES, verify_sample

__all__ = ["add_commands", "generate", "COMMANDS"]


def add_commands(sub) -> None:
    """Registers generate and verify on `sub` (argparse sub-parsers)."""
    _add_generate(sub)
    _add_verify(sub)


# The inputs of `generate`: flag -> (metavar, help); each takes one or more values.
_INPUTS = {
    "--molecules": ("NAME", "ASE g2 molecule names (ase.collections.g2), e.g. H2O NH3 C6H6"),
    "--xyz": ("FILE", ".xyz files (first frame; mol_id = file stem)"),
    "--smiles": (
        "SMILES",
        "neutral closed-shell SMILES (RDKit ETKDG + MMFF geometry; mol_id = canonical SMILES)",
    ),
    "--smiles-file": (
        "FILE",
        "CSV molecule lists with columns name,smiles[,class] (mol_id = name; # comments)",
    ),
}
# The settings of `generate`: flag -> (type, default, help); `GenerationSettings` checks them.
_SETTINGS = {
    "--conformers": (int, 10, "conformers per molecule; the first is the input geometry (10)"),
    "--method": (str, "HF", "HF or a DFT functional, e.g. B3LYP (HF)"),
    "--basis": (str, "6-31G*", "PySCF basis name (6-31G*)"),
    "--sigma": (float, 0.025, "Gaussian displacement per coordinate, Angstrom (0.025)"),
    "--density": (float, 1.0, "grid points per Angstrom^2 on each vdW shell (1.0)"),
    "--max-grid": (int, 1200, "at most this many grid points per conformer (1200)"),
    "--seed": (int, 0, "random seed (0)"),
    "--charge": (int, 0, "total charge of every molecule (0)"),
    "--spin": (int, None, "2S = unpaired electrons; required for odd electron counts"),
    "--density-fit": (
        str,
        "",
        "auxiliary basis for density-fitted SCF, e.g. cc-pVDZ-JKFIT: several times faster for "
        "10+ heavy atoms (exact integrals)",
    ),
    "--workers": (int, 2, "single-threaded worker processes (2); 0 = in this process"),
}


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="PySCF ESP data (needs the qm extra)")
    for flag, (metavar, text) in _INPUTS.items():
        g.add_argument(flag, nargs="+", default=[], metavar=metavar, help=text)
    g.add_argument("--out", required=True, type=Path, help="output .npz file")
    g.add_argument(
        "--force",
        action="store_true",
        help="replace an existing output and discard molecules kept by a run with other settings",
    )
    for flag, (kind, default, text) in _SETTINGS.items():
        g.add_argument(flag, type=kind, default=default, help=text)
    g.add_argument(
        "--address",
        default=None,
        help="run one task per molecule on this existing Ray cluster (auto or HOST:PORT); "
        "--workers is then unused",
    )
    g.add_argument(
        "--cpus-per-task",
        type=int,
        default=None,
        help="CPUs (and PySCF/BLAS threads) per molecule's task with --address (1)",
    )


def _add_verify(sub) -> None:
    v = sub.add_parser("verify", help="regenerate a sample of molecules and compare (qm extra)")
    v.add_argument("file", type=Path, help="a generated .npz with its provenance JSON")
    v.add_argument(
        "--molecules",
        nargs="+",
        default=[],
        metavar="MOL_ID",
        help="molecules to regenerate (default: --sample of them, seeded)",
    )
    v.add_argument("--sample", type=int, default=3, help="molecules drawn when none given (3)")
    v.add_argument("--seed", type=int, default=0, help="seed of the draw (0)")
    v.add_argument("--workers", type=int, default=2, help="worker processes (2)")


def _settings(args) -> GenerationSettings:
    return GenerationSettings(
        conformers=args.conformers,
        method=args.method,
        basis=args.basis,
        sigma=args.sigma,
        density=args.density,
        max_grid=args.max_grid,
        seed=args.seed,
        charge=args.charge,
        spin=args.spin,
        density_fit=args.density_fit,
    )


Connect = Callable[[str, int], gen.Runner]
"""connect(address, cpus_per_task) joins a Ray cluster and returns a runner with close()."""


def generate(args, connect: Connect | None = None) -> int:
    """`generate`: checks every input, joins the Ray cluster with `--address` (through
    `connect`), then generates with a progress bar (kept molecules count as done)."""
    from tqdm import tqdm  # optuna's dependency, so always present.

    settings = _settings(args)
    # Every input check first: a bad input leaves one line on stderr and no progress bar.
    gen.check_output(args.out, args.force)
    if args.cpus_per_task is not None and not args.address:
        raise QMError("--cpus-per-task: only with --address (a Ray cluster)")
    specs = load_molecules(args.molecules, args.xyz, args.smiles, args.smiles_file, seed=args.seed)
    gen.check_inputs(specs, settings, args.workers)
    runner = None
    if args.address:
        if connect is None:
            raise QMError("--address: this command cannot reach Ray")
        runner = connect(args.address, args.cpus_per_task or 1)
    try:
        with tqdm(
            total=len(specs) * args.conformers,
            unit="conf",
            file=sys.stderr,
            desc="generate",
            dynamic_ncols=True,
        ) as bar:

            def progress(name: str, n: int) -> None:
                bar.set_postfix_str(name, refresh=False)
                bar.update(n)

            prov = gen.generate_dataset(
                args.out,
                specs,
                settings,
                workers=args.workers,
                progress=progress,
                force=args.force,
                runner=runner,
            )
    finally:
        close = getattr(runner, "close", None)
        if close is not None:
            close()  # disconnects from the Ray cluster
    _report(args, prov)
    return 0


def _report(args, prov: dict) -> None:
    t = prov["timing"]
    kept = prov["resumed"]["kept_molecules"]
    print(
        f"wrote {args.out} ({t['conformers']} conformers of {len(prov['molecules'])} "
        f"molecules) and {provenance_path(args.out)}"
        + (f"; {len(kept)} molecules kept from an interrupted run" if kept else "")
    )
    if "ray" in t:
        n = t["ray"]["cpus_per_task"]
        where = f"on Ray at {t['ray']['address']} ({n} CPU{'s' if n != 1 else ''} per task)"
    else:
        where = f"with {t['workers']} workers"
    rate = t["conformers_per_hour"]
    print(
        f"{t['wall_seconds']:.0f} s {where}"
        + (f": {rate:.0f} conformers/hour" if rate is not None else "")
    )


def _verify(args) -> int:
    if args.sample < 1:
        raise QMError(f"--sample: expected >= 1, got {args.sample}")
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
        print(
            f"error: {args.file}: {len(bad)} of {len(rows)} regenerated molecules differ "
            f"beyond tolerance: {', '.join(bad)}",
            file=sys.stderr,
        )
        return 1
    print(f"ok: {len(rows)} molecules of {args.file} regenerated within tolerance")
    return 0


COMMANDS = {"generate": generate, "verify": _verify}
