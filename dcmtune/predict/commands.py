"""`python -m dcmtune.predict MODEL INPUT`: charges, dipoles and ESP of new molecules.

    python -m dcmtune.predict ray_results/quick/best_model mol.xyz --esp-grid shell --plot

Writes OUT (`.npz` or `.json`, default `<input stem>.dcm.npz` in the current directory), the
extended XYZ `<OUT stem>.xyz` (atoms, then charge sites as element X with a `charge` column)
and with `--plot` the picture `<OUT stem>.png` (of the first molecule); prints one row per
molecule. A dcmtune `.npz` data file as INPUT is evaluated on its own grid against its
reference ESP (the table adds the ESP RMSE).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dcmtune.cli import OneLineParser, run_cli
from dcmtune.predict.outputs import write_extxyz, write_predictions
from dcmtune.predict.plot import plot_prediction
from dcmtune.predict.predictor import SHELL, MoleculePrediction, PredictError, load_model

__all__ = ["main", "build_parser", "format_table"]

MAX_ROWS = 20
MAX_ATOMS_SHOWN = 6


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m dcmtune.predict",
        description="Predict distributed charges, dipoles and ESP with a trained DCMNet.",
    )
    p.add_argument(
        "model",
        type=Path,
        help="checkpoint dir, run/trial dir, a sweep's best_model/ or the sweep dir",
    )
    p.add_argument(
        "input",
        type=Path,
        help="molecules: a file ASE reads (xyz/extxyz: all frames, sdf, pdb, ...) "
        "or a dcmtune .npz data file",
    )
    p.add_argument(
        "--charge",
        type=float,
        default=None,
        help="total charge of every molecule in e (default 0; a .npz file's Q)",
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
        help="results file, .npz or .json (default <input stem>.dcm.npz)",
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


def _outputs(args: argparse.Namespace) -> dict[str, Path]:
    out = args.out if args.out is not None else Path(f"{args.input.stem}.dcm.npz")
    if out.suffix not in (".npz", ".json"):
        raise PredictError(f"--out {out}: expected a name ending in .npz or .json")
    files = {"results": out, "extxyz": out.with_suffix(".xyz")}
    if args.plot:
        files["plot"] = out.with_suffix(".png")
    for f in files.values():
        if f.resolve() == args.input.resolve():
            raise PredictError(
                f"--out {out}: would overwrite the input {args.input} with {f}; "
                "choose another --out"
            )
    return files


def _predict(args: argparse.Namespace) -> int:
    # 1. Everything the user typed is checked before the model is loaded.
    if args.batch_size is not None and args.batch_size < 1:
        raise PredictError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    files = _outputs(args)
    points = _esp_points(args.esp_grid)
    if not args.input.is_file():
        raise PredictError(f"{args.input}: input file not found")

    # 2. Model, predictions, files.
    predictor = load_model(args.model)
    preds = predictor.predict(
        args.input, charge=args.charge, esp_points=points, batch_size=args.batch_size
    )
    write_predictions(preds, files["results"], model=predictor.path)
    write_extxyz(preds, files["extxyz"])
    if args.plot:
        first = preds[0]
        if first.esp is None:  # the picture needs an ESP: the shell grid of this molecule
            [first] = predictor.predict(
                (first.numbers, first.positions), charge=first.total_charge, esp_points=SHELL
            )
        plot_prediction(first, files["plot"], title=f"{first.source} - {predictor.path}")

    # 3. The table.
    print(
        f"model {predictor.path} (epoch {predictor.epoch}, n_dcm {predictor.n_dcm}); "
        f"{len(preds)} molecule{'s' if len(preds) != 1 else ''} from {args.input}"
    )
    print(format_table(preds))
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
