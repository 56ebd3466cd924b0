"""The sections of a sweep spec besides the config and the space: searcher, scheduler, run
(with its resources) and rank. Each is a frozen dataclass validated when it is built, like the
configs; `from_dict` reads one from its YAML mapping (unknown keys refused). Every problem
raises `SpecError`, one line starting with the offending key. Every key: docs/sweep_spec.md.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dcmtune import metrics
from dcmtune import storage as storage_mod
from dcmtune.sweep import study
from dcmtune.sweep.space import SpecError, _int, _is_num, _mapping, _num, _str

__all__ = [
    "SearcherSpec",
    "SchedulerSpec",
    "ResourceSpec",
    "RunSpec",
    "RankSpec",
    "Objective",
    "SWEEP_METRICS",
    "SELECTIONS",
    "SAMPLERS",
    "SCHEDULERS",
]

# Optuna's samplers a spec may name (`SearcherSpec.sampler`).
SAMPLERS = ("tpe", "random", "qmc", "cmaes", "grid", "nsga2")
# Tune's schedulers a spec may name (`SchedulerSpec.name`).
SCHEDULERS = ("asha", "hyperband", "median", "fifo")
# The per-split metrics the trainer reports every epoch (dcmtune.model.loss.finalize_metrics);
# the same strings appear in the epoch table, in tune.report and in the ranking. test_* metrics
# exist only in the ranking: the test split never chooses anything.
SWEEP_METRICS = metrics.SWEEP_METRICS
# How the ranking picks best_model/ among the front of a multi-objective sweep (`RankSpec.select`;
# the mapping form {max_cost: ...} besides these).
SELECTIONS = ("most_accurate", "knee")


@dataclasses.dataclass(frozen=True)
class SearcherSpec:
    """Optuna searcher settings.

    Attributes:
      sampler: Optuna's sampler: "tpe" (model-based, default), "random", "qmc" (quasi-random
        Sobol points), "cmaes" (CMA-ES with margin; needs the cmaes package) or "grid" (every
        combination of the searched choices once, in a seeded order; every searched key must
        be a choice and run.num_samples the number of combinations) or "nsga2" (NSGA-II, the
        genetic algorithm for several objectives). tpe, random, qmc, grid and nsga2 handle
        several objectives (`RunSpec.objectives`); cmaes only one.
      multivariate: TPE only: model the searched parameters jointly (Optuna's multivariate TPE).
      seed: Sampler seed.
      n_startup_trials: Random trials before TPE or CMA-ES start modelling (Optuna's default is
        10).
      storage: The Optuna storage as written (`dcmtune.sweep.study`): a journal file (default
        optuna.log) or an SQL URL, relative paths in the experiment directory
        (`SweepSpec.study_storage` resolves them); None keeps the study in memory.
      points_to_evaluate: Points run first, each giving a value for every searched key
        (checked against the search space by `SweepSpec`).
      population_size: nsga2 only: trials per generation (Optuna's default 50).
    """

    sampler: str = "tpe"
    multivariate: bool = False
    seed: int = 0
    n_startup_trials: int = 10
    storage: str | None = study.DEFAULT_STORAGE
    points_to_evaluate: tuple = ()
    population_size: int = 50

    def __post_init__(self) -> None:
        _str("searcher.sampler", self.sampler, SAMPLERS)
        if not isinstance(self.multivariate, bool):
            raise SpecError(
                f"searcher.multivariate: expected true or false, got {self.multivariate!r}"
            )
        if self.multivariate and self.sampler != "tpe":
            raise SpecError(f"searcher.multivariate: only used by sampler: tpe, not {self.sampler}")
        _int("searcher.seed", self.seed, 0)
        _int("searcher.n_startup_trials", self.n_startup_trials, 0)
        _int("searcher.population_size", self.population_size, 2)
        # Relative paths are kept as written: they resolve in the experiment directory.
        study.check_storage(self.storage, error=SpecError)
        for i, p in enumerate(self.points_to_evaluate):
            if not isinstance(p, Mapping):
                raise SpecError(
                    f"searcher.points_to_evaluate[{i}]: expected a mapping of "
                    f"searched keys to values, got {p!r}"
                )

    @classmethod
    def from_dict(cls, raw: Any) -> SearcherSpec:
        d = _mapping(
            "searcher",
            raw,
            (
                "name",
                "sampler",
                "multivariate",
                "seed",
                "n_startup_trials",
                "storage",
                "points_to_evaluate",
                "population_size",
            ),
        )
        _str("searcher.name", d.pop("name", "optuna"), ("optuna",))
        sampler = d.get("sampler", "tpe")
        if "n_startup_trials" in d and sampler in ("random", "qmc", "grid", "nsga2"):
            raise SpecError(
                f"searcher.n_startup_trials: only used by sampler: tpe or cmaes, not {sampler}"
            )
        if "population_size" in d and sampler != "nsga2":
            raise SpecError(f"searcher.population_size: only used by sampler: nsga2, not {sampler}")
        points = d.pop("points_to_evaluate", None) or []
        if not isinstance(points, list):
            raise SpecError(
                f"searcher.points_to_evaluate: expected a list of points, got {points!r}"
            )
        return cls(
            **d, points_to_evaluate=tuple(dict(p) if isinstance(p, Mapping) else p for p in points)
        )


@dataclasses.dataclass(frozen=True)
class SchedulerSpec:
    """Trial scheduler (Ray Tune's), on the `epoch` attribute, max_t = training.num_epochs.

    Attributes:
      name: "asha" (asynchronous successive halving: stops the worst trials at each rung),
        "hyperband" (synchronous brackets: pauses trials at a rung until the rung is full),
        "median" (median stopping: stops a trial whose best result is worse than the median of
        the others' running averages at the same epoch) or "fifo" (every trial to the end).
      grace_period: Epochs every trial runs before it can be stopped (asha, median).
      reduction_factor: asha and hyperband keep the best 1/reduction_factor at each rung.
      brackets: ASHA brackets (1 = plain successive halving).
      min_samples_required: median: trials needed at an epoch before one is compared.
    """

    name: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 3.0
    brackets: int = 1
    min_samples_required: int = 3

    def __post_init__(self) -> None:
        _str("scheduler.name", self.name, SCHEDULERS)
        _int("scheduler.grace_period", self.grace_period, 1)
        rf = _num("scheduler.reduction_factor", self.reduction_factor)
        if rf is None or rf <= 1:
            raise SpecError(f"scheduler.reduction_factor: expected a number > 1, got {rf}")
        object.__setattr__(self, "reduction_factor", rf)
        _int("scheduler.brackets", self.brackets, 1)
        _int("scheduler.min_samples_required", self.min_samples_required, 1)

    @classmethod
    def from_dict(cls, raw: Any, num_epochs: int) -> SchedulerSpec:
        keys = ("name", "grace_period", "reduction_factor", "brackets", "min_samples_required")
        d = _mapping("scheduler", raw, (*keys, "max_t"))
        if "max_t" in d and d.pop("max_t") != num_epochs:
            raise SpecError(
                f"scheduler.max_t: is training.num_epochs ({num_epochs}); set that "
                f"instead of max_t = {raw['max_t']!r}"
            )
        name = _str("scheduler.name", d.get("name", "asha"), SCHEDULERS)
        for key in sorted(d.keys() - {"name"} - set(_SCHEDULER_KEYS.get(name, ()))):
            users = [n for n, ks in _SCHEDULER_KEYS.items() if key in ks]
            raise SpecError(f"scheduler.{key}: only used by name: {' or '.join(users)}")
        spec = cls(**d)
        if spec.grace_period > num_epochs:
            raise SpecError(
                f"scheduler.grace_period: {spec.grace_period} exceeds "
                f"training.num_epochs = {num_epochs}"
            )
        return spec


# The settings each scheduler uses (the others are refused when given).
_SCHEDULER_KEYS = {
    "asha": ("grace_period", "reduction_factor", "brackets"),
    "hyperband": ("reduction_factor",),
    "median": ("grace_period", "min_samples_required"),
    "fifo": (),
}


@dataclasses.dataclass(frozen=True)
class ResourceSpec:
    """Resources of one trial.

    Attributes:
      cpu: CPUs per trial.
      gpu: "auto" (GPU trials with `gpu_share` of a GPU where the cluster has GPUs, CPU trials
        where it has none), or a number: 0 = CPU only; a fraction packs several trials on one
        GPU (0.25 = four per GPU); at most 1, as the trainer uses one device. Asking for GPUs
        on a cluster without any is an error.
      gpu_share: The GPU share used by "auto", in (0, 1].
    """

    cpu: float = 1.0
    gpu: str | float = "auto"
    gpu_share: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "cpu", _num("run.resources.cpu", self.cpu, gt=0))
        gpu = self.gpu
        if gpu != "auto":
            if not _is_num(gpu) or gpu < 0:
                raise SpecError(f"run.resources.gpu: expected auto or a number >= 0, got {gpu!r}")
            if gpu > 1:
                raise SpecError(
                    f"run.resources.gpu: {gpu:g} GPUs per trial, but the trainer uses one "
                    "device; use 1 or a fraction"
                )
            object.__setattr__(self, "gpu", float(gpu))
        share = self.gpu_share
        if not _is_num(share) or not 0 < share or share > 1:
            raise SpecError(
                f"run.resources.gpu_share: expected a fraction in (0, 1] (the trainer uses one "
                f"device), got {share!r}"
            )
        object.__setattr__(self, "gpu_share", float(share))

    @classmethod
    def from_dict(cls, raw: Any) -> ResourceSpec:
        d = _mapping("run.resources", raw, ("cpu", "gpu", "gpu_share"))
        if "gpu_share" in d and d.get("gpu", "auto") != "auto":
            raise SpecError(
                "run.resources.gpu_share: only used with gpu: auto (give the share as gpu: instead)"
            )
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Objective:
    """One objective of a multi-objective sweep (`RunSpec.objectives`).

    Attributes:
      metric: A validation metric (`valid_esp_rmse`) or a cost of the model
        (`dcmtune.metrics.COST_METRICS`: charges_per_atom, n_params, flops_per_molecule).
      mode: "min": errors and costs are both lower-is-better.
    """

    metric: str
    mode: str = "min"


def _objectives(raw: Any) -> tuple[Objective, ...]:
    """run.objectives as written (a list of {metric, mode} mappings, or Objectives) checked:
    at least two, each metric known once, every mode min, the first an error."""
    if not raw:
        return ()
    if not isinstance(raw, (list, tuple)) or len(raw) < 2:
        raise SpecError(
            "run.objectives: expected a list of at least two {metric, mode} mappings (one "
            f"objective: use run.metric), got {raw!r}"
        )
    out: list[Objective] = []
    for i, item in enumerate(raw):
        key = f"run.objectives[{i}]"
        if not isinstance(item, Objective):
            if not isinstance(item, Mapping):
                raise SpecError(
                    f"{key}: expected a mapping {{metric: ..., mode: min}}, got {item!r}"
                )
            d = _mapping(key, item, ("metric", "mode"))
            if "metric" not in d:
                raise SpecError(f"{key}.metric: missing; expected one of {_objective_names()}")
            item = Objective(**d)
        out.append(_check_objective(key, item, i, [o.metric for o in out]))
    return tuple(out)


def _objective_names() -> str:
    return ", ".join(metrics.OBJECTIVE_METRICS)


def _check_objective(key: str, o: Objective, index: int, before: list[str]) -> Objective:
    metric = _str(f"{key}.metric", o.metric)
    if metric not in metrics.OBJECTIVE_METRICS:
        hint = " (the test split never chooses anything)" if metric.startswith("test_") else ""
        raise SpecError(
            f"{key}.metric: unknown metric {metric!r}{hint}; expected one of {_objective_names()}"
        )
    if o.mode != "min":
        raise SpecError(
            f"{key}.mode: errors and costs are both lower-is-better, so expected min, "
            f"got {o.mode!r}"
        )
    if index == 0 and not metric.startswith("valid_"):
        raise SpecError(
            f"{key}.metric: the first objective is the error the scheduler and the checkpoints "
            f"use, so expected a valid_* metric, got {metric!r}"
        )
    if metric in before:
        raise SpecError(f"{key}.metric: {metric} is already an objective; give each once")
    return o


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """How the sweep runs.

    Attributes:
      num_samples: Trials in total.
      max_concurrent_trials: At most this many at once (None: as many as resources allow).
      metric, mode: What the searcher, the scheduler and checkpoint scoring optimise (every
        metric is lower-is-better: mode is "min"). With `objectives`, objectives[0].
      objectives: Several objectives (empty: one, `metric`): the searcher (Optuna, several
        directions) optimises all of them and the ranking gives their front; the scheduler,
        checkpoint scoring and the "best trial" use objectives[0], a validation error. The
        others may be costs of the model (`dcmtune.model.cost`).
      resources: Per trial.
      max_failures: Retries of a crashed trial (from its last checkpoint).
      checkpoint_every: A Tune checkpoint every N epochs besides those at improvements and at
        the end (0 = only those).
      num_to_keep: Tune checkpoints kept per trial, best by `metric` (the latest is also kept).
      time_budget_s: Stop starting/continuing trials after this many seconds (None = no limit).
      max_trial_epochs: End the sweep once its trials have run this many epochs in total (None
        = no limit): a budget in trial-epochs, whatever the scheduler stops
        (`tune_ext.TrialEpochBudget`).
      storage_path: Where Tune writes the experiments: an absolute directory (default
        ./ray_results; on a cluster one that every node mounts) or an object-store URI such as
        s3://bucket/path?endpoint_override=host:port (see `dcmtune.storage`).
      jax_cache_dir: Persistent JAX compilation cache of the trials (default
        <storage_path>/.jax_cache, shared by every node that mounts it; with object storage a
        node-local <tmp>/dcmtune-jax-cache on each node).
      local_dir: With object storage, the root of the driver's local copy of the experiment
        (lock, Optuna journal, ranking inputs and outputs); default ./ray_results.
    """

    num_samples: int = 20
    max_concurrent_trials: int | None = None
    metric: str = "valid_esp_rmse"
    mode: str = "min"
    resources: ResourceSpec = ResourceSpec()
    max_failures: int = 1
    storage_path: str = ""
    checkpoint_every: int = 5
    num_to_keep: int | None = 3
    time_budget_s: float | None = None
    max_trial_epochs: int | None = None
    jax_cache_dir: str = ""
    local_dir: str = ""
    objectives: tuple[Objective, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "objectives", _objectives(self.objectives))
        if self.objectives and (self.metric, self.mode) != (self.objectives[0].metric, "min"):
            raise SpecError(
                "run.metric: given with run.objectives, whose first metric is the one the "
                "scheduler uses; keep one"
            )
        _int("run.num_samples", self.num_samples, 1)
        _int("run.max_concurrent_trials", self.max_concurrent_trials, 1, none_ok=True)
        _str("run.metric", self.metric)
        if self.mode == "max":
            raise SpecError(
                "run.mode: every sweep metric is lower-is-better, so expected min, got 'max'"
            )
        _str("run.mode", self.mode, ("min",))
        _int("run.max_failures", self.max_failures, 0)
        _int("run.checkpoint_every", self.checkpoint_every, 0)
        _int("run.num_to_keep", self.num_to_keep, 1, none_ok=True)
        object.__setattr__(
            self, "time_budget_s", _num("run.time_budget_s", self.time_budget_s, gt=0, none_ok=True)
        )
        _int("run.max_trial_epochs", self.max_trial_epochs, 1, none_ok=True)
        if self.metric not in SWEEP_METRICS:
            hint = (
                " (the test split never chooses anything)"
                if self.metric.startswith("test_")
                else ""
            )
            raise SpecError(
                f"run.metric: unknown metric {self.metric!r}{hint}; expected one of "
                f"{', '.join(m for m in SWEEP_METRICS if m.startswith('valid_'))}"
            )
        if not self.metric.startswith("valid_"):
            raise SpecError(
                f"run.metric: {self.metric} is measured on the training split; "
                "trials are chosen and ranked on the validation split, so expected "
                "a valid_* metric"
            )

    @property
    def objective_metrics(self) -> tuple[str, ...]:
        """The metrics optimised: the objectives', else (metric,)."""
        return tuple(o.metric for o in self.objectives) or (self.metric,)

    @property
    def costs(self) -> tuple[str, ...]:
        """The cost metrics among the objectives (the trials report them)."""
        return tuple(m for m in self.objective_metrics if m in metrics.COST_METRICS)

    @classmethod
    def from_dict(cls, raw: Any, base_dir: Path, storage_override=None) -> RunSpec:
        """The run section with its paths resolved: storage_path, local_dir and jax_cache_dir
        relative to `base_dir` (the spec's directory); `storage_override` (--storage-path)
        relative to the working directory."""
        d = _mapping("run", raw, [f.name for f in dataclasses.fields(cls)])
        if d.get("objectives"):
            for key in ("metric", "mode"):
                if key in d:
                    raise SpecError(
                        f"run.{key}: given with run.objectives, whose first objective is what "
                        "the scheduler uses; keep one"
                    )
            objectives = _objectives(d.pop("objectives"))
            d.update(objectives=objectives, metric=objectives[0].metric, mode="min")
        storage = _storage_path(d.pop("storage_path", None), base_dir, storage_override)
        local_dir = _path("run.local_dir", d.pop("local_dir", None), base_dir)
        cache = _path("run.jax_cache_dir", d.pop("jax_cache_dir", None), base_dir)
        if cache is None:
            # Object storage: each node keeps its own cache (a path every node can create);
            # a shared file system: one cache for every node that mounts it.
            cache = (
                str(Path(tempfile.gettempdir()) / "dcmtune-jax-cache")
                if storage_mod.is_remote(storage)
                else str(Path(storage) / ".jax_cache")
            )
        return cls(
            **{**d, "resources": ResourceSpec.from_dict(d.get("resources"))},
            storage_path=storage,
            jax_cache_dir=cache,
            local_dir=local_dir or str((Path.cwd() / "ray_results").resolve()),
        )


def _storage_path(value: Any, base_dir: Path, override) -> str:
    if override is not None:
        key, value, where = "--storage-path", str(override), Path.cwd()
    elif value is not None:
        key, value, where = "run.storage_path", _str("run.storage_path", value), base_dir
    else:
        key, value, where = "run.storage_path", "ray_results", Path.cwd()
    try:
        return storage_mod.spec_storage_path(key, value, where)
    except storage_mod.StorageError as e:
        raise SpecError(str(e)) from None


def _path(key: str, value: Any, base_dir: Path) -> str | None:
    """A path written in a spec, absolute (relative ones from the spec's directory)."""
    if value is None:
        return None
    p = Path(_str(key, value)).expanduser()
    return str((p if p.is_absolute() else base_dir / p).resolve())


@dataclasses.dataclass(frozen=True)
class RankSpec:
    """Ranking of the finished sweep: the best `top_k` trials by the validation metric,
    re-evaluated on `split` (the test split by default). With several objectives the ranking
    lists the front instead, and `select` picks best_model/ from it (`dcmtune.analysis.pareto`):

      most_accurate          the lowest validation error (objectives[0]; the default)
      knee                   the cheapest model within 5% of the best validation error
      {max_cost: {m: x}}     the most accurate model whose cost m is at most x (several costs:
                             every bound holds); {max_cost: x} when one cost is an objective
    """

    top_k: int = 5
    split: str = "test"
    select: str | Mapping[str, Any] = "most_accurate"

    def __post_init__(self) -> None:
        _int("rank.top_k", self.top_k, 1)
        _str("rank.split", self.split, ("test", "valid"))
        object.__setattr__(self, "select", _selection(self.select))

    @classmethod
    def from_dict(cls, raw: Any) -> RankSpec:
        return cls(**_mapping("rank", raw, ("top_k", "split", "select")))


def _selection(raw: Any) -> str | dict[str, Any]:
    """rank.select checked on its own (its costs against the objectives: `SweepSpec`)."""
    expected = "most_accurate, knee or {max_cost: {<cost metric>: <bound>}}"
    if isinstance(raw, str):
        if raw not in SELECTIONS:
            raise SpecError(f"rank.select: expected {expected}, got {raw!r}")
        return raw
    if not isinstance(raw, Mapping) or set(raw) != {"max_cost"}:
        raise SpecError(f"rank.select: expected {expected}, got {raw!r}")
    bounds = raw["max_cost"]
    if _is_num(bounds):
        return {"max_cost": _num("rank.select.max_cost", bounds, gt=0)}
    if not isinstance(bounds, Mapping) or not bounds:
        raise SpecError(
            f"rank.select.max_cost: expected a mapping of cost metrics to bounds, got {bounds!r}"
        )
    out = {}
    for name, bound in bounds.items():
        if name not in metrics.COST_METRICS:
            raise SpecError(
                f"rank.select.max_cost.{name}: not a cost metric; expected one of "
                f"{', '.join(metrics.COST_METRICS)}"
            )
        out[name] = _num(f"rank.select.max_cost.{name}", bound, gt=0)
    return {"max_cost": out}
