"""Accuracy of trained DCMNet models beside classical atom-charge baselines (kcal/mol/e).

Two studies, each one command:

  defaults    Train with the default config (`--split-by conformer`, any `--set KEY=VALUE`
              overrides) once per split seed and print the final validation ESP RMSE beside,
              on the same validation conformers and computed the same way (per-conformer MSE
              over valid grid points, averaged, sqrt):
                mono      the stored per-conformer ESP-fitted charges (fitted to this ESP: the
                          bound a one-charge-per-atom model cannot beat);
                shared    one least-squares set per molecule, fitted to its *training*
                          conformers (a prediction for the unseen conformers);
                element   one charge per element, fitted to the training split;
              plus the wall time of each training.

  generalise  Train with the molecule split (whole molecules held out) on `--data-files` and
              print the *test* ESP RMSE of the best checkpoint (chosen on validation) beside
                mmff94,   RDKit's MMFF94 and Gasteiger charges from each molecule's SMILES in the
                gasteiger file's provenance (molecules generated from SMILES), over the test
                          molecules the method has parameters for (RDKit's MMFF94 has none
                          that sum to 0 for CO2 and CS2);
                am1bcc    AM1-BCC charges (antechamber + sqm, AmberTools) at each test molecule's
                          first conformer's stored geometry (no re-optimisation), scored on all
                          its conformers, over the test molecules with a SMILES (a prediction);
                espaloma  EspalomaCharge charges (expaloma: a graph network trained on AM1-BCC)
                          from each test molecule's SMILES, no geometry (a prediction);
                gfn2      GFN2-xTB charges (tblite) the same way as am1bcc (a prediction);
                mulliken  the stored Mulliken charges (if the file has a `mulliken` key);
                element   one charge per element, fitted to the training split;
                lsq       one least-squares set per test molecule fitted to its own test ESP
                          (a bound, not a prediction);
                resp      two-stage RESP (Bayly et al. 1993), one set per test molecule fitted
                          to its own test ESP (a bound, not a prediction), over the test
                          molecules with a SMILES in the provenance;
                mono      the stored per-conformer ESP-fitted charges (also a bound).

  curve       The learning curve: `generalise` once per `--train-molecules` N (a count, or
              `all`), where only the first N training molecules of one seeded, nested order
              are kept (`data.train_molecules`); validation and test are those of the full
              molecule split of that seed (checked), so each point's test ESP RMSE sits beside
              the same size-independent baselines (lsq, resp, mmff94, gasteiger, am1bcc,
              espaloma, gfn2, mulliken, mono) and
              the element baseline fitted on that point's training molecules.

Usage:
  python bench/accuracy.py defaults --split-seeds 0 1 2
  python bench/accuracy.py generalise --data-files organic_esp.npz --split-seeds 0 1 2
  python bench/accuracy.py generalise --data-files organic large --by-size --split-seeds 0 1 2
  python bench/accuracy.py curve --data-files organic_esp.npz --train-molecules 25 50 100 all \
      --split-seeds 0
  ... [--num-epochs N] [--output-dir DIR] [--set features=32 --set n_dcm=3] [--json]

Timings are wall times on whatever machine runs this; on a shared machine report medians.

`--smoke` (any study): the study's whole path for the first `--split-seeds` seed only, 1 epoch
of a tiny model (4 features, degree 1, 1 iteration, 1 charge per atom, 4 basis functions;
`--set` still overrides), and for `curve` the first and last `--train-molecules` points only.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
from _smoke import SMOKE_MODEL

from dcmtune.analysis.breakdown import smiles_from_provenance
from dcmtune.config import config_from_flat
from dcmtune.data import ESPData, load_dataset, split_dataset
from dcmtune.data.baselines import (
    RDKIT_METHODS,
    element_charge_array,
    element_charges,
    esp_rmse_of_atom_charges,
    fit_esp_charges_shared,
    mulliken_charges,
    rdkit_charge_array,
    shared_charges_per_molecule,
)
from dcmtune.data.espaloma import espaloma_charge_array
from dcmtune.data.resp import resp_charges_per_molecule
from dcmtune.data.semiempirical import am1bcc_charge_array, gfn2_charge_array
from dcmtune.train.environment import use_compilation_cache

SMOKE_OVERRIDES = {"num_epochs": 1, **SMOKE_MODEL}


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair}: expected KEY=VALUE")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def shared_charges(fit_on: ESPData, apply_to: ESPData) -> np.ndarray:
    """(M, A) charges for `apply_to`: per molecule, one least-squares set fitted to all of that
    molecule's conformers in `fit_on` (total charge constrained); NaN rows where `fit_on` has no
    conformer of the molecule."""
    out = np.full(apply_to.Z.shape, np.nan)
    for mid in np.unique(apply_to.mol_id):
        src = np.flatnonzero(fit_on.mol_id == mid)
        if len(src) == 0:
            continue
        n = int(fit_on.N[src[0]])
        q = fit_esp_charges_shared(
            [fit_on.R[i, :n].astype(np.float64) for i in src],
            [fit_on.grid[i, : fit_on.n_grid[i]].astype(np.float64) for i in src],
            [fit_on.esp[i, : fit_on.n_grid[i]].astype(np.float64) for i in src],
            float(fit_on.Q[src[0]]),
        )
        dst = np.flatnonzero(apply_to.mol_id == mid)
        out[dst] = 0.0
        out[dst, :n] = q
    return out


def _train(config):
    from dcmtune.train.loop import fit

    t0 = time.perf_counter()
    result = fit(config)
    return result, time.perf_counter() - t0


def _splits(run_dir: Path, data: ESPData) -> dict[str, ESPData]:
    idx = json.loads((run_dir / "split.json").read_text())["indices"]
    return {k: data.subset(np.asarray(v, dtype=int)) for k, v in idx.items()}


def _config(args, seed: int, split_by: str, study: str, **extra):
    """The config of one run of a study (`extra`: more flat config fields)."""
    return config_from_flat(
        **{
            "split_by": split_by,
            "split_seed": seed,
            "output_dir": args.output_dir,
            "name": f"{study}_seed{seed}_{int(time.time())}",
            **({"num_epochs": args.num_epochs} if args.num_epochs else {}),
            **args.overrides,
            **extra,
        }
    )


def _load(cfg) -> ESPData:
    return load_dataset(cfg.data.data_files, cfg.model.max_atomic_number, cfg.data.dipole_units)


def _run_seed(args, seed: int, split_by: str, study: str, **extra):
    """Trains one split seed as the study says (`extra`: more flat config fields); returns
    (config, FitResult, wall seconds, {"all", "train", "valid", "test"} datasets of that run's
    recorded split, plus "indices": the recorded indices)."""
    cfg = _config(args, seed, split_by, study, **extra)
    data = _load(cfg)
    result, wall = _train(cfg)
    idx = json.loads((result.run_dir / "split.json").read_text())["indices"]
    return cfg, result, wall, {"all": data, **_splits(result.run_dir, data), "indices": idx}


def run_defaults(args) -> list[dict]:
    rows = []
    for seed in args.split_seeds:
        cfg, result, wall, s = _run_seed(args, seed, "conformer", "defaults")
        train, valid = s["train"], s["valid"]
        last = result.history[-1]
        rows.append(
            {
                "split_seed": seed,
                "epochs": len(result.history),
                "wall_s": wall,
                "model": last["valid_esp_rmse"],
                "model_best": min(r["valid_esp_rmse"] for r in result.history),
                "train": last["train_esp_rmse"],
                "mono": esp_rmse_of_atom_charges(valid, valid.mono)
                if valid.mono is not None
                else float("nan"),
                "shared": esp_rmse_of_atom_charges(valid, shared_charges(train, valid)),
                "element": esp_rmse_of_atom_charges(
                    valid, element_charge_array(valid, element_charges(train))
                ),
                "run_dir": str(result.run_dir),
            }
        )
        _print_row(rows[-1], ("model", "mono", "shared", "element"), args.json)
    return rows


def _test_model(cfg, result, test: ESPData) -> dict:
    """Test ESP RMSE of the run's best checkpoint (chosen on validation) and its epoch."""
    from dcmtune.train import checkpoints as ckpt
    from dcmtune.train.step import evaluate_params

    state, meta = ckpt.load_checkpoint(result.run_dir / "checkpoints" / "best")
    params = state["ema_params"] if cfg.training.use_ema else state["params"]
    return {
        "best_epoch": int(meta["epoch"]),
        "model": evaluate_params(params, test, cfg.model)["esp_rmse"],
    }


def _test_baselines(args, data: ESPData, test: ESPData, test_idx) -> dict:
    """The baselines on the test molecules that do not depend on the training split."""
    row = {"lsq": esp_rmse_of_atom_charges(test, shared_charges_per_molecule(test))}
    mull = mulliken_charges(list(args.data_files), data)
    if mull is not None:
        row["mulliken"] = esp_rmse_of_atom_charges(test, mull[test_idx])
    smiles = smiles_from_provenance(list(args.data_files))
    q, ok = resp_charges_per_molecule(test, smiles)  # a bound: fitted to the test ESP
    if ok.any():
        row["resp"] = esp_rmse_of_atom_charges(test.subset(np.flatnonzero(ok)), q[ok])
        row["resp_molecules"] = int(len(set(test.mol_id[ok])))
    for method in RDKIT_METHODS:  # predictive: from the bond graph (needs RDKit)
        q, ok = rdkit_charge_array(test, smiles, method)
        if ok.any():  # over the test molecules the method has parameters for
            row[method] = esp_rmse_of_atom_charges(test.subset(np.flatnonzero(ok)), q[ok])
            row[f"{method}_molecules"] = int(len(set(test.mol_id[ok])))
    one_set_per_molecule = {
        "am1bcc": lambda: am1bcc_charge_array(test, smiles),
        "espaloma": lambda: espaloma_charge_array(test, smiles),
        "gfn2": lambda: gfn2_charge_array(test, smiles.keys()),
    }
    for method, charges_of in one_set_per_molecule.items():  # predictive: conformer 0 or graph
        t0 = time.perf_counter()
        q, ok = charges_of()
        if ok.any():
            row[method] = esp_rmse_of_atom_charges(test.subset(np.flatnonzero(ok)), q[ok])
            row[f"{method}_molecules"] = int(len(set(test.mol_id[ok])))
            row[f"{method}_s"] = time.perf_counter() - t0
    if test.mono is not None:
        row["mono"] = esp_rmse_of_atom_charges(test, test.mono)
    return row


def _element(train: ESPData, test: ESPData) -> float:
    return esp_rmse_of_atom_charges(test, element_charge_array(test, element_charges(train)))


GENERALISE_COLS = (
    "model",
    "mmff94",
    "gasteiger",
    "am1bcc",
    "espaloma",
    "gfn2",
    "mulliken",
    "element",
    "lsq",
    "resp",
    "mono",
)
CURVE_COLS = (
    "model",
    "element",
    "lsq",
    "resp",
    "mmff94",
    "gasteiger",
    "am1bcc",
    "espaloma",
    "gfn2",
    "mulliken",
    "mono",
)


SMALL_HEAVY = 9  # `--by-size`: molecules of at most this many heavy atoms are "small"


def size_groups(test: ESPData, test_idx) -> list[tuple[str, ESPData, np.ndarray]]:
    """`--by-size`: the whole test split, then its molecules of <= SMALL_HEAVY heavy atoms and
    of more, as (label, subset, indices into the loaded data); empty groups are left out."""
    idx = np.asarray(test_idx, dtype=int)
    heavy = (test.Z > 1).sum(axis=1)
    out = [("all", test, idx)]
    for label, pick in (
        (f"heavy<={SMALL_HEAVY}", heavy <= SMALL_HEAVY),
        (f"heavy>={SMALL_HEAVY + 1}", heavy > SMALL_HEAVY),
    ):
        if pick.any() and not pick.all():
            out.append((label, test.subset(np.flatnonzero(pick)), idx[pick]))
    return out


def run_generalise(args) -> list[dict]:
    rows = []
    for seed in args.split_seeds:
        cfg, result, wall, s = _run_seed(args, seed, "molecule", "generalise")
        train = s["train"]
        groups = size_groups(s["test"], s["indices"]["test"])
        for label, test, test_idx in groups if args.by_size else groups[:1]:
            row = {
                "split_seed": seed,
                **({"group": label} if args.by_size else {}),
                "epochs": len(result.history),
                "wall_s": wall,
                "test_molecules": int(len(set(test.mol_id))),
                "test_conformers": int(test.num_conformers),
                **_test_model(cfg, result, test),
                "element": _element(train, test),
                **_test_baselines(args, s["all"], test, test_idx),
                "run_dir": str(result.run_dir),
            }
            rows.append(row)
            _print_row(row, GENERALISE_COLS, args.json, label=row.get("group", ""))
    return rows


def _check_curve(args) -> None:
    """Every point of every seed can be split (numpy only), before any training starts."""
    data = None
    for seed in args.split_seeds:
        for n in args.train_molecules:
            cfg = _config(args, seed, "molecule", "check", train_molecules=n)
            data = data if data is not None else _load(cfg)
            try:
                split_dataset(data, cfg.data)
            except ValueError as e:
                print(
                    f"accuracy.py curve: --train-molecules {n} (split_seed {seed}): {e}",
                    file=sys.stderr,
                )
                raise SystemExit(2) from None


def run_curve(args) -> list[dict]:
    _check_curve(args)
    rows = []
    for seed in args.split_seeds:
        held_out, baselines = None, None
        for n in args.train_molecules:  # None: all of the split's training molecules
            cfg, result, wall, s = _run_seed(
                args, seed, "molecule", f"curve{n or 'all'}", train_molecules=n
            )
            train, test = s["train"], s["test"]
            if held_out is None:  # the full split of this seed: every point must share it
                held_out = split_dataset(
                    s["all"], dataclasses.replace(cfg.data, train_molecules=None)
                )
                baselines = _test_baselines(args, s["all"], test, s["indices"]["test"])
            if any(s["indices"][k] != held_out[k].tolist() for k in ("valid", "test")) or not set(
                s["indices"]["train"]
            ) <= set(held_out["train"].tolist()):
                raise SystemExit(
                    f"split_seed {seed}, train_molecules {n}: the run's split is "
                    "not the full split's valid/test with a subset of its train"
                )
            row = {
                "split_seed": seed,
                "train_molecules": int(len(set(train.mol_id))),
                "train_conformers": int(train.num_conformers),
                "test_molecules": int(len(set(test.mol_id))),
                "test_conformers": int(test.num_conformers),
                "epochs": len(result.history),
                "wall_s": wall,
                **_test_model(cfg, result, test),
                "element": _element(train, test),
                **baselines,
                "run_dir": str(result.run_dir),
            }
            rows.append(row)
            _print_row(
                row,
                CURVE_COLS,
                args.json,
                label=f"{row['train_molecules']} train molecules "
                f"({row['train_conformers']} conformers)",
            )
    return rows


def _train_molecules(value: str):
    """--train-molecules item: a positive count, or `all` (None)."""
    if value == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive count or 'all', got {value!r}")
    return n


def _print_row(row: dict, cols, as_json: bool, label: str = "") -> None:
    if as_json:
        return
    vals = "  ".join(f"{c} {row[c]:.3f}" for c in cols if c in row)
    print(
        f"split_seed {row['split_seed']}{', ' + label if label else ''}: {vals}  "
        f"({row['epochs']} epochs, {row['wall_s']:.0f} s)",
        flush=True,
    )


def _summary(rows: list[dict], cols) -> None:
    """Per group (`--by-size`) or once: one line per seed, then the median and the mean."""
    for group in dict.fromkeys(r.get("group") for r in rows):
        rs = [r for r in rows if r.get("group") == group]
        print(("" if group is None else f"\ntest molecules: {group}") + _header("", cols))
        for r in rs:
            print(_line(f"{r['split_seed']:>10}", r, cols))
        for name, stat in (("median", np.median), ("mean", np.mean)):
            print(
                f"{name:>10}"
                + "".join(
                    f"{stat([r[c] for r in rs if c in r]):>10.3f}"
                    if any(c in r for r in rs)
                    else f"{'-':>10}"
                    for c in cols
                )
                + f"{stat([r['wall_s'] for r in rs]):>9.0f}"
            )


def _header(lead: str, cols) -> str:
    return f"\n{'split_seed':>10}{lead}" + "".join(f"{c:>10}" for c in cols) + f"{'wall s':>9}"


def _line(lead: str, r: dict, cols) -> str:
    """One row: `lead`, each column's value (or -), the wall time."""
    cells = "".join(f"{r[c]:>10.3f}" if c in r else f"{'-':>10}" for c in cols)
    return f"{lead}{cells}{r['wall_s']:>9.0f}"


def _curve_summary(rows: list[dict], cols) -> None:
    print(_header(f"{'train mol':>10}{'conf':>6}", cols))
    for r in rows:
        lead = f"{r['split_seed']:>10}{r['train_molecules']:>10}{r['train_conformers']:>6}"
        print(_line(lead, r, cols))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="study", required=True)
    for name, helptext in (
        ("defaults", "default model, conformer split, demo set or files"),
        ("generalise", "molecule split: test molecules never seen"),
        ("curve", "molecule split, test RMSE vs training molecules"),
    ):
        q = sub.add_parser(name, help=helptext)
        q.add_argument(
            "--data-files",
            nargs="+",
            default=[],
            required=(name != "defaults"),
            help=".npz files (default: demo set)",
        )
        if name == "curve":
            q.add_argument(
                "--train-molecules",
                nargs="+",
                type=_train_molecules,
                default=[25, 50, 100, None],
                metavar="N|all",
                help="training molecules per point (default: 25 50 100 all)",
            )
        q.add_argument("--split-seeds", nargs="+", type=int, default=[0, 1, 2])
        q.add_argument("--num-epochs", type=int, default=None, help="default: the config's")
        q.add_argument("--output-dir", default="experiments/bench_accuracy")
        q.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="any flat config field, e.g. features=32",
        )
        q.add_argument("--json", action="store_true", help="print one JSON document at the end")
        if name == "generalise":
            q.add_argument(
                "--by-size",
                action="store_true",
                help=f"also report the test molecules of <= {SMALL_HEAVY} heavy atoms and of "
                "more on their own",
            )
        q.add_argument(
            "--smoke", action="store_true", help="first split seed, 1 epoch of a tiny model"
        )
    args = p.parse_args(argv)
    args.overrides = _overrides(args.overrides)
    if args.smoke:
        args.split_seeds = args.split_seeds[:1]
        args.overrides = {**SMOKE_OVERRIDES, **args.overrides}
        if args.study == "curve":
            args.train_molecules = list(
                dict.fromkeys(args.train_molecules[:1] + args.train_molecules[-1:])
            )
    if args.data_files:
        args.overrides["data_files"] = list(args.data_files)
    use_compilation_cache(Path(args.output_dir).resolve() / ".jax_cache")
    if args.study == "defaults":
        rows, cols = run_defaults(args), ("model", "mono", "shared", "element")
        title = "valid ESP RMSE (kcal/mol/e), conformer split, same validation conformers"
    elif args.study == "generalise":
        rows, cols = run_generalise(args), GENERALISE_COLS
        title = (
            "test ESP RMSE (kcal/mol/e), molecule split (lsq, resp and mono: fitted to the test "
            "ESP)"
        )
    else:
        rows, cols = run_curve(args), CURVE_COLS
        title = (
            "test ESP RMSE (kcal/mol/e) vs training molecules, molecule split, same "
            "valid/test molecules (element: fitted to each point's training molecules)"
        )
    if args.json:
        json.dump(
            {"study": args.study, "overrides": args.overrides, "rows": rows}, sys.stdout, indent=1
        )
        print()
    else:
        print(f"\n{title}")
        (_curve_summary if args.study == "curve" else _summary)(rows, cols)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
