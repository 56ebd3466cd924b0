"""Sweep overhead: how close a sweep's wall time comes to its trials' time divided by concurrency.

Runs `--runs` sweeps of the quick.yaml search space (the shipped spec with training.num_epochs =
`--epochs`, so one trial takes ~30 s on 2 cores, FIFO scheduling so every trial runs them all,
`--trials` trials, `--concurrency` CPU trials at once) through `dcmtune.sweep.run_sweep`, each
in a fresh local Ray, and reports from driver-side Tune callbacks and Tune's result rows:

  ratio      wall / (sum of the trials' time_total_s / concurrency), wall = first trial start
             -> last trial end (target <= 1.10)
  ratio_sched  the same with each trial's driver-observed duration (start -> end) in place of
             time_total_s: the part of the overhead that is scheduling gaps between trials
  to_first_s mean time from a trial's start to its first reported epoch (process start, JAX
             import, data to the device, compiles, the first epoch)
  in_epochs  the fraction of the trials' time_total_s spent in the trainer's epochs (updates +
             validation); the rest is start-up, reporting and checkpointing inside the trial
  outside    per trial, (driver start -> end) - time_total_s, mean over trials: pre_s + post_s
             + the driver seeing the span from first to last result longer than the trial's
             own clock (result delivery and processing)
  pre_s      of that, before Tune's clock starts: trial start -> first result minus the first
             result's time_total_s (actor start or reset, the trainable's setup)
  post_s     of that, after the last result: last result -> trial end (teardown)
  gap        mean idle time of a slot between one trial's end and the next trial's start
  startup    run_sweep called -> Tune set up the experiment (Ray start-up, data into the
             object store, Tuner), reported separately
  ranking    the experiment ended -> run_sweep returned (best trial, ranking of the top k)

and the median and range over the runs. The JAX compile cache lives in --output-dir and is shared
by all runs (the first run of a fresh directory compiles cold, inside its trials' time).

  python bench/sweep_overhead.py [--runs 3] [--trials 8] [--epochs 100] [--concurrency 2]
                                 [--gpu 0.25] [--output-dir DIR] [--json] [--jax-cache-dir DIR]

A run uses the Ray session of this process if there is one (and leaves it running); otherwise
each run starts a fresh local Ray and shuts it down.

`--smoke`: one run of 2 trials of 1 epoch, one at a time (`--concurrency 1`: the second
trial reuses the first one's actor), through `run_sweep` (a real sweep, on the Ray session of
this process if there is one), with a tiny fixed model (4 features, 1 charge per atom, 4 basis
functions; quick.yaml's degree 1 and 1 iteration), only the learning rate and chg_w searched
and the default split (valid and test 10 %); then every column of the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dcmtune.sweep import local_ray
from dcmtune.sweep.driver import run_sweep

if TYPE_CHECKING:
    from _sweeps import TimingCallback

COLUMNS = (
    "ratio",
    "ratio_sched",
    "wall_s",
    "trial_mean_s",
    "to_first_s",
    "in_epochs",
    "outside_s",
    "pre_s",
    "post_s",
    "gap_s",
    "startup_s",
    "ranking_s",
)


def overhead_spec(args, name: str):
    from _sweeps import derived_spec, smoke_parts

    cache = args.jax_cache_dir or Path(args.output_dir) / ".jax_cache"
    run = {
        "num_samples": args.trials,
        "max_concurrent_trials": args.concurrency,
        "jax_cache_dir": str(Path(cache).resolve()),
    }
    if args.gpu is not None:
        run["resources"] = {"cpu": 1, "gpu": args.gpu}
    changes = {"training": {"num_epochs": args.epochs}, "run": run}
    replace = {"scheduler": {"name": "fifo"}}
    if args.smoke:
        changes, replace = smoke_parts(changes, replace)
    return derived_spec(changes, Path(args.output_dir).resolve(), name, replace=replace)


def figures(cb: TimingCallback, concurrency: int, t_call: float, t_return: float) -> dict:
    """The overhead figures of one run (see the module doc)."""
    trials = sorted(cb.trials.values(), key=lambda t: t.start)
    ended = [t for t in trials if t.end is not None]
    first, last = min(t.start for t in trials), max(t.end for t in ended)
    wall = last - first
    total = sum(t.time_total_s for t in trials)
    driver = sum(t.end - t.start for t in ended)
    # Slot gaps: the k-th trial to start (k >= concurrency) waited for the (k - concurrency)-th
    # trial to end, in end order, when trials start as soon as a slot frees.
    ends = sorted(t.end for t in ended)
    gaps = [t.start - ends[i] for i, t in enumerate(trials[concurrency:]) if i < len(ends)]
    return {
        "trials": len(trials),
        "wall_s": wall,
        "ratio": wall / (total / concurrency),
        "ratio_sched": wall / (driver / concurrency),
        "trial_mean_s": total / len(trials),
        "to_first_s": statistics.mean(t.results[0][0] - t.start for t in trials if t.results),
        "in_epochs": sum(t.epoch_time_s for t in trials) / total,
        "outside_s": statistics.mean(t.end - t.start - t.time_total_s for t in ended),
        "pre_s": statistics.mean(
            t.results[0][0] - t.start - t.results[0][3] for t in trials if t.results
        ),
        "post_s": statistics.mean(t.end - t.results[-1][0] for t in ended if t.results),
        "gap_s": statistics.mean(gaps) if gaps else 0.0,
        "startup_s": cb.setup_at - t_call,
        "ranking_s": t_return - cb.ended_at,
        "per_trial": [
            {
                "trial_id": t.trial_id,
                "epoch_time_s": t.epoch_time_s,
                "start": t.start - first,
                "end": (t.end - first) if t.end else None,
                "time_total_s": t.time_total_s,
                "epochs": t.epochs,
            }
            for t in trials
        ],
    }


def one_run(args, i: int) -> dict:
    import ray
    from _sweeps import TimingCallback

    spec = overhead_spec(args, f"overhead_{int(time.time())}_{i}")
    cb = TimingCallback(spec.run.metric)
    fresh = not ray.is_initialized()  # else: the session's Ray, left running
    t_call = time.time()
    run_sweep(spec, callbacks=[cb], verbose=0, echo=lambda s: None)
    t_return = time.time()
    if fresh:
        ray.shutdown()
    return figures(cb, args.concurrency, t_call, t_return)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=100, help="epochs per trial (~30 s on 2 cores)")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument(
        "--gpu",
        type=float,
        help="GPU share per trial, e.g. 0.25 (default: "
        "quick.yaml's gpu: auto, a CPU trial without GPUs)",
    )
    p.add_argument("--output-dir", default="experiments/bench_sweep_overhead")
    p.add_argument("--json", action="store_true", help="also print every run as JSON")
    p.add_argument(
        "--jax-cache-dir", help="the trials' compile cache (default: <output-dir>/.jax_cache)"
    )
    p.add_argument(
        "--smoke", action="store_true", help="1 run of 2 trials of 1 epoch of a tiny model"
    )
    args = p.parse_args(argv)
    local_ray.prefer_loopback()  # before Ray is imported (by _sweeps): a local Ray on 127.0.0.1
    if args.smoke:
        args.runs, args.trials, args.epochs, args.concurrency = 1, 2, 1, 1
    rows = []
    print(f"{'run':>6}" + "".join(f"{c:>12}" for c in COLUMNS), flush=True)
    for i in range(args.runs):
        r = one_run(args, i)
        rows.append(r)
        print(f"{i:>6}" + "".join(f"{r[c]:>12.3f}" for c in COLUMNS), flush=True)
    for label, fn in (("median", statistics.median), ("min", min), ("max", max)):
        print(f"{label:>6}" + "".join(f"{fn(r[c] for r in rows):>12.3f}" for c in COLUMNS))
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
