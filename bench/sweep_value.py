"""Does a sweep pay for itself? The shipped `accurate` spec against the defaults, on one split.

    python bench/sweep_value.py --split-seed 0 [--budget 800] [--seeds 0 1 2] [--concurrency 2]
                                [--storage experiments/sweep_value] [--json FILE]
                                [--set KEY=VALUE ...]  (a variant: e.g. scheduler.grace_period=3)

1. The sweep: search_spaces/accurate.yaml as shipped (the bundled organic set, molecule split),
   with `--set data.split_seed=S run.max_trial_epochs=BUDGET run.max_concurrent_trials=C
   run.resources.cpu=1`, run by `dcmtune.sweep.driver.run_sweep` and ranked as every sweep is:
   the top trials' best-validation checkpoints re-evaluated on the test molecules, the winner
   chosen on validation. The budget counts every epoch any trial ran (`run.max_trial_epochs`).
2. The defaults: the same config with the documented defaults for every searched key (the
   spec's first `points_to_evaluate`, checked to equal `ExperimentConfig()`'s values), trained
   for the spec's `training.num_epochs` with training seeds `--seeds` on the same split; each
   run's best-validation checkpoint evaluated on the test molecules the same way.

Prints the winner's test ESP RMSE and settings, the trial-epochs used and the sweep's wall
time, each default run's test ESP RMSE and wall time, and the ratio winner / median of the
defaults (the target is <= 0.90). `--smoke`: the same path on the demo set, a tiny model, a
budget of 4 trial-epochs and one default run of 2 epochs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from _smoke import SMOKE_MODEL

from dcmtune.analysis import analyze_checkpoint
from dcmtune.config import ExperimentConfig
from dcmtune.sweep import local_ray
from dcmtune.sweep.driver import run_sweep
from dcmtune.sweep.overrides import parse_set
from dcmtune.sweep.spec import SweepSpec, find_spec, load_spec, read_spec, spec_from_dict

TARGET = 0.90


def sweep_spec(args) -> SweepSpec:
    """The accurate spec with this study's overrides (for --smoke: shrunk to seconds)."""
    overrides = [
        ("data.split_seed", args.split_seed),
        ("run.max_trial_epochs", args.budget),
        ("run.max_concurrent_trials", args.concurrency),
        ("run.resources", {"cpu": 1, "gpu": "auto"}),
        ("run.storage_path", str(Path(args.storage).resolve())),
        *(parse_set(item) for item in args.set),
    ]
    path = find_spec("accurate")
    if not args.smoke:
        spec = load_spec(path, overrides=overrides)
    else:
        raw = read_spec(path)
        point = {"training.learning_rate": 1e-2}
        raw.update(
            data={
                "data_files": ["demo"],
                "split_seed": args.split_seed,
                "valid_fraction": 0.1,
                "test_fraction": 0.1,
            },
            model=SMOKE_MODEL,
            training={**raw.get("training", {}), "num_epochs": 2, "warmup_epochs": 0},
            search={"training.learning_rate": {"loguniform": [3e-3, 3e-2]}},
            searcher={**raw.get("searcher", {}), "points_to_evaluate": [point]},
            scheduler={"name": "fifo"},
        )
        spec = spec_from_dict(raw, base_dir=path.parent, path=path, overrides=overrides)
    return spec.renamed(f"{spec.name}_split{args.split_seed}_{int(time.time())}")


def defaults_config(spec: SweepSpec, seed: int, output_dir: Path) -> ExperimentConfig:
    """The spec's base config with the documented defaults for the searched keys."""
    point = dict(spec.searcher.points_to_evaluate[0])
    plain = ExperimentConfig()
    for key, value in point.items():
        section, _, field = key.partition(".")
        default = getattr(getattr(plain, section), field)
        if value != default:
            raise SystemExit(
                f"searcher.points_to_evaluate[0].{key} = {value!r} is not the default {default!r}"
            )
    return spec.config_for(
        point, random_seed=seed, name=f"defaults_seed{seed}", output_dir=str(output_dir)
    )


def test_rmse(run_dir: Path) -> tuple[float, int]:
    """Test ESP RMSE of the run's best-validation checkpoint, and its epoch."""
    a = analyze_checkpoint(run_dir, "test")
    return float(a.metrics["esp_rmse"]), int(a.epoch)


def run_study(args) -> dict[str, Any]:
    from dcmtune.train.loop import fit

    spec = sweep_spec(args)
    local_ray.prefer_loopback()
    t0 = time.perf_counter()
    outcome = run_sweep(spec, verbose=0)
    sweep_wall = time.perf_counter() - t0
    used = sum(
        int(r.metrics_dataframe["epoch"].max())
        for r in outcome.results
        if r.metrics_dataframe is not None and "epoch" in r.metrics_dataframe
    )
    ranking = outcome.ranking
    if ranking is None or not len(ranking):
        raise SystemExit(f"{spec.experiment_dir}: the sweep produced no ranking")
    top = ranking.iloc[0]
    winner = {
        "trial": str(top["trial_id"]),
        "valid_esp_rmse": float(top["valid_esp_rmse"]),
        "test_esp_rmse": float(top["test_esp_rmse"]),
        "settings": {k: top[k] for k in spec.search if k in top},
    }
    print(
        f"sweep ({spec.experiment_dir}): {len(outcome.results)} trials, {used} trial-epochs "
        f"(budget {spec.run.max_trial_epochs}), wall {sweep_wall:.0f} s"
    )
    print(
        f"  winner {winner['trial']}: test ESP RMSE {winner['test_esp_rmse']:.4f} "
        f"(valid {winner['valid_esp_rmse']:.4f}) with "
        + ", ".join(f"{k}={_fmt(v)}" for k, v in winner["settings"].items())
    )
    defaults = []
    for seed in args.seeds:
        cfg = defaults_config(spec, seed, spec.experiment_dir.parent / f"{spec.name}_defaults")
        t0 = time.perf_counter()
        result = fit(cfg)
        wall = time.perf_counter() - t0
        rmse, epoch = test_rmse(result.run_dir)
        defaults.append({"seed": seed, "test_esp_rmse": rmse, "best_epoch": epoch, "wall_s": wall})
        print(
            f"  defaults, training seed {seed}: test ESP RMSE {rmse:.4f} (best epoch {epoch} of "
            f"{cfg.training.num_epochs}), wall {wall:.0f} s"
        )
    median = statistics.median(d["test_esp_rmse"] for d in defaults)
    ratio = winner["test_esp_rmse"] / median
    verdict = "meets" if ratio <= TARGET else "misses"
    print(
        f"split seed {args.split_seed}: winner / median of the defaults = "
        f"{winner['test_esp_rmse']:.4f} / {median:.4f} = {ratio:.3f} ({verdict} the target "
        f"<= {TARGET:.2f}); budget used {used} trial-epochs; sweep {sweep_wall:.0f} s, defaults "
        f"{sum(d['wall_s'] for d in defaults):.0f} s"
    )
    return {
        "split_seed": args.split_seed,
        "budget": spec.run.max_trial_epochs,
        "variant": list(args.set),
        "trial_epochs": used,
        "trials": len(outcome.results),
        "sweep_wall_s": sweep_wall,
        "winner": winner,
        "defaults": defaults,
        "ratio": ratio,
        "experiment": str(spec.experiment_dir),
    }


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--budget", type=int, default=800, help="trial-epochs of the sweep")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--storage", default="experiments/sweep_value")
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a variant of the shipped spec, as `python -m dcmtune.sweep --set` (repeatable)",
    )
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.budget, args.seeds = 4, args.seeds[:1]
    row = run_study(args)
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
