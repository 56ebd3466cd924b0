"""Search efficiency on a learning-curve table: every searcher x scheduler combination replayed
(`dcmtune.sweep.replay`) for many seeds, and the statistics `search_efficiency.py --table`
prints.

Per combination and seed, one replayed sweep (`num_samples` = 4 x the table's configurations,
`concurrency` trials at once, no points to evaluate: every arm starts from nothing) gives

  epochs   trial-epochs received until the best validation metric is within the table's target
           (5% of its best, or 2% when more than a tenth of the configurations reach 5%);
           a sweep that never gets there counts all its epochs and is marked censored;
  test     the test metric of the trial the sweep would choose (best validation so far) after
           `budget` trial-epochs.

Per combination: the median and the 25-75% range of both over the seeds, the share of seeds
that reached the target, and the ratio of its median epochs to random search with FIFO.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import statistics
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

from dcmtune.sweep.replay import CurveTable, replay, replay_spec

SAMPLERS: dict[str, dict] = {
    "random": {"sampler": "random"},
    "tpe": {"sampler": "tpe", "n_startup_trials": 10},
    "tpe-mv": {"sampler": "tpe", "multivariate": True, "n_startup_trials": 10},
    "qmc": {"sampler": "qmc"},
    "cmaes": {"sampler": "cmaes", "n_startup_trials": 10},
}


def schedulers(num_epochs: int) -> dict[str, dict]:
    """Each Tune scheduler at its settings for a T-epoch table: ASHA and median stopping wait
    T/12 epochs (5 of 60) before stopping; reduction factor 3."""
    grace = max(1, num_epochs // 12)
    return {
        "fifo": {"name": "fifo"},
        "asha": {"name": "asha", "grace_period": grace, "reduction_factor": 3},
        "hyperband": {"name": "hyperband", "reduction_factor": 3},
        "median": {"name": "median", "grace_period": grace},
    }


@dataclasses.dataclass(frozen=True)
class Combo:
    """One searcher x scheduler combination."""

    label: str
    searcher: dict
    scheduler: dict


def first_stage(num_epochs: int) -> list[Combo]:
    """Every sampler with every scheduler, at their default settings."""
    return [
        Combo(f"{s}+{c}", SAMPLERS[s], sched)
        for s in SAMPLERS
        for c, sched in schedulers(num_epochs).items()
    ]


def settings_stage(samplers: Sequence[str], num_epochs: int) -> list[Combo]:
    """The settings of model-based samplers with ASHA, one at a time around the shipped-style
    centre (10 start-up trials, grace T/12, reduction factor 3): start-up trials (5, 10, 20),
    grace (T/20, T/12, T/6, T/3) and reduction factor (2, 3, 4), 8 combinations per sampler.
    (The full product, 36 per sampler, costs 4.5x the replays for interactions this table
    cannot resolve at 50 seeds.)"""
    centre = (10, max(1, num_epochs // 12), 3)
    graces = sorted({max(1, num_epochs // d) for d in (20, 12, 6, 3)})
    points = [centre]
    points += [(n0, centre[1], centre[2]) for n0 in (5, 20)]
    points += [(centre[0], g, centre[2]) for g in graces if g != centre[1]]
    points += [(centre[0], centre[1], rf) for rf in (2, 4)]
    out = []
    for s in samplers:
        for n0, grace, rf in points:
            searcher = {**SAMPLERS[s], "n_startup_trials": n0}
            scheduler = {"name": "asha", "grace_period": grace, "reduction_factor": rf}
            out.append(Combo(f"{s}({n0})+asha({grace},{rf})", searcher, scheduler))
    return out


def _one(args: tuple[CurveTable, Combo, int, int, int, int]) -> tuple[str, int, int, bool, float]:
    """One replayed sweep: (label, seed, epochs to target, reached, test at budget)."""
    table, combo, seed, concurrency, budget, num_samples = args
    _, target = table.target()
    spec = replay_spec(
        table,
        {**combo.searcher, "seed": seed},
        combo.scheduler,
        num_samples=num_samples,
        concurrency=concurrency,
    )
    r = replay(table, spec, until=(target, budget))
    hit = r.epochs_to(target)
    test = r.chosen(budget)[3]
    return combo.label, seed, hit if hit is not None else r.trial_epochs, hit is not None, test


def evaluate(
    table: CurveTable,
    combos: Sequence[Combo],
    seeds: Sequence[int],
    concurrency: int,
    budget: int,
    workers: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Every combination for every seed; per label its statistics (see the module doc)."""
    num_samples = 4 * table.num_configs
    jobs = [(table, c, s, concurrency, budget, num_samples) for c in combos for s in seeds]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        # Spawned, not forked: the caller may hold threads (Ray, JAX) that a fork would copy
        # mid-lock.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs = list(pool.map(_one, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    else:
        runs = [_one(j) for j in jobs]
    out: dict[str, dict[str, Any]] = {}
    for c in combos:
        mine = [r for r in runs if r[0] == c.label]
        epochs = np.array([r[2] for r in mine], float)
        tests = np.array([r[4] for r in mine], float)
        out[c.label] = {
            "combo": c,
            "epochs": epochs,
            "reached": float(np.mean([r[3] for r in mine])),
            "median": float(np.median(epochs)),
            "q25": float(np.percentile(epochs, 25)),
            "q75": float(np.percentile(epochs, 75)),
            "test_median": float(np.median(tests)),
            "test_q25": float(np.percentile(tests, 25)),
            "test_q75": float(np.percentile(tests, 75)),
        }
    return out


def best(stats: dict[str, dict[str, Any]]) -> str:
    """The label with the lowest median trial-epochs to the target (ties: more seeds reached,
    then the better median test metric)."""
    return min(
        stats, key=lambda k: (stats[k]["median"], -stats[k]["reached"], stats[k]["test_median"])
    )


def format_table(stats: dict[str, dict[str, Any]], reference: str = "random+fifo") -> list[str]:
    ref = stats.get(reference, {}).get("median")
    lines = [
        f"{'combination':<28} {'median':>7} {'25-75%':>13} {'reached':>8} {'/ random+fifo':>13}"
        f" {'test@budget':>12} {'25-75%':>13}"
    ]
    for label, s in sorted(stats.items(), key=lambda kv: kv[1]["median"]):
        ratio = f"{s['median'] / ref:.3f}" if ref else "-"
        lines.append(
            f"{label:<28} {s['median']:>7.0f} {s['q25']:>6.0f}-{s['q75']:<6.0f} "
            f"{100 * s['reached']:>7.0f}% {ratio:>13} {s['test_median']:>12.4f} "
            f"{s['test_q25']:>6.4f}-{s['test_q75']:<6.4f}"
        )
    return lines


def summary(stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """JSON-able statistics (without the per-seed arrays' numpy types)."""
    return {
        k: {
            **{n: v for n, v in s.items() if n not in ("combo", "epochs")},
            "searcher": s["combo"].searcher,
            "scheduler": s["combo"].scheduler,
            "epochs": [int(e) for e in s["epochs"]],
        }
        for k, s in stats.items()
    }


def median_of(values: Sequence[float]) -> float:
    return float(statistics.median(values))
