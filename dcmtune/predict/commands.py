"""`python -m dcmtune.predict MODEL [INPUT] [--smiles S ...]`: charges, dipoles and ESP of
new molecules.

    python -m dcmtune.predict ray_results/quick/best_model mols.sdf --esp-grid shell --plot
    python -m dcmtune.predict ray_results/quick/best_model --smiles CCO 'C[NH3+]'

Writes OUT (`.npz` or `.json`, default `<input stem>.dcm.npz` in the current directory, or
`smiles.dcm.npz`), the extended XYZ `<OUT stem>.xyz` (atoms, then charge sites as element X
with a `charge` column), the PQR `<OUT stem>.pqr` (atoms with radii, charge sites with charges
and radius 0), the charge sites in local frames `<OUT stem>.sites.json`, and with `--plot` the
picture `<OUT stem>.png` (of the first molecule); prints one row per molecule, then one
`warning:` line per distinct warning (out of the training domain, doubtful input) on stderr.
A dcmtune `.npz` data file as INPUT is evaluated on its own grid against its reference ESP
(the table adds the ESP RMSE).

Ensembles (`dcmtune.predict.ensemble`): several models, or an experiment's top-k trials,
predict together; OUT then holds their mean ESP, monopoles and dipole, each molecule's spread and
distrust flag (no charge-site files: members' charges have no site-by-site mean):

    python -m dcmtune.predict run_seed0 mols.sdf --ensemble run_seed1 run_seed2
    python -m dcmtune.predict experiments/my_sweep mols.sdf --top-k 5
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dcmtune.cli import OneLineParser, run_cli
from dcmtune.predict.domain import PredictWarning
from dcmtune.predict.ensemble import DEFAULT_QUANTILE, EnsemblePrediction, load_ensemble
from dcmtune.predict.inputs import smiles_molecules
from dcmtune.predict.outputs import (
    write_ensemble_predictions,
    write_extxyz,
    write_pqr,
    write_predictions,
    write_sites,
)
from dcmtune.predict.plot import plot_prediction
from dcmtune.predict.predictor import SHELL, MoleculePrediction, PredictError, load_model

__all__ = ["main", "build_parser", "format_table", "format_ensemble_table"]

MAX_ROWS = 20
EPILOG = (
    "Writes OUT (.npz or .json) and beside it <OUT stem>.xyz (extended XYZ, charge sites as X), "
    "<OUT stem>.pqr (atoms with vdW radii, charge sites with radius 0) and <OUT stem>.sites.json "
    "(each charge site in a local frame of its atom and two others, for virtual sites; spread "
    "over conformers). Molecules outside the model's training domain (an element or total "
    "charge never seen, more atoms than the largest training molecule) are predicted with a "
    "warning on stderr and in the files. With --ensemble or --top-k only OUT is written: the "
    "members' mean ESP, monopoles and dipole, each molecule's spread and distrust flag. See "
    "docs/predict.md."
)
MAX_ATOMS_SHOWN = 6


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m dcmtune.predict",
        description="Predict distributed charges, dipoles and ESP with a trained DCMNet.",
        epilog=EPILOG,
    )
    p.add_argument(
        "model",
        type=Path,
        help="checkpoint, run or sweep dir, best_model/, or a shipped model (organic-v2)",
    )
    p.add_argument(
        "input",
        type=Path,
        nargs="?",
        default=None,
        help="molecules, every record: xyz/extxyz, sdf, mol2, .smi (SMILES [name] per line), "
        "pdb or another file ASE reads, or a dcmtune .npz data file",
    )
    p.add_argument(
        "--smiles",
        nargs="+",
        default=[],
        metavar="SMILES",
        help="molecules as SMILES (RDKit ETKDG + MMFF conformer, recorded), after INPUT's",
    )
    p.add_argument(
        "--charge",
        type=float,
        default=None,
        help="total charge of every molecule in e, overriding the input's (default: SDF and "
        "SMILES formal charges, mol2 partial charges rounded, a .npz file's Q, else 0)",
    )
    p.add_argument(
        "--esp-grid",
        default=None,
        metavar="shell|FILE.npy",
        help="also compute the ESP: 'shell' (vdW shells, the generator's grid) or "
        "points in Angstrom from a .npy file, (G, 3) for every molecule or "
        "(M, G, 3) one set per molecule",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results file, .npz or .json (default <input stem>.dcm.npz, or smiles.dcm.npz)",
    )
    p.add_argument(
        "--plot",
        action="store_true",
        help="also draw the first molecule's charges and ESP to <out stem>.png",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="molecules per compiled call (default 8 on CPU, 256 on GPU)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="INFO logging")
    return _with_ensemble_arguments(p)


def _with_ensemble_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser with --ensemble, --top-k and the distrust threshold."""
    e = p.add_argument_group(
        "ensembles",
        "several models predict together: their mean ESP (on the input's grid, else the vdW "
        "shells), monopoles and dipole, and per molecule their spread (RMS over the grid of the "
        "members' ESP standard deviation, kcal/mol/e) and a distrust flag; writes OUT only",
    )
    e.add_argument(
        "--ensemble",
        nargs="+",
        action="extend",
        default=[],
        metavar="MODEL",
        help="more models (as MODEL) predicting with MODEL; give them after INPUT",
    )
    e.add_argument(
        "--top-k",
        type=int,
        default=None,
        metavar="K",
        help="MODEL is an experiment (a sweep, or a directory of training runs): the ensemble "
        "of its K best trials by the validation metric, as ranking orders them",
    )
    e.add_argument(
        "--distrust-quantile",
        type=float,
        default=DEFAULT_QUANTILE,
        metavar="Q",
        help="distrust a molecule whose spread exceeds this quantile of the spread on the "
        f"members' validation conformers (default {DEFAULT_QUANTILE})",
    )
    e.add_argument(
        "--distrust-above",
        type=float,
        default=None,
        metavar="KCAL",
        help="distrust a molecule whose spread exceeds this, kcal/mol/e (instead of the quantile)",
    )
    return p


def _esp_points(spec: str | None):
    if spec is None or spec == SHELL:
        return spec
    path = Path(spec)
    if path.suffix != ".npy":
        raise PredictError(f"--esp-grid: expected 'shell' or a .npy file of points, got {spec!r}")
    if not path.is_file():
        raise PredictError(f"{path}: ESP grid file not found")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise PredictError(
            f"{path}: not a readable .npy array ({' '.join(str(e).split())})"
        ) from None


def _monopole_text(p: MoleculePrediction) -> str:
    from ase.data import chemical_symbols

    parts = [
        f"{chemical_symbols[z]}{q:+.3f}"
        for z, q in zip(p.numbers[:MAX_ATOMS_SHOWN], p.monopoles[:MAX_ATOMS_SHOWN], strict=True)
    ]
    more = len(p.numbers) - MAX_ATOMS_SHOWN
    return " ".join(parts) + (f" ... (+{more})" if more > 0 else "")


def format_table(preds: Sequence[MoleculePrediction], max_rows: int = MAX_ROWS) -> str:
    """One row per molecule: source, formula, total charge (e), dipole (D), the reference
    dipole's magnitude and the ESP RMSE (kcal/mol/e) when a data file gives them, and the first
    atoms' monopoles (e)."""
    rmse = any(p.esp_rmse is not None for p in preds)
    ref = any(p.dipole_reference is not None for p in preds)
    head = (
        f"{'#':>4}  {'molecule':<23}{'formula':<12}{'Q (e)':>6}{'|mu| (D)':>10}"
        f"{'mu_x':>8}{'mu_y':>8}{'mu_z':>8}"
        + (f"{'ref |mu|':>10}" if ref else "")
        + (f"{'ESP RMSE':>10}" if rmse else "")
        + "  monopoles (e)"
    )
    lines = [head]
    for i, p in enumerate(preds[:max_rows]):
        mu = p.dipole
        src = p.source if len(p.source) <= 22 else "..." + p.source[-19:]
        row = (
            f"{i:>4}  {src:<23}{p.formula[:11]:<12}{p.total_charge:>6.2g}"
            f"{p.dipole_magnitude:>10.3f}{mu[0]:>8.3f}{mu[1]:>8.3f}{mu[2]:>8.3f}"
        )
        if ref:
            row += (
                f"{np.linalg.norm(p.dipole_reference):>10.3f}"
                if p.dipole_reference is not None
                else f"{'-':>10}"
            )
        if rmse:
            row += f"{p.esp_rmse:>10.3f}" if p.esp_rmse is not None else f"{'-':>10}"
        lines.append(row + "  " + _monopole_text(p))
    if len(preds) > max_rows:
        lines.append(f"... {len(preds) - max_rows} more molecules (all in the output file)")
    if rmse:
        vals = np.array([p.esp_rmse for p in preds if p.esp_rmse is not None])
        lines.append(
            f"ESP RMSE (kcal/mol/e) over {len(vals)} molecules: mean {vals.mean():.3f}"
            f", RMS {np.sqrt(np.mean(vals**2)):.3f}, max {vals.max():.3f}"
        )
    return "\n".join(lines)


def _outputs(args: argparse.Namespace, ensemble: bool = False) -> dict[str, Path]:
    stem = args.input.stem if args.input is not None else "smiles"
    out = args.out if args.out is not None else Path(f"{stem}.dcm.npz")
    if out.suffix not in (".npz", ".json"):
        raise PredictError(f"--out {out}: expected a name ending in .npz or .json")
    files = {"results": out}
    if not ensemble:
        files.update(
            extxyz=out.with_suffix(".xyz"),
            pqr=out.with_suffix(".pqr"),
            sites=out.with_suffix(".sites.json"),
        )
    if args.plot:
        files["plot"] = out.with_suffix(".png")
    for f in files.values():
        if args.input is not None and f.resolve() == args.input.resolve():
            raise PredictError(
                f"--out {out}: would overwrite the input {args.input} with {f}; "
                "choose another --out"
            )
    return files


def _predict_warned(predict, *args, **kwargs) -> tuple[list[Any], list[str]]:
    """`predict(...)` and the PredictWarnings it issued (other warnings are shown as usual)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        preds = predict(*args, **kwargs)
    lines = []
    for w in caught:
        if issubclass(w.category, PredictWarning):
            lines.append(str(w.message))
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return preds, lines


def _predict(args: argparse.Namespace) -> int:
    # 1. Everything the user typed is checked before the model is loaded.
    if args.batch_size is not None and args.batch_size < 1:
        raise PredictError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    if args.input is None and not args.smiles:
        raise PredictError("expected molecules: an INPUT file, --smiles SMILES ..., or both")
    ensemble = bool(args.ensemble) or args.top_k is not None
    if ensemble and args.plot:
        raise PredictError("--plot: draws one model's charges; not with --ensemble or --top-k")
    if args.ensemble and args.top_k is not None:
        raise PredictError("--top-k takes its members from MODEL's experiment; not with --ensemble")
    files = _outputs(args, ensemble=ensemble)
    points = _esp_points(args.esp_grid)
    if args.input is not None and not args.input.is_file():
        raise PredictError(f"{args.input}: input file not found")
    molecules = ([args.input] if args.input is not None else []) + smiles_molecules(args.smiles)
    if ensemble:
        return _predict_ensemble(args, files, molecules, points)

    # 2. Model, predictions (with their warnings), files.
    predictor = load_model(args.model)
    preds, warned = _predict_warned(
        predictor.predict,
        molecules,
        charge=args.charge,
        esp_points=points,
        batch_size=args.batch_size,
    )
    _write(args, files, predictor, preds)

    # 3. The table, the warnings.
    where = _where(args)
    print(
        f"model {predictor.path} (epoch {predictor.epoch}, n_dcm {predictor.n_dcm}); "
        f"{len(preds)} molecule{'s' if len(preds) != 1 else ''} from {where}"
    )
    print(format_table(preds))
    for line in warned:
        print(f"warning: {line}", file=sys.stderr)
    print("wrote " + ", ".join(str(f) for f in files.values()))
    return 0


def _where(args: argparse.Namespace) -> str:
    """Where the molecules came from, for the table's heading: the input file, the SMILES."""
    return " and ".join(
        ([str(args.input)] if args.input is not None else [])
        + ([f"{len(args.smiles)} SMILES"] if args.smiles else [])
    )


def _write(args: argparse.Namespace, files: dict[str, Path], predictor, preds) -> None:
    write_predictions(preds, files["results"], model=predictor.path, domain=predictor.domain)
    write_extxyz(preds, files["extxyz"])
    write_pqr(preds, files["pqr"])
    write_sites(preds, files["sites"], model=predictor.path)
    if args.plot:
        first = preds[0]
        if first.esp is None:  # the picture needs an ESP: the shell grid of this molecule
            [first], _ = _predict_warned(  # its warnings are the ones already collected
                predictor.predict,
                (first.numbers, first.positions),
                charge=first.total_charge,
                esp_points=SHELL,
            )
        plot_prediction(first, files["plot"], title=f"{first.source} - {predictor.path}")


def format_ensemble_table(preds: Sequence[EnsemblePrediction], max_rows: int = MAX_ROWS) -> str:
    """One row per molecule: source, formula, total charge (e), the mean dipole and its spread
    (D), the ESP spread (kcal/mol/e), the distrust flag, and the mean's ESP RMSE (kcal/mol/e)
    when a data file gives a reference."""
    rmse = any(p.esp_rmse is not None for p in preds)
    lines = [
        f"{'#':>4}  {'molecule':<23}{'formula':<12}{'Q (e)':>6}{'|mu| (D)':>10}{'+/- (D)':>9}"
        f"{'spread':>9}  {'distrust':<9}" + (f"{'ESP RMSE':>9}" if rmse else "")
    ]
    lines[0] = lines[0].rstrip()
    for i, p in enumerate(preds[:max_rows]):
        src = p.source if len(p.source) <= 22 else "..." + p.source[-19:]
        flag = "-" if p.distrust is None else ("DISTRUST" if p.distrust else "ok")
        row = (
            f"{i:>4}  {src:<23}{p.formula[:11]:<12}{p.total_charge:>6.2g}"
            f"{p.dipole_magnitude:>10.3f}{np.linalg.norm(p.dipole_std):>9.3f}"
            f"{p.spread:>9.3f}  {flag:<9}"
        )
        if rmse:
            row += f"{p.esp_rmse:>9.3f}" if p.esp_rmse is not None else f"{'-':>9}"
        lines.append(row.rstrip())
    if len(preds) > max_rows:
        lines.append(f"... {len(preds) - max_rows} more molecules (all in the output file)")
    flagged = sum(bool(p.distrust) for p in preds)
    lines.append(
        f"ESP spread (kcal/mol/e) over {len(preds)} molecules: median "
        f"{np.median([p.spread for p in preds]):.3f}, max {max(p.spread for p in preds):.3f}; "
        f"{flagged} to distrust"
    )
    return "\n".join(lines)


def _predict_ensemble(args: argparse.Namespace, files, molecules, points) -> int:
    ensemble = load_ensemble(
        [args.model, *args.ensemble],
        top_k=args.top_k,
        quantile=args.distrust_quantile,
        threshold=args.distrust_above,
    )
    preds, warned = _predict_warned(
        ensemble.predict,
        molecules,
        charge=args.charge,
        esp_points=points,
        batch_size=args.batch_size,
    )
    write_ensemble_predictions(
        preds,
        files["results"],
        members=ensemble.paths,
        threshold=ensemble.threshold,
        calibration=ensemble.calibration,
    )
    where = _where(args)
    print(
        f"ensemble of {len(ensemble.members)} models; {len(preds)} "
        f"molecule{'s' if len(preds) != 1 else ''} from {where}"
    )
    for k, m in enumerate(ensemble.members):
        print(f"  member {k}: {m.path} (epoch {m.epoch}, n_dcm {m.n_dcm})")
    c = ensemble.calibration
    if c is None:
        print("distrust threshold: none (the members' validation data was not found)")
    elif c.get("quantile") is not None:
        print(
            f"distrust threshold {c['threshold']:.3f} kcal/mol/e: the {c['quantile']:g} quantile "
            f"of the spread on {c['conformers']} validation conformers ({c['molecules']} "
            "molecules) of the members"
        )
    else:
        print(f"distrust threshold {c['threshold']:.3f} kcal/mol/e (given)")
    print(format_ensemble_table(preds))
    for line in warned:
        print(f"warning: {line}", file=sys.stderr)
    print("wrote " + ", ".join(str(f) for f in files.values()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dcmtune.predict`: exit 0 on success, 2 on bad input (one line), 1 when the
    disk fails."""
    return run_cli(
        _predict,
        build_parser(),
        argv,
        bad_input=(PredictError,),
        failures=(OSError,),
        verbose=lambda a: a.verbose,
    )
