"""Uncertainty from the sweep itself (issue 23 item 5): does an ensemble's spread say which
molecules it gets wrong?

    python bench/ensemble_uncertainty.py [--splits 0 1 2] [--seeds 0 1 2]
        [--storage experiments/ensemble_uncertainty] [--runs SPLIT=DIR ...]
        [--resamples 2000] [--json FILE]

Per split seed S (the organic set, molecule split, as search_spaces/accurate.yaml):

1. Members: the default configuration (bench/sweep_value.py's `defaults_config`: the accurate
   spec with the documented defaults, 60 epochs) trained with the training seeds `--seeds`, one
   run directory each, `defaults_seed<k>` in `--runs S=DIR` if given, else in
   `<storage>/split<S>_defaults` (missing runs there are trained first, one at a time). Each
   run's config is checked: split seed S, the organic set, split by molecule, training seed k,
   the defaults' model and training sections.
2. The ensemble (`dcmtune.load_ensemble`, its distrust threshold calibrated on the members'
   validation conformers) predicts the split's test conformers on their own grids.
3. Per test molecule (its conformers pooled): the ensemble's ESP RMSE (error), its spread (RMS
   over the molecule's grid points of the members' standard deviation of the ESP), and two
   simple proxies: the RMS of the predicted ESP and the atom count.

Then, pooled over the splits' molecules: Spearman's rank correlation of each with the error,
with a 95% bootstrap interval (molecules resampled, `--resamples`, seed 0), and of the spread's
advantage over each proxy (paired resamples); the target is Spearman >= 0.5 and >= 0.15 above
both proxies. Also per split: the ensemble's test ESP RMSE against the best single member
chosen on validation (lowest valid ESP RMSE at its best checkpoint), and how the test
conformers the ensemble distrusts fare. `--smoke`: the demo set, a tiny model, 2 epochs, 2
seeds, split seed 0, 200 resamples.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _smoke import SMOKE_MODEL
from scipy.stats import spearmanr
from sweep_value import defaults_config

from dcmtune import load_ensemble
from dcmtune.analysis import checkpoint_data
from dcmtune.sweep.spec import SweepSpec, find_spec, load_spec, read_spec, spec_from_dict
from dcmtune.units import HARTREE_TO_KCAL

RHO_TARGET = 0.5
MARGIN_TARGET = 0.15
PROXIES = ("rms_esp", "atoms")


# --------------------------------------------------------------------------- members


def study_spec(split_seed: int, smoke: bool) -> SweepSpec:
    """The accurate spec on this split (for --smoke: the demo set and a tiny model)."""
    path = find_spec("accurate")
    if not smoke:
        return load_spec(path, overrides=[("data.split_seed", split_seed)])
    raw = read_spec(path)
    raw.update(
        data={"data_files": ["demo"], "split_seed": split_seed},
        model=SMOKE_MODEL,
        training={**raw.get("training", {}), "num_epochs": 2, "warmup_epochs": 0},
        search={"training.learning_rate": {"loguniform": [3e-3, 3e-2]}},
        scheduler={"name": "fifo"},
        searcher={
            **raw.get("searcher", {}),
            "points_to_evaluate": [{"training.learning_rate": 1e-2}],
        },
    )
    return spec_from_dict(raw, base_dir=path.parent, path=path)


def _same(a: dict, b: dict, keys) -> list[str]:
    return [k for k in keys if a.get(k) != b.get(k)]


def check_run(run: Path, expected) -> None:
    """SystemExit unless the run's config.json is the defaults config on this split."""
    got = json.loads((run / "config.json").read_text())
    want = expected.to_dict()
    bad = (
        [f"random_seed {got.get('random_seed')}"]
        if got["random_seed"] != want["random_seed"]
        else []
    )
    bad += [
        f"data.{k}"
        for k in _same(
            got["data"],
            want["data"],
            ("split_seed", "split_by", "data_files", "valid_fraction", "test_fraction"),
        )
    ]
    bad += [f"model.{k}" for k in _same(got["model"], want["model"], want["model"])]
    bad += [f"training.{k}" for k in _same(got["training"], want["training"], want["training"])]
    if bad:
        raise SystemExit(f"{run}: not the defaults config of this split ({', '.join(bad)} differ)")


def members(split_seed: int, args) -> list[Path]:
    """The run directories of the split's members: `defaults_seed<k>` in the split's --runs
    directory (only read), else in <storage>/split<S>_defaults, trained there first if missing
    (one at a time)."""
    from dcmtune.train.loop import fit

    spec = study_spec(split_seed, args.smoke)
    given = dict(args.runs)
    own = (Path(args.storage) / f"split{split_seed}_defaults").resolve()
    runs = []
    for seed in args.seeds:
        cfg = defaults_config(spec, seed, own)
        found = [
            root / cfg.name
            for root in ([Path(given[split_seed])] if split_seed in given else []) + [own]
            if (root / cfg.name / "checkpoints" / "best").is_dir()
        ]
        if not found:
            t0 = time.perf_counter()
            fit(cfg)
            print(f"trained {own / cfg.name} in {time.perf_counter() - t0:.0f} s")
        run = found[0] if found else own / cfg.name
        check_run(run, cfg)
        runs.append(run)
    return runs


# --------------------------------------------------------------------------- per molecule


def _valid_rmse(run: Path) -> float:
    meta = json.loads((run / "checkpoints" / "best" / "meta.json").read_text())
    return float(meta["metrics"]["valid_esp_rmse"])


def split_study(split_seed: int, args) -> tuple[dict, list[dict]]:
    """One split: (summary, one row per test molecule)."""
    runs = members(split_seed, args)
    ensemble = load_ensemble(runs)
    test = checkpoint_data(runs[0], "test")
    preds = ensemble.predict(test)
    mol_ids = np.asarray(test.mol_id).astype(str)
    rows = []
    for mol in dict.fromkeys(mol_ids):
        ps = [p for p, m in zip(preds, mol_ids, strict=True) if m == mol]
        err = np.concatenate([p.esp - p.esp_reference for p in ps])
        std = np.concatenate([p.esp_std for p in ps])
        esp = np.concatenate([p.esp for p in ps])
        rows.append(
            {
                "split_seed": split_seed,
                "molecule": mol,
                "formula": ps[0].formula,
                "conformers": len(ps),
                "error": float(np.sqrt(np.mean(err**2)) * HARTREE_TO_KCAL),
                "spread": float(np.sqrt(np.mean(std**2)) * HARTREE_TO_KCAL),
                "rms_esp": float(np.sqrt(np.mean(esp**2)) * HARTREE_TO_KCAL),
                "atoms": len(ps[0].numbers),
                "distrusted": sum(bool(p.distrust) for p in ps),
            }
        )

    def rmse(errors) -> float:  # the project's esp_rmse: per-conformer MSE, averaged
        return float(np.sqrt(np.mean([np.mean(e**2) for e in errors])) * HARTREE_TO_KCAL)

    ens_rmse = rmse([p.esp - p.esp_reference for p in preds])
    member_rmse = [
        rmse([p.members[k].esp - p.esp_reference for p in preds]) for k in range(len(runs))
    ]
    valid = [_valid_rmse(r) for r in runs]
    best = int(np.argmin(valid))
    flags = np.array([bool(p.distrust) for p in preds])
    conf_err = np.array([p.esp_rmse for p in preds])
    summary = {
        "split_seed": split_seed,
        "members": [str(r) for r in runs],
        "member_valid_esp_rmse": valid,
        "member_test_esp_rmse": member_rmse,
        "best_on_valid": best,
        "best_member_test_esp_rmse": member_rmse[best],
        "ensemble_test_esp_rmse": ens_rmse,
        "ratio_ensemble_best": ens_rmse / member_rmse[best],
        "threshold": ensemble.threshold,
        "calibration": ensemble.calibration,
        "test_conformers": len(preds),
        "test_molecules": len(rows),
        "distrusted_conformers": int(flags.sum()),
        "error_distrusted": float(conf_err[flags].mean()) if flags.any() else None,
        "error_trusted": float(conf_err[~flags].mean()) if (~flags).any() else None,
    }
    return summary, rows


# --------------------------------------------------------------------------- statistics


def _rho(x: np.ndarray, y: np.ndarray) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def correlations(rows: list[dict], resamples: int, seed: int = 0) -> dict[str, Any]:
    """Spearman of spread and of each proxy with the error, the spread's margin over each
    proxy, each with a 95% bootstrap interval over molecules (paired resamples)."""
    err = np.array([r["error"] for r in rows])
    cols = {k: np.array([r[k] for r in rows], np.float64) for k in ("spread", *PROXIES)}
    n = len(rows)
    point = {k: _rho(v, err) for k, v in cols.items()}
    rng = np.random.default_rng(seed)
    boot = {k: np.empty(resamples) for k in cols}
    for b in range(resamples):
        idx = rng.integers(0, n, n)
        for k, v in cols.items():
            boot[k][b] = _rho(v[idx], err[idx])
    out: dict[str, Any] = {"molecules": n}
    for k in cols:
        lo, hi = np.nanpercentile(boot[k], [2.5, 97.5])
        out[k] = {"rho": point[k], "ci95": [float(lo), float(hi)]}
    for k in PROXIES:  # a proxy may be read either way round: the margin is over its |rho|
        diff = boot["spread"] - np.abs(boot[k])
        lo, hi = np.nanpercentile(diff, [2.5, 97.5])
        out[f"spread_minus_{k}"] = {
            "diff": point["spread"] - abs(point[k]),
            "ci95": [float(lo), float(hi)],
        }
    return out


def verdict(c: dict) -> str:
    rho = c["spread"]["rho"]
    margin = min(c[f"spread_minus_{k}"]["diff"] for k in PROXIES)
    ok = rho >= RHO_TARGET and margin >= MARGIN_TARGET
    return (
        f"{'meets' if ok else 'misses'} the target (Spearman {rho:.3f} vs >= {RHO_TARGET}; "
        f"smallest margin over a proxy {margin:+.3f} vs >= {MARGIN_TARGET})"
    )


def _fmt_rho(d: dict) -> str:
    v = d.get("rho", d.get("diff"))
    return f"{v:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"


def report(summaries: list[dict], per_split: dict, pooled: dict) -> None:
    print("\nensemble vs members, test ESP RMSE (kcal/mol/e); best = best member on validation")
    print(f"{'split':>5}{'best':>8}{'ensemble':>10}{'ratio':>8}  members (valid -> test)")
    for s in summaries:
        pairs = zip(s["member_valid_esp_rmse"], s["member_test_esp_rmse"], strict=True)
        ms = ", ".join(f"{v:.3f}->{t:.3f}" for v, t in pairs)
        print(
            f"{s['split_seed']:>5}{s['best_member_test_esp_rmse']:>8.3f}"
            f"{s['ensemble_test_esp_rmse']:>10.3f}{s['ratio_ensemble_best']:>8.3f}  {ms}"
        )
    print("\ndistrust flags on the test conformers (threshold: 0.9 quantile of the valid spread)")
    print(f"{'split':>5}{'threshold':>11}{'flagged':>12}{'RMSE flagged':>14}{'unflagged':>11}")
    for s in summaries:
        thr, e1, e0 = s["threshold"], s["error_distrusted"], s["error_trusted"]
        print(
            f"{s['split_seed']:>5}{_num(thr):>11}"
            f"{s['distrusted_conformers']:>6} / {s['test_conformers']:<3}"
            f"{_num(e1):>14}{_num(e0):>11}"
        )
    print("\nSpearman with the ensemble's per-molecule ESP RMSE [95% bootstrap interval]")
    print(f"{'molecules':<16}{'spread':>26}{'RMS of predicted ESP':>26}{'atom count':>26}")
    named = [(f"split {k} ({v['molecules']})", v) for k, v in per_split.items()]
    for name, c in [*named, (f"pooled ({pooled['molecules']})", pooled)]:
        print(f"{name:<16}" + "".join(f"{_fmt_rho(c[k]):>26}" for k in ("spread", *PROXIES)))
    print(
        "pooled margins: spread - |RMS ESP| "
        + _fmt_rho(pooled["spread_minus_rms_esp"])
        + "; spread - |atom count| "
        + _fmt_rho(pooled["spread_minus_atoms"])
    )
    print("pooled: " + verdict(pooled))


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--storage", default="experiments/ensemble_uncertainty")
    p.add_argument(
        "--runs",
        nargs="+",
        default=[],
        metavar="SPLIT=DIR",
        type=lambda s: (int(s.partition("=")[0]), s.partition("=")[2]),
        help="already trained members of a split: DIR/defaults_seed<k> (read only)",
    )
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--json", help="write the figures and per-molecule rows to this file")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.splits, args.seeds, args.resamples = [0], args.seeds[:2], 200
    summaries, rows = [], []
    for split in args.splits:
        s, r = split_study(split, args)
        summaries.append(s)
        rows += r
    per_split = {
        s["split_seed"]: correlations(
            [r for r in rows if r["split_seed"] == s["split_seed"]], args.resamples
        )
        for s in summaries
    }
    pooled = correlations(rows, args.resamples)
    report(summaries, per_split, pooled)
    if args.json:
        record = {
            "command": "python bench/ensemble_uncertainty.py "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "targets": {"spearman": RHO_TARGET, "margin_over_proxies": MARGIN_TARGET},
            "resamples": args.resamples,
            "splits": summaries,
            "spearman_per_split": per_split,
            "spearman_pooled": pooled,
            "verdict": verdict(pooled),
            "molecules": rows,
        }
        Path(args.json).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
