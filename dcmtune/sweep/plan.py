"""What a sweep will do, said before it starts: `python -m dcmtune.sweep SPEC --dry-run`.

`describe` turns a validated spec, its prepared data and the resources of the cluster at hand into
lines of text: the spec as resolved (fixed values that differ from the defaults, overrides), the
search space, the searcher and scheduler, the budget in trial-epochs, the resources of one trial
and where results go. It is pure: nothing is started or written (no Ray, no JAX).

The budget: every trial may run `training.num_epochs` epochs, so N trials cost at most N x T
trial-epochs under any scheduler (ASHA stops a trial at a rung only when it is outside the best
1/reduction_factor seen there, so trials that keep arriving better all go on). Successive halving
with trials arriving in random order costs less; `budget` gives that nominal figure for ASHA.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from dcmtune.config import ExperimentConfig, flat_dict
from dcmtune.sweep.overrides import format_overrides
from dcmtune.sweep.resources import TrialResources
from dcmtune.sweep.spec import SHIPPED_SPECS, SchedulerSpec, SweepSpec

__all__ = ["Budget", "budget", "asha_epochs_per_trial", "describe"]


@dataclasses.dataclass(frozen=True)
class Budget:
    """Trial-epochs of a sweep: `worst_case` if no trial is stopped early, `nominal` under
    successive halving with trials in random order (None where not computed)."""

    worst_case: int
    nominal: float | None


def asha_epochs_per_trial(s: SchedulerSpec, max_t: int) -> float:
    """Mean epochs of one ASHA trial when 1 in `reduction_factor` passes each rung.

    Tune's bracket b has rungs at grace x eta^(b+k) below max_t; trials are spread evenly over
    the brackets here.
    """
    eta, costs = s.reduction_factor, []
    for b in range(s.brackets):
        rungs = []
        m = s.grace_period * eta**b
        while m < max_t:
            rungs.append(m)
            m *= eta
        cost, alive, reached = 0.0, 1.0, 0.0
        for m in [*rungs, max_t]:
            cost += alive * (m - reached)
            alive, reached = alive / eta, m
        costs.append(cost)
    return sum(costs) / len(costs)


def budget(spec: SweepSpec) -> Budget:
    n, t, cap = spec.run.num_samples, spec.num_epochs, spec.run.max_trial_epochs
    nominal = None
    if spec.scheduler.name == "asha":
        nominal = n * asha_epochs_per_trial(spec.scheduler, t)
    worst = n * t if cap is None else min(n * t, cap)
    if nominal is not None and cap is not None:
        nominal = min(nominal, cap)
    return Budget(worst_case=worst, nominal=nominal)


def describe(
    spec: SweepSpec,
    split_sizes: Mapping[str, tuple[int, int]],
    resources: TrialResources | None,
    cluster: Mapping[str, float] | None,
) -> list[str]:
    """The dry run's lines.

    Args:
      spec: The validated spec (overrides applied).
      split_sizes: split name -> (molecules, conformers).
      resources: One trial's resources on `cluster` (None when the cluster is not known here:
        --address).
      cluster: The resources of the cluster the sweep would run on (None: not known).
    """
    lines = [
        f"spec: {_where(spec)}",
        f"overrides: {format_overrides(spec.overrides)}",
        f"experiment: {spec.name} ({spec.description or 'no description'})",
        "data: " + (", ".join(spec.base.data.data_files) or "demo (bundled)"),
        "  split by "
        + f"{spec.base.data.split_by} (seed {spec.base.data.split_seed}): "
        + ", ".join(f"{k} {m} molecules / {c} conformers" for k, (m, c) in _ordered(split_sizes)),
        "fixed values (differing from the defaults):",
        *_fixed_lines(spec.base),
        f"search ({len(spec.search)} keys):",
        *(f"  {k:<28} {_dist(d.to_dict())}" for k, d in spec.search.items()),
        *_objective_lines(spec),
        _searcher_line(spec),
        _scheduler_line(spec),
        _budget_line(spec),
        _resources_line(spec, resources, cluster),
        f"results: {spec.experiment_uri}"
        + (f" (local copy {spec.experiment_dir})" if spec.remote else ""),
        f"  Optuna study: {spec.study_storage or 'in memory'}",
        "nothing was started or written (--dry-run)",
    ]
    return lines


def _where(spec: SweepSpec) -> str:
    if spec.path is None:
        return "(built in code)"
    shipped = spec.path.parent == SHIPPED_SPECS.resolve()
    return f"{spec.path}" + (" (shipped)" if shipped else "")


def _fixed_lines(base: ExperimentConfig) -> list[str]:
    skip = {"name", "description", "created_at", "data.data_files"}
    now, default = flat_dict(base.to_dict()), flat_dict(ExperimentConfig().to_dict())
    keys = [k for k in now if k not in skip and now[k] != default.get(k)]
    return [f"  {k:<28} {now[k]!r}" for k in keys] or ["  (none)"]


def _dist(d: Mapping[str, Any]) -> str:
    ((kind, args),) = d.items()
    return f"{kind} {args}"


def _searcher_line(spec: SweepSpec) -> str:
    s = spec.searcher
    parts = [f"seed {s.seed}"]
    if s.sampler in ("tpe", "cmaes"):
        parts.append(f"{s.n_startup_trials} start-up trials")
    if s.sampler == "nsga2":
        parts.append(f"population {s.population_size}")
    if s.multivariate:
        parts.append("multivariate")
    if s.points_to_evaluate:
        parts.append(f"{len(s.points_to_evaluate)} given point(s) first")
    return f"searcher: optuna {s.sampler} ({', '.join(parts)})"


def _objective_lines(spec: SweepSpec) -> list[str]:
    """The objectives of a multi-objective sweep (none: one metric, said by the run line)."""
    run = spec.run
    if not run.objectives:
        return [f"metric: {run.metric} ({run.mode})"]
    lines = [
        "objectives: " + ", ".join(f"{o.metric} ({o.mode})" for o in run.objectives),
        f"  the scheduler and the checkpoints use {run.metric}; the ranking gives the front and "
        f"rank.select = {_select(spec.rank.select)} picks best_model/",
    ]
    if run.costs and spec.scheduler.name != "fifo":
        lines.append(
            f"  note: {spec.scheduler.name} stops trials on {run.metric} alone, so cheap models "
            "(fewer charges, smaller networks) are stopped first and the front's cheap end may "
            "be under-trained; scheduler: {name: fifo} trains every trial to the end"
        )
    return lines


def _select(select: Any) -> str:
    return select if isinstance(select, str) else f"{dict(select)}"


def _scheduler_line(spec: SweepSpec) -> str:
    s, t = spec.scheduler, spec.num_epochs
    detail = {
        "asha": f"grace {s.grace_period}, reduction {s.reduction_factor:g}, brackets {s.brackets}",
        "hyperband": f"reduction {s.reduction_factor:g}",
        "median": f"grace {s.grace_period}, min samples {s.min_samples_required}",
        "fifo": "every trial runs to the end",
    }[s.name]
    line = f"scheduler: {s.name} ({detail}); max_t = training.num_epochs = {t}"
    cap = spec.run.max_concurrent_trials
    if s.name == "hyperband" and cap is not None and cap < spec.run.num_samples:
        # Measured in replays of Tune's scheduler (bench/RESULTS.md, learning-curve tables).
        line += (
            f"\n  note: with run.max_concurrent_trials = {cap}, HyperBand stopped no trial in "
            "replays of this setting (it equals fifo); asha is the asynchronous choice"
        )
    return line


def _budget_line(spec: SweepSpec) -> str:
    b, run = budget(spec), spec.run
    text = (
        f"budget: {run.num_samples} trials x at most {spec.num_epochs} epochs = "
        f"{run.num_samples * spec.num_epochs} trial-epochs in the worst case"
    )
    if b.nominal is not None:
        text += f"; about {math.ceil(b.nominal)} if 1 in {spec.scheduler.reduction_factor:g} "
        text += "passes each ASHA rung"
    if run.max_trial_epochs is not None:
        text += f"; the sweep ends at run.max_trial_epochs = {run.max_trial_epochs}"
    if run.time_budget_s is not None:
        text += f"; stops after {run.time_budget_s:g} s"
    return text


def _resources_line(
    spec: SweepSpec, resources: TrialResources | None, cluster: Mapping[str, float] | None
) -> str:
    r, cap = spec.run.resources, spec.run.max_concurrent_trials
    asked = f"{r.cpu:g} CPU, GPU {r.gpu}" + (
        f" ({r.gpu_share:g} of one where the cluster has GPUs)" if r.gpu == "auto" else ""
    )
    if resources is None or cluster is None:
        return f"resources per trial: {asked}; the cluster's decide how many run at once"
    fits = [cluster.get("CPU", 0.0) / resources.cpu]
    if resources.gpu > 0:
        fits.append(cluster.get("GPU", 0.0) / resources.gpu)
    at_once = max(1, int(min(fits) + 1e-9))
    if cap is not None:
        at_once = min(at_once, cap)
    kind = f"{resources.gpu:g} GPU" if resources.gpu else "CPU trials"
    return (
        f"resources per trial: {asked} -> here {resources.cpu:g} CPU, {kind}; "
        f"{at_once} at once on {cluster.get('CPU', 0):g} CPUs / {cluster.get('GPU', 0):g} GPUs"
    )


def _ordered(sizes: Mapping[str, tuple[int, int]]) -> list[tuple[str, tuple[int, int]]]:
    order = {"train": 0, "valid": 1, "test": 2}
    return sorted(sizes.items(), key=lambda kv: order.get(kv[0], 3))
