"""Tables of learning curves: a grid of configurations trained once with dcmtune's own sweep,
every epoch's validation and test metrics kept in a CSV, replayed later without training
(bench/search_efficiency.py --table; the LCBench / HPOBench idea, for this model).

    python bench/learning_curves.py record --out bench/tables/organic_split2_f16.csv \\
        --split-seed 2 --features 16 --keep experiments/learning_curves/organic_split2
    python bench/learning_curves.py record --out bench/tables/organic_split3_f16_n234.csv \\
        --split-seed 3 --features 16 --n-dcm 2 3 4 --keep experiments/learning_curves/\\
        {organic_split3_f16,organic_split3_f16_n234_rest}

(The committed tables: each finished an interrupted recording, keeping its finished
configurations.)

The grid is learning rate x chg_w x features x n_dcm (n_dcm 1-4) on the bundled organic set
(molecule split, `--split-seed`), the default model and schedule otherwise, every config trained
for `--epochs` epochs (FIFO: no early stopping) with `training.report_test_metrics` on. The
test metrics are for the table's users (what a chosen trial scores on unseen molecules); the
sweep chooses nothing on them. One row per (configuration, epoch).

`--keep EXPERIMENT...`: interrupted recordings' finished configurations (all `--epochs` epochs)
are kept; only the rest of the grid is trained, as given points of a random search, in a new
experiment beside it, and the table joins both.

`--smoke`: the same path at its smallest: a grid of 2 learning rates x 1 chg_w of a tiny model
(4 features, degree 1, 1 iteration, 1 charge per atom, 4 basis functions) on the demo set, 2
epochs, one trial at a time; the table is written as usual.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import pandas as pd
from _smoke import SMOKE_MODEL

from dcmtune.sweep import local_ray
from dcmtune.sweep.driver import run_sweep
from dcmtune.sweep.spec import spec_from_dict

# The searched values, centred on the documented defaults (docs/model.md: learning rate 1e-2,
# chg_w 0.01, 16 features, n_dcm 2), each range 3x or 10x either side.
GRID = {
    "training.learning_rate": [3e-3, 1e-2, 3e-2],
    "training.chg_w": [1e-3, 1e-2, 1e-1],
    "model.features": [16, 32],
    "model.n_dcm": [1, 2, 3, 4],
}
KEYS = list(GRID)


SMOKE_GRID = {"training.learning_rate": [3e-3, 3e-2], "training.chg_w": [1e-2]}


def grid_spec(
    name: str,
    split_seed: int,
    epochs: int,
    features: list[int],
    storage: Path,
    concurrency: int,
    smoke: bool = False,
    only: list[dict] | None = None,
    n_dcm: list[int] | None = None,
) -> dict:
    """The sweep spec of one table: every combination of GRID (features and n_dcm as given)
    once, or only the given combinations (given points of a random search)."""
    grid = SMOKE_GRID if smoke else _grid(features, n_dcm or GRID["model.n_dcm"])
    size = math.prod(len(v) for v in grid.values()) if only is None else len(only)
    searcher = (
        {"sampler": "grid", "seed": 0}
        if only is None
        else {"sampler": "random", "seed": 0, "points_to_evaluate": only}
    )
    data = {"data_files": ["demo" if smoke else "organic"], "split_seed": split_seed}
    return {
        "name": name,
        "description": f"learning-curve table: {size} configurations x {epochs} epochs",
        "data": {**data, **({"valid_fraction": 0.1, "test_fraction": 0.1} if smoke else {})},
        "model": SMOKE_MODEL if smoke else {},
        "training": {
            "num_epochs": epochs,
            "report_test_metrics": True,
            **({"warmup_epochs": 0} if smoke else {}),
        },
        "search": {k: {"choice": v} for k, v in grid.items()},
        "searcher": searcher,
        "scheduler": {"name": "fifo"},
        "run": {
            "num_samples": size,
            "max_concurrent_trials": concurrency,
            "checkpoint_every": 0,
            "num_to_keep": 1,
            "storage_path": str(storage),
            "resources": {"cpu": 1, "gpu": "auto"},
        },
        "rank": {"top_k": 3},
    }


def _grid(features: list[int], n_dcm: list[int]) -> dict[str, list]:
    return {**GRID, "model.features": features, "model.n_dcm": n_dcm}


def grid_points(features: list[int], n_dcm: list[int]) -> list[dict]:
    """Every combination of GRID (features and n_dcm as given), as {key: value} points."""
    grid = _grid(features, n_dcm)
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def finished(experiment: Path, epochs: int) -> pd.DataFrame:
    """The rows of `experiment`'s trials that ran all `epochs` epochs."""
    df = table(experiment)
    done = df.groupby("config")["epoch"].transform("max") == epochs
    return df[done]


def table(experiment: Path) -> pd.DataFrame:
    """One row per (trial, epoch): the configuration, and every epoch's metrics."""
    frames = []
    for trial in sorted(experiment.glob("trial_*")):
        if not (trial / "history.csv").is_file():
            continue
        point = json.loads((trial / "params.json").read_text())
        history = pd.read_csv(trial / "history.csv")
        keep = [c for c in history.columns if c.startswith(("train_", "valid_", "test_"))]
        df = history[["epoch", *keep, "epoch_time"]].copy()
        for k in sorted(point, reverse=True):
            df.insert(0, k, point[k])
        df.insert(0, "config", trial.name.removeprefix("trial_"))
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def record(args) -> int:
    local_ray.prefer_loopback()
    name = Path(args.out).stem
    if args.smoke:
        args.epochs, args.concurrency = 2, 1
    kept, only = None, None
    if args.keep:
        kept = pd.concat([finished(Path(k), args.epochs) for k in args.keep], ignore_index=True)
        kept = kept[~kept.duplicated(["config", "epoch"])]
        wanted = grid_points(args.features, args.n_dcm)
        wanted_set = {tuple(p.values()) for p in wanted}
        rows = [tuple(r) for r in kept[KEYS].itertuples(index=False)]
        kept = kept[[r in wanted_set for r in rows]]
        have = set(rows) & wanted_set
        only = [p for p in wanted if tuple(p.values()) not in have]
        name += f"_rest{len(args.keep)}"
        print(f"kept {kept['config'].nunique()} finished configurations; {len(only)} to train")
    spec = spec_from_dict(
        grid_spec(
            name,
            args.split_seed,
            args.epochs,
            args.features,
            Path(args.storage).resolve(),
            args.concurrency,
            smoke=args.smoke,
            only=only,
            n_dcm=args.n_dcm,
        )
    )
    t0 = time.perf_counter()
    outcome = run_sweep(spec, verbose=0 if args.quiet else 1)
    wall = time.perf_counter() - t0
    df = table(spec.experiment_dir)
    if kept is not None:
        df = pd.concat([kept, df], ignore_index=True)
    configs = df["config"].nunique()
    df.to_csv(args.out, index=False, float_format="%.6g")
    print(
        f"{args.out}: {configs} configurations x {df['epoch'].max()} epochs "
        f"({len(df)} rows); sweep {outcome.status} in {wall:.0f} s"
    )
    return 0 if outcome.status == "completed" else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record", help="train the grid and write its table")
    r.add_argument("--out", required=True, help="the table (.csv)")
    r.add_argument("--split-seed", type=int, required=True)
    r.add_argument("--epochs", type=int, default=60)
    r.add_argument("--features", type=int, nargs="+", default=GRID["model.features"])
    r.add_argument("--n-dcm", type=int, nargs="+", default=GRID["model.n_dcm"])
    r.add_argument("--concurrency", type=int, default=2)
    r.add_argument("--storage", default="experiments/learning_curves")
    r.add_argument("--keep", nargs="+", help="interrupted recordings' experiment dirs to reuse")
    r.add_argument("--quiet", action="store_true")
    r.add_argument("--smoke", action="store_true", help="2 configurations of a tiny model")
    args = p.parse_args(argv)
    return record(args)


if __name__ == "__main__":
    raise SystemExit(main())
