"""Search efficiency: Optuna TPE + ASHA (what `python -m dcmtune.sweep quick` does) against random
search at full budget, on the quick.yaml search space unchanged.

For each seed, two real sweeps through `dcmtune.sweep.run_sweep`, sharing one local Ray:

  tpe_asha  quick.yaml as shipped (TPE sampler, n_startup_trials 4, ASHA grace 3 / factor 3,
            12 epochs max, 10 trials, 2 at once) with searcher.seed = seed;
  random    the same space, the same number of trials and epochs, Optuna's RandomSampler with
            the same seed and no early stopping (scheduler fifo): every trial runs all epochs.

Every reported epoch is recorded in the driver (a Tune callback) in the order results arrived.
The target of a seed is 1.05 x the random arm's final best validation ESP RMSE (the best epoch of
any of its trials). For each arm, `epochs` is the number of epochs reported, summed over trials,
up to and including the first epoch whose running best is within that target; ratio =
tpe_asha epochs / random epochs (target <= 1/3). An arm that never gets within the target is
shown with its total epochs and a '>' (the ratio is then a lower bound, marked '>').

Prints one row per seed, then the median and range of the ratio; `--json` writes every recorded
curve to <output-dir>/search_efficiency.json.

  python bench/search_efficiency.py [--seeds 0 1 2 3 4] [--output-dir DIR] [--json]
                                    [--gpu 0.25 --concurrency 4] [--jax-cache-dir DIR]

`--table TABLE.csv [--held-out TABLE2.csv]`: no training at all. The sweep is replayed on a
table of learning curves recorded by bench/learning_curves.py (`dcmtune.sweep.replay`: the
searcher and the Tune scheduler a real sweep builds, on a simulated clock, `--concurrency`
trials at once, default 4), for `--replay-seeds` seeds (default 50) per combination:

  1. every sampler (random, TPE, multivariate TPE, QMC, CMA-ES with margin) with every
     scheduler (FIFO, ASHA, HyperBand, median stopping; grace T/12, reduction factor 3);
  2. the start-up trials (5, 10, 20), ASHA grace (T/20, T/12, T/6, T/3) and reduction factor
     (2, 3, 4) of the two best model-based samplers of stage 1, one setting at a time around
     10 / T/12 / 3 (8 combinations each);

and prints, per combination, the median and 25-75% range of the trial-epochs until the best
validation metric is within the table's target (5% of its best; 2% when more than a tenth of
the configurations reach 5%), the share of seeds that got there, the ratio to random search
with FIFO, and the test metric of the trial chosen at `--budget` trial-epochs (default 10 T).
The best combination of both stages is the chosen one; with `--held-out`, every combination is
replayed on the second table too, and the chosen one's median is compared with the best there
(target: within 10%) and with random search with FIFO (target: at most 1/3), and the robust
choice is printed: the combination whose worse ratio to either table's best is least (what the
shipped specs use when the first table's choice fails on the held-out one). `--json FILE`
writes every figure; `--reuse JSON` takes the first table's combinations and choice from such a
record and replays only the held-out table. With `--smoke`: 2 seeds, random and TPE with FIFO
and ASHA only.

  python bench/search_efficiency.py --table bench/tables/organic_split2.csv \
      --held-out bench/tables/organic_split3_f16.csv [--replay-seeds 50] [--concurrency 4]

`--smoke` (without --table): both arms for one seed (0), each a real sweep through `run_sweep` on
the Ray session of this process if there is one (else a local Ray it starts), at its smallest: 2
trials of 1 epoch, one at a time, a tiny fixed model (4 features, 1 charge per atom, 4 basis
functions; quick.yaml's degree 1 and 1 iteration) with only the learning rate and chg_w searched,
the default split (valid and test 10 %), ASHA's grace period 1; then the row and the ratio line.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from dcmtune.sweep import local_ray
from dcmtune.sweep.driver import run_sweep

TOLERANCE = 1.05


def arm_spec(
    arm: str,
    seed: int,
    storage: Path,
    cache: Path,
    gpu: float | None = None,
    concurrency: int | None = None,
    smoke: bool = False,
):
    from _sweeps import derived_spec, smoke_parts

    run: dict = {"jax_cache_dir": str(cache)}
    if gpu is not None:
        run["resources"] = {"cpu": 1, "gpu": gpu}
    if concurrency is not None:
        run["max_concurrent_trials"] = concurrency
    name = f"{arm}_seed{seed}_{int(time.time())}"
    if arm == "tpe_asha":
        changes: dict = {"searcher": {"seed": seed}, "run": run}
        replace: dict = {}
        if smoke:
            changes["scheduler"] = {"grace_period": 1}
    else:
        changes = {"run": run}
        replace = {"searcher": {"seed": seed, "sampler": "random"}, "scheduler": {"name": "fifo"}}
    if smoke:
        changes, replace = smoke_parts(changes, replace)
    return derived_spec(changes, storage, name, replace=replace)


def run_arm(arm: str, seed: int, storage: Path, cache: Path, **options) -> dict:
    """One sweep; every reported epoch as (arrival time, trial, epoch, metric), arrival order."""
    from _sweeps import TimingCallback

    spec = arm_spec(arm, seed, storage, cache, **options)
    cb = TimingCallback(spec.run.metric)
    t0 = time.time()
    run_sweep(spec, callbacks=[cb], verbose=0, echo=lambda s: None)
    events = sorted(
        (at, t.trial_id, epoch, value)
        for t in cb.trials.values()
        for at, epoch, value, _ in t.results
    )
    return {
        "arm": arm,
        "seed": seed,
        "wall_s": time.time() - t0,
        "trials": len(cb.trials),
        "epochs_total": len(events),
        "events": [{"trial": tid, "epoch": e, "metric": v} for _, tid, e, v in events],
        "configs": {t.trial_id: t.config for t in cb.trials.values()},
    }


def best_of(run: dict) -> float:
    return min((e["metric"] for e in run["events"] if math.isfinite(e["metric"])), default=math.inf)


def epochs_to(run: dict, target: float) -> tuple[int, bool]:
    """(epochs reported until the running best is <= target, whether it got there)."""
    for n, e in enumerate(run["events"], start=1):
        if math.isfinite(e["metric"]) and e["metric"] <= target:
            return n, True
    return len(run["events"]), False


def compare(random: dict, tpe: dict) -> dict:
    target = TOLERANCE * best_of(random)
    n_rand, _ = epochs_to(random, target)  # random always reaches its own target
    n_tpe, reached = epochs_to(tpe, target)
    return {
        "seed": random["seed"],
        "random_best": best_of(random),
        "tpe_best": best_of(tpe),
        "target": target,
        "random_epochs": n_rand,
        "tpe_epochs": n_tpe,
        "tpe_reached": reached,
        "ratio": n_tpe / n_rand,
        "random_total": random["epochs_total"],
        "tpe_total": tpe["epochs_total"],
        "random_wall_s": random["wall_s"],
        "tpe_wall_s": tpe["wall_s"],
    }


def _cell(row: dict, col: str) -> str:
    """A table cell; tpe_epochs and ratio get a '>' when tpe_asha never reached the target."""
    v = row[col]
    text = f"{v:.3f}" if isinstance(v, float) else str(v)
    return (">" + text) if col in ("tpe_epochs", "ratio") and not row["tpe_reached"] else text


def run_table(args) -> int:
    """The replay study on a learning-curve table (see the module doc)."""
    import _replay_stats as rs

    from dcmtune.sweep.replay import CurveTable

    table = CurveTable.read_csv(args.table)
    seeds = range(2 if args.smoke else args.replay_seeds)
    budget = args.budget or 10 * table.num_epochs
    _describe(args.table, table)
    if args.reuse:
        return _held_out_only(args, seeds, budget)
    stage1 = rs.first_stage(table.num_epochs)
    if args.smoke:
        stage1 = [c for c in stage1 if c.label in SMOKE_COMBOS]
    workers = 1 if args.smoke else None
    stats = rs.evaluate(table, stage1, seeds, args.concurrency, budget, workers)
    _print_stage("1. every sampler x every scheduler", stats, budget)
    combos = list(stage1)
    if not args.smoke:
        model_based = [k for k in sorted(stats, key=lambda k: stats[k]["median"])]
        samplers = []
        for label in model_based:
            name = label.split("+")[0]
            if name in ("tpe", "tpe-mv", "cmaes") and name not in samplers:
                samplers.append(name)
        stage2 = rs.settings_stage(samplers[:2], table.num_epochs)
        stats2 = rs.evaluate(table, stage2, seeds, args.concurrency, budget)
        _print_stage(f"2. settings of {' and '.join(samplers[:2])} with ASHA", stats2, budget)
        stats.update(stats2)
        combos += stage2
    chosen = rs.best(stats)
    print(f"\nchosen on {args.table}: {chosen} {_settings(stats[chosen])}")
    record: dict = {"table": args.table, "budget": budget, "chosen": chosen}
    record["stats"] = rs.summary(stats)
    if args.held_out:
        first = {k: v["median"] for k, v in stats.items()}
        record.update(_held_out(args, combos, chosen, seeds, budget, first, top=15))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1, default=str) + "\n")
    return 0


def _held_out(
    args, combos, chosen: str, seeds, budget: int, first: dict, top: int | None = None
) -> dict:
    """Every combination replayed on the held-out table; the choice against the best there, and
    the robust choice: the combination whose worse ratio to the best of either table is least
    (`first`: each combination's median on the first table)."""
    import _replay_stats as rs

    from dcmtune.sweep.replay import CurveTable

    held = CurveTable.read_csv(args.held_out)
    _describe(args.held_out, held)
    stats = rs.evaluate(held, combos, seeds, args.concurrency, budget)
    _print_stage("held out: every combination again", stats, budget, top=top)
    best = rs.best(stats)
    ratio_best = stats[chosen]["median"] / stats[best]["median"]
    ratio_random = stats[chosen]["median"] / stats["random+fifo"]["median"]
    print(
        f"\nheld out: {chosen} median {stats[chosen]['median']:.0f} trial-epochs; best "
        f"there {best} {stats[best]['median']:.0f} (ratio {ratio_best:.3f}, target <= 1.10);"
        f" random+fifo {stats['random+fifo']['median']:.0f} (ratio {ratio_random:.3f}, "
        "target <= 0.333)"
    )
    robust, worst = _robust(first, {k: v["median"] for k, v in stats.items()})
    print(
        f"robust on both: {robust} (median {first[robust]:.0f} / {stats[robust]['median']:.0f}; "
        f"at most {worst:.3f}x the best of either table; random+fifo ratio "
        f"{stats[robust]['median'] / stats['random+fifo']['median']:.3f} held out)"
    )
    return {"held_out": args.held_out, "held_stats": rs.summary(stats), "robust": robust}


def _robust(first: dict, second: dict) -> tuple[str, float]:
    """The label minimising max(first / best of first, second / best of second), and that max."""
    b1, b2 = min(first.values()), min(second.values())
    worst = {k: max(first[k] / b1, second[k] / b2) for k in first if k in second}
    label = min(worst, key=lambda k: (worst[k], k))
    return label, worst[label]


def _held_out_only(args, seeds, budget: int) -> int:
    """--reuse JSON: the first table's combinations and choice from an earlier --json record;
    only the held-out table is replayed."""
    import _replay_stats as rs

    record = json.loads(Path(args.reuse).read_text())
    combos = [rs.Combo(k, v["searcher"], v["scheduler"]) for k, v in record["stats"].items()]
    chosen = record["chosen"]
    print(f"chosen on {record['table']} ({args.reuse}): {chosen}")
    first = {k: v["median"] for k, v in record["stats"].items()}
    record.update(_held_out(args, combos, chosen, seeds, budget, first))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1, default=str) + "\n")
    return 0


SMOKE_COMBOS = ("random+fifo", "random+asha", "tpe+fifo", "tpe+asha")


def _describe(path: str, table) -> None:
    tol, target = table.target()
    per_config = table.valid.min(axis=1)
    near = int((per_config <= target).sum())
    print(
        f"{path}: {table.num_configs} configurations x {table.num_epochs} epochs over "
        f"{', '.join(table.keys)}; best {table.metric} {table.best():.4f}; target within "
        f"{tol:.0%}: {target:.4f} ({near} configuration(s) reach it)"
    )


def _print_stage(title: str, stats: dict, budget: int, top: int | None = None) -> None:
    import _replay_stats as rs

    print(f"\n{title} (trial-epochs to the target; test metric of the choice at {budget}):")
    lines = rs.format_table(stats)
    print("\n".join(lines[: (top + 1) if top else None]))


def _settings(s: dict) -> str:
    return f"(searcher {s['combo'].searcher}, scheduler {s['combo'].scheduler})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--output-dir", default="experiments/bench_search_efficiency")
    p.add_argument(
        "--json",
        nargs="?",
        const=True,
        help="write every curve to the output dir (with --table: every figure to this file)",
    )
    p.add_argument(
        "--gpu",
        type=float,
        help="GPU share per trial (default: quick.yaml's gpu: auto, a CPU trial without GPUs)",
    )
    p.add_argument("--concurrency", type=int, help="trials at once (default: quick.yaml's 2)")
    p.add_argument(
        "--jax-cache-dir", help="the trials' compile cache (default: <output-dir>/.jax_cache)"
    )
    p.add_argument(
        "--smoke", action="store_true", help="seed 0 only; 2 trials of 1 epoch of a tiny model"
    )
    p.add_argument("--table", help="replay on this learning-curve table instead of training")
    p.add_argument("--held-out", help="with --table: a second table to check the choice on")
    p.add_argument("--replay-seeds", type=int, default=50, help="with --table: seeds per combo")
    p.add_argument("--budget", type=int, help="with --table: trial-epochs for the test metric")
    p.add_argument(
        "--reuse", help="with --table and --held-out: the first table's --json record to reuse"
    )
    args = p.parse_args(argv)
    if args.table:
        args.concurrency = args.concurrency or 4
        return run_table(args)
    local_ray.prefer_loopback()  # before Ray is imported (by _sweeps): a local Ray on 127.0.0.1
    if args.smoke:
        args.seeds = args.seeds[:1]
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.jax_cache_dir).resolve() if args.jax_cache_dir else out / ".jax_cache"
    runs, rows = [], []
    cols = (
        "seed",
        "random_best",
        "tpe_best",
        "random_epochs",
        "tpe_epochs",
        "ratio",
        "random_total",
        "tpe_total",
        "random_wall_s",
        "tpe_wall_s",
    )
    print("".join(f"{c:>14}" for c in cols), flush=True)
    for i, seed in enumerate(args.seeds):
        # Alternate which arm runs first, so machine load and a warming compile cache
        # fall on both arms alike.
        order = ("random", "tpe_asha") if i % 2 == 0 else ("tpe_asha", "random")
        done = {}
        for arm in order:
            done[arm] = run_arm(
                arm, seed, out, cache, gpu=args.gpu, concurrency=args.concurrency, smoke=args.smoke
            )
            runs.append(done[arm])
            if args.json:
                (out / "search_efficiency.json").write_text(
                    json.dumps({"rows": rows, "runs": runs}, indent=1)
                )
        row = compare(done["random"], done["tpe_asha"])
        rows.append(row)
        if args.json:
            (out / "search_efficiency.json").write_text(
                json.dumps({"rows": rows, "runs": runs}, indent=1)
            )
        print("".join(f"{_cell(row, c):>14}" for c in cols), flush=True)
    ratios = [r["ratio"] for r in rows]
    censored = sum(not r["tpe_reached"] for r in rows)
    print(
        f"\nratio tpe_asha/random epochs to within {TOLERANCE - 1:.0%} of random's best: "
        f"median {statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f} "
        f"over {len(rows)} seeds (target <= 0.333)"
        + (
            f"; {censored} seed(s) where tpe_asha never got within the target "
            "(ratio is a lower bound)"
            if censored
            else ""
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
