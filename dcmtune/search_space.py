"""Sweep specs: a YAML file -> a validated, frozen `SweepSpec` -> a Ray Tune param space.

A spec holds only what differs from the `ExperimentConfig` defaults (DESIGN.md section 6):

  name, description, notes, random_seed     the experiment (name = directory under storage_path)
  data:       DataConfig fields; data_files relative to the spec file (none = bundled demo set)
  model:      fixed ModelConfig values
  training:   fixed TrainingConfig values (training.num_epochs is ASHA's max_t)
  search:     dotted config key -> one distribution, written as a one-key mapping:
                training.learning_rate: {loguniform: [1.0e-4, 1.0e-2]}  lo > 0, lo < hi
                training.chg_w:         {uniform: [0.0, 2.0]}            lo < hi
                training.esp_w:         {quniform: [500, 2000, 250]}     lo + k*q, hi included
                model.num_iterations:   {randint: [1, 3]}                lo..hi, hi INCLUDED
                model.features:         {choice: [16, 32, 64]}
  searcher:   optuna: sampler (tpe | random), seed, n_startup_trials, storage (default: the
              journal file optuna.log in the experiment directory; see dcmtune.study),
              points_to_evaluate
  scheduler:  asha (grace_period, reduction_factor, brackets; max_t = training.num_epochs) | fifo
  run:        num_samples, max_concurrent_trials, metric, mode, resources {cpu, gpu, gpu_share},
              max_failures, storage_path (a directory or s3://, gs:// ...), checkpoint_every,
              num_to_keep, time_budget_s, jax_cache_dir, local_dir
  rank:       top_k, split (used by the ranking of the best trials)
  debug:      dotted config key -> value, applied by `--debug` on top of one point of the space
  tracking:   mlflow {tracking_uri, experiment_name, tags}, wandb {project, entity, group, mode,
              tags} (see dcmtune.tracking)

Every problem raises `SpecError` with one line that starts with the offending key. Nothing here
imports Ray or JAX; `SweepSpec.param_space` imports `ray.tune` only when called.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tempfile
import typing
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Optional, Sequence, Union

from dcmtune import metrics, study
from dcmtune import storage as storage_mod
from dcmtune._yaml import read_yaml
from dcmtune.config import (ConfigError, DataConfig, ExperimentConfig, ModelConfig,
                            TrainingConfig)
from dcmtune.tracking import TrackingSpec, parse_tracking

__all__ = [
    "SpecError",
    "Distribution",
    "SearcherSpec",
    "SchedulerSpec",
    "ResourceSpec",
    "RunSpec",
    "RankSpec",
    "SweepSpec",
    "load_spec",
    "spec_from_dict",
    "SWEEP_METRICS",
    "LOSS_WEIGHTS",
    "DISTRIBUTIONS",
]

DISTRIBUTIONS = ("loguniform", "uniform", "quniform", "randint", "choice")
LOSS_WEIGHTS = ("training.esp_w", "training.chg_w", "training.dip_w")
# The per-split metrics the trainer reports every epoch (dcmtune.loss.finalize_metrics); the
# same strings appear in the epoch table, in tune.report and in the ranking. test_* metrics
# exist only in the ranking: the test split never chooses anything.
SWEEP_METRICS = metrics.SWEEP_METRICS

_SECTIONS = {"model": ModelConfig, "training": TrainingConfig, "data": DataConfig}
_TOP_LEVEL = ("name", "description", "notes", "random_seed", "data", "model", "training",
              "search", "searcher", "scheduler", "run", "rank", "debug", "tracking")
_NOT_SEARCHABLE = {
    "training.num_epochs": "it is the scheduler's max_t; fix it under training:",
    "model.max_atomic_number": "it must cover the data; fix it under model:",
}


class SpecError(ValueError):
    """A sweep spec is invalid; the message is one line starting with the offending key."""


# --------------------------------------------------------------------------- small checks


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _mapping(key: str, value: Any, allowed: Sequence[str]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(f"{key}: expected a mapping, got {value!r}")
    for k in value:
        if k not in allowed:
            where = f"{key}.{k}" if key else str(k)
            raise SpecError(f"{where}: unknown key; expected one of {', '.join(allowed)}")
    return dict(value)


def _int(key: str, value: Any, lo: Optional[int] = None, none_ok: bool = False) -> Optional[int]:
    if value is None and none_ok:
        return None
    if not _is_int(value) or (lo is not None and value < lo):
        want = "an integer" + (f" >= {lo}" if lo is not None else "")
        raise SpecError(f"{key}: expected {want}, got {value!r}")
    return value


def _num(key: str, value: Any, gt: Optional[float] = None, none_ok: bool = False
         ) -> Optional[float]:
    if value is None and none_ok:
        return None
    if not _is_num(value) or (gt is not None and value <= gt):
        want = "a number" + (f" > {gt}" if gt is not None else "")
        raise SpecError(f"{key}: expected {want}, got {value!r}")
    return float(value)


def _str(key: str, value: Any, choices: Optional[Sequence[str]] = None) -> str:
    if not isinstance(value, str) or (choices is not None and value not in choices):
        want = " or ".join(choices) if choices else "a string"
        raise SpecError(f"{key}: expected {want}, got {value!r}")
    return value


def _field_kind(dotted: str) -> type:
    """The element type (int, float, bool, str) of a dotted config field; SpecError if none."""
    head, _, tail = dotted.partition(".")
    if not tail:
        cls, name = ExperimentConfig, head
    elif head in _SECTIONS:
        cls, name = _SECTIONS[head], tail
    else:
        raise SpecError(f"{dotted}: unknown config section {head!r}; expected model., training. "
                        "or a top-level field such as random_seed")
    hints = typing.get_type_hints(cls)
    if name not in hints or name.startswith("_") or name in _SECTIONS:
        fields = [f.name for f in dataclasses.fields(cls) if f.name not in _SECTIONS]
        raise SpecError(f"{dotted}: unknown config field; expected one of "
                        f"{', '.join((head + '.' if tail else '') + f for f in fields)}")
    kind = hints[name]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is list:
        return list
    return args[0] if args else kind


# --------------------------------------------------------------------------- distributions


@dataclasses.dataclass(frozen=True)
class Distribution:
    """One searched hyper-parameter.

    Attributes:
      key: Dotted config key, e.g. "training.learning_rate".
      kind: loguniform | uniform | quniform | randint | choice.
      args: (lo, hi) for loguniform/uniform/randint, (lo, hi, q) for quniform, the options for
        choice. randint includes hi (`{randint: [1, 3]}` draws 1, 2 or 3).
      integer: Whether the config field is an integer (quniform then draws integers).
    """

    key: str
    kind: str
    args: tuple
    integer: bool = False

    def to_tune(self):
        """The Ray Tune domain (imports ray.tune)."""
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "quniform":
            return tune.qrandint(*self.args) if self.integer else tune.quniform(*self.args)
        if self.kind == "randint":
            lo, hi = self.args
            return tune.randint(lo, hi + 1)  # Tune's upper bound is exclusive; ours is not.
        return tune.choice(list(self.args))

    def contains(self, value: Any) -> bool:
        """Whether `value` is a possible draw."""
        if self.kind == "choice":
            return any(_same(value, c) for c in self.args)
        if not _is_num(value) or (self.integer and not _is_int(value)):
            return False
        lo, hi = self.args[:2]
        if not lo <= value <= hi:
            return False
        if self.kind == "quniform":
            k = (value - lo) / self.args[2]
            return abs(k - round(k)) < 1e-9
        return self.kind != "randint" or _is_int(value)

    def center(self) -> Any:
        """A representative point: the (geometric) middle of a range, the first choice."""
        if self.kind == "choice":
            return self.args[0]
        lo, hi = self.args[:2]
        if self.kind == "randint":
            return (lo + hi) // 2
        mid = math.sqrt(lo * hi) if self.kind == "loguniform" else 0.5 * (lo + hi)
        if self.kind == "quniform":
            q = self.args[2]
            mid = lo + round((mid - lo) / q) * q
            return int(mid) if self.integer else float(mid)
        return float(mid)

    def to_dict(self) -> dict:
        return {self.kind: list(self.args)}


def _distribution(key: str, dotted: str, spec: Any) -> Distribution:
    """Parses `{kind: args}` for config field `dotted`; `key` is its name in error messages."""
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise SpecError(f"{key}: expected one distribution written as {{kind: [args]}} with kind "
                        f"one of {', '.join(DISTRIBUTIONS)}, got {spec!r}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise SpecError(f"{key}: unknown distribution {kind!r}; expected one of "
                        f"{', '.join(DISTRIBUTIONS)}")
    field = _field_kind(dotted)
    integer = field is int
    if not isinstance(args, (list, tuple)):
        raise SpecError(f"{key}: {kind} expects a list, got {args!r}")
    args = tuple(args)

    if kind == "choice":
        if not args:
            raise SpecError(f"{key}: choice needs at least one option, got []")
        for a in args:
            ok = {int: _is_int(a), float: _is_num(a), bool: isinstance(a, bool),
                  str: isinstance(a, str)}.get(field, False)
            if not ok:
                raise SpecError(f"{key}: choice option {a!r} does not fit the field's type "
                                f"({field.__name__})")
        if len(set(args)) != len(args):
            raise SpecError(f"{key}: choice options repeat: {list(args)}")
        return Distribution(dotted, kind, args, integer)

    if field not in (int, float):
        raise SpecError(f"{key}: {kind} draws numbers but the field is a {field.__name__}; use "
                        "choice")
    n = 3 if kind == "quniform" else 2
    if len(args) != n or not all(_is_num(a) for a in args):
        form = "[lo, hi, q]" if n == 3 else "[lo, hi]"
        raise SpecError(f"{key}: {kind} expects {form} as finite numbers, got {list(args)}")
    lo, hi = args[0], args[1]
    if not lo < hi:
        raise SpecError(f"{key}: {kind} needs lo < hi, got lo = {lo}, hi = {hi}")
    if kind in ("loguniform", "uniform") and integer:
        raise SpecError(f"{key}: {kind} draws floats but the field is an integer; use randint, "
                        "quniform with integer bounds, or choice")
    if kind == "randint":
        if not integer:
            raise SpecError(f"{key}: randint draws integers but the field is a float; use uniform "
                            "or quniform")
        if not (_is_int(lo) and _is_int(hi)):
            raise SpecError(f"{key}: randint expects integer bounds, got {list(args)}")
    if kind == "loguniform" and lo <= 0:
        raise SpecError(f"{key}: loguniform needs lo > 0, got lo = {lo}")
    if kind == "quniform":
        q = args[2]
        if q <= 0:
            raise SpecError(f"{key}: quniform needs a step q > 0, got q = {q}")
        if integer and not all(_is_int(a) for a in args):
            raise SpecError(f"{key}: the field is an integer, so quniform needs integer lo, hi "
                            f"and q, got {list(args)}")
        steps = (hi - lo) / q
        if abs(steps - round(steps)) > 1e-9 * max(1.0, abs(steps)):
            raise SpecError(f"{key}: quniform needs hi - lo to be a multiple of q, got "
                            f"{list(args)}")
        args = (lo, hi, q) if integer else (float(lo), float(hi), float(q))
    elif not integer:
        args = (float(lo), float(hi))
    return Distribution(dotted, kind, args, integer)


# --------------------------------------------------------------------------- spec sections


@dataclasses.dataclass(frozen=True)
class SearcherSpec:
    """Optuna searcher settings.

    Attributes:
      sampler: "tpe" (model-based, default) or "random".
      seed: Sampler seed.
      n_startup_trials: Random trials before TPE starts modelling (Optuna's default is 10).
      storage: The Optuna storage as written (`dcmtune.study`): a journal file (default
        optuna.log) or an SQL URL, relative paths in the experiment directory
        (`SweepSpec.study_storage` resolves them); None keeps the study in memory.
      points_to_evaluate: Points run first, each giving a value for every searched key.
    """

    sampler: str = "tpe"
    seed: int = 0
    n_startup_trials: int = 10
    storage: Optional[str] = study.DEFAULT_STORAGE
    points_to_evaluate: tuple = ()


@dataclasses.dataclass(frozen=True)
class SchedulerSpec:
    """Trial scheduler. "asha" stops trials early; "fifo" runs every trial to the end.

    Attributes:
      name: "asha" or "fifo".
      grace_period: Epochs every trial runs before it can be stopped.
      reduction_factor: ASHA keeps the best 1/reduction_factor of the trials at each rung.
      brackets: ASHA brackets (1 = plain successive halving).
    """

    name: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 3.0
    brackets: int = 1


@dataclasses.dataclass(frozen=True)
class ResourceSpec:
    """Resources of one trial.

    Attributes:
      cpu: CPUs per trial.
      gpu: "auto" (GPU trials with `gpu_share` of a GPU where the cluster has GPUs, CPU trials
        where it has none), or a number: 0 = CPU only; a fraction packs several trials on one
        GPU (0.25 = four per GPU); >= 1 must be whole GPUs. Asking for GPUs on a cluster without
        any is an error.
      gpu_share: The GPU share used by "auto".
    """

    cpu: float = 1.0
    gpu: Union[str, float] = "auto"
    gpu_share: float = 1.0


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """How the sweep runs.

    Attributes:
      num_samples: Trials in total.
      max_concurrent_trials: At most this many at once (None: as many as resources allow).
      metric, mode: What the searcher, the scheduler and checkpoint scoring optimise.
      resources: Per trial.
      max_failures: Retries of a crashed trial (from its last checkpoint).
      checkpoint_every: A Tune checkpoint every N epochs besides those at improvements and at
        the end (0 = only those).
      num_to_keep: Tune checkpoints kept per trial, best by `metric` (the latest is also kept).
      time_budget_s: Stop starting/continuing trials after this many seconds (None = no limit).
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
    max_concurrent_trials: Optional[int] = None
    metric: str = "valid_esp_rmse"
    mode: str = "min"
    resources: ResourceSpec = ResourceSpec()
    max_failures: int = 1
    storage_path: str = ""
    checkpoint_every: int = 5
    num_to_keep: Optional[int] = 3
    time_budget_s: Optional[float] = None
    jax_cache_dir: str = ""
    local_dir: str = ""


@dataclasses.dataclass(frozen=True)
class RankSpec:
    """Ranking of the finished sweep: the best `top_k` trials by the validation metric,
    re-evaluated on `split` (the test split by default)."""

    top_k: int = 5
    split: str = "test"


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A validated sweep.

    Attributes:
      name, description: The experiment; results go to <run.storage_path>/<name>.
      path: The spec file (None when built from a dict).
      base: The ExperimentConfig every trial starts from (defaults + the spec's fixed values;
        data files absolute).
      search: Dotted key -> Distribution.
      searcher, scheduler, run, rank: See their classes.
      debug: Dotted key -> value, applied by --debug.
      tracking: MLflow / W&B settings (`dcmtune.tracking`).
    """

    name: str
    description: str
    path: Optional[Path]
    base: ExperimentConfig
    search: Mapping[str, Distribution]
    searcher: SearcherSpec
    scheduler: SchedulerSpec
    run: RunSpec
    rank: RankSpec
    debug: Mapping[str, Any]
    tracking: TrackingSpec = TrackingSpec()

    @property
    def remote(self) -> bool:
        """Whether the experiment lives in an object store (not a POSIX directory)."""
        return storage_mod.is_remote(self.run.storage_path)

    @property
    def experiment_uri(self) -> str:
        """Where Tune writes the experiment: <storage_path>/<name>, a path or a URI."""
        return storage_mod.join(self.run.storage_path, self.name)

    @property
    def experiment_dir(self) -> Path:
        """The experiment directory on this machine: <storage_path>/<name>, or, with object
        storage, the driver's local copy of it (`dcmtune.storage.local_copy_dir`)."""
        if self.remote:
            return storage_mod.local_copy_dir(self.experiment_uri, Path(self.run.local_dir))
        return Path(self.run.storage_path) / self.name

    @property
    def study_storage(self) -> Optional[str]:
        """The Optuna storage, resolved (`dcmtune.study.resolve_storage`); None = in memory."""
        return study.resolve_storage(self.searcher.storage, self.experiment_dir)

    @property
    def num_epochs(self) -> int:
        return self.base.training.num_epochs

    def param_space(self) -> dict:
        """The Tune param space: flat dotted keys -> Tune domains (imports ray.tune)."""
        return {k: d.to_tune() for k, d in self.search.items()}

    def config_for(self, point: Mapping[str, Any], **extra: Any) -> ExperimentConfig:
        """`base` with a point of the space (dotted keys) and `extra` dotted overrides."""
        values = {k: _plain(v) for k, v in {**point, **extra}.items()}
        return self.base.replace(**values) if values else self.base

    def debug_point(self) -> dict:
        """One point of the space (each distribution's centre) with the `debug:` overrides."""
        return {**{k: d.center() for k, d in self.search.items()}, **self.debug}

    def to_dict(self) -> dict:
        """A JSON-able record of the resolved spec (written into the experiment directory)."""
        return {
            "name": self.name, "description": self.description,
            "path": str(self.path) if self.path else None,
            "base": self.base.to_dict(),
            "search": {k: d.to_dict() for k, d in self.search.items()},
            "searcher": dataclasses.asdict(self.searcher),
            "scheduler": dataclasses.asdict(self.scheduler),
            "run": dataclasses.asdict(self.run), "rank": dataclasses.asdict(self.rank),
            "debug": dict(self.debug), "tracking": self.tracking.to_dict(),
        }

    def renamed(self, name: str) -> "SweepSpec":
        """A copy under another experiment name."""
        _check_name("--name", name)
        return dataclasses.replace(self, name=name, base=self.base.replace(name=name))

    def replace_run(self, **changes: Any) -> "SweepSpec":
        """A copy with `run:` fields changed (e.g. from command-line flags), re-validated."""
        run = dataclasses.replace(self.run, **changes)
        _check_run(run, self)
        return dataclasses.replace(self, run=run)


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps True apart from 1 (YAML and Python both conflate them)."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def _plain(v: Any) -> Any:
    """numpy scalars (as some samplers return) -> Python scalars."""
    return v.item() if hasattr(v, "item") and not isinstance(v, (list, tuple, dict)) else v


# --------------------------------------------------------------------------- building


def load_spec(path: str | Path, storage_path: Optional[str | Path] = None) -> SweepSpec:
    """Reads and validates a sweep spec file.

    Args:
      path: The YAML file. Relative paths inside it are relative to its directory.
      storage_path: Overrides run.storage_path (relative to the current directory).

    Raises:
      SpecError: one line naming the key, for any problem (file missing, YAML syntax, unknown
        keys, bad ranges or types, missing data files, ...).
    """
    path = Path(path)
    raw = read_yaml(path, SpecError, "spec file")
    if raw is None:
        raise SpecError(f"{path}: the spec file is empty")
    if not isinstance(raw, Mapping):
        raise SpecError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    raw = dict(raw)
    raw.setdefault("name", path.stem)
    return spec_from_dict(raw, base_dir=path.resolve().parent, path=path.resolve(),
                          storage_path=storage_path)


def spec_from_dict(raw: Mapping[str, Any], base_dir: str | Path = ".",
                   path: Optional[Path] = None,
                   storage_path: Optional[str | Path] = None) -> SweepSpec:
    """Validates a spec given as a dict (as read from YAML); see `load_spec`."""
    base_dir = Path(base_dir).resolve()
    raw = _mapping("", raw, _TOP_LEVEL)

    # 1. The experiment and its fixed values -> base ExperimentConfig.
    name = _check_name("name", raw.get("name"))
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise SpecError(f"description: expected a string, got {description!r}")
    top = {"name": name, "description": description}
    for key in ("notes", "random_seed"):
        if key in raw:
            top[key] = raw[key]
    sections = {}
    for sec, cls in _SECTIONS.items():
        d = _mapping(sec, raw.get(sec), [f.name for f in dataclasses.fields(cls)])
        sections[sec] = d
    data = sections["data"]
    files = data.get("data_files", [])
    if isinstance(files, str):
        files = [files]
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise SpecError(f"data.data_files: expected a list of .npz paths, got {files!r}")
    resolved = []
    for i, f in enumerate(files):
        p = Path(f).expanduser()
        p = p if p.is_absolute() else base_dir / p
        if not p.is_file():
            raise SpecError(f"data.data_files[{i}]: file not found: {p}")
        resolved.append(str(p.resolve()))
    data["data_files"] = resolved
    # Sweeps keep the trial directories lean: the trainer's own periodic checkpoints are off
    # unless the spec asks for them (Tune keeps its own, see run.num_to_keep).
    sections["training"].setdefault("save_every_n_epochs", 0)
    try:
        base = ExperimentConfig.from_dict({**top, **sections})
    except ConfigError as e:
        raise SpecError(str(e)) from None

    # 2. The search space.
    search_raw = raw.get("search") or {}
    if not isinstance(search_raw, Mapping):
        raise SpecError(f"search: expected a mapping of dotted keys to distributions, got "
                        f"{search_raw!r}")
    search: dict[str, Distribution] = {}
    for key, spec in search_raw.items():
        if not isinstance(key, str):
            raise SpecError(f"search.{key}: expected a dotted config key such as "
                            "training.learning_rate")
        where = f"search.{key}"
        head, _, tail = key.partition(".")
        if head == "data":
            raise SpecError(f"{where}: data settings cannot be searched (every trial must see "
                            "the same split)")
        if key in _NOT_SEARCHABLE:
            raise SpecError(f"{where}: cannot be searched: {_NOT_SEARCHABLE[key]}")
        if not tail and key not in ("random_seed",):
            raise SpecError(f"{where}: expected a dotted key model.<field> or "
                            "training.<field> (or random_seed)")
        try:
            _field_kind(key)
        except SpecError as e:
            raise SpecError(f"search.{e}") from None
        if tail and head in sections and tail in sections[head]:
            raise SpecError(f"{where}: is both fixed (under {head}:) and searched; keep one")
        dist = _distribution(where, key, spec)
        for label, value in _endpoints(dist):
            try:
                base.replace(**{key: value})
            except ConfigError as e:
                raise SpecError(f"{where}: {label} = {value!r} is not a valid value ({e})") \
                    from None
        search[key] = dist

    # 3. Searcher, scheduler, run, rank, debug.
    searcher = _searcher(raw.get("searcher"), search)
    scheduler = _scheduler(raw.get("scheduler"), base.training.num_epochs)
    rank = _rank_spec(raw.get("rank"))
    run = _run(raw.get("run"), base_dir, storage_path)
    debug_raw = raw.get("debug") or {}
    if not isinstance(debug_raw, Mapping):
        raise SpecError(f"debug: expected a mapping of dotted keys to values, got {debug_raw!r}")
    debug = {}
    for key, value in debug_raw.items():
        try:
            _field_kind(str(key))
        except SpecError as e:
            raise SpecError(f"debug.{e}") from None
        debug[key] = value

    tracking = parse_tracking(raw.get("tracking"), base_dir, error=SpecError)
    spec = SweepSpec(name=name, description=description, path=path, base=base,
                     search=MappingProxyType(search), searcher=searcher, scheduler=scheduler,
                     run=run, rank=rank, debug=MappingProxyType(debug), tracking=tracking)
    _check_run(run, spec)
    try:
        spec.config_for(spec.debug_point())
    except ConfigError as e:
        raise SpecError(f"debug: the debug point is not a valid config ({e})") from None
    return spec


def _check_name(key: str, name: Any) -> str:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise SpecError(f"{key}: expected letters, digits, '_', '-' or '.' (a directory name), "
                        f"got {name!r}")
    return name


def _endpoints(d: Distribution):
    if d.kind == "choice":
        return [(f"option {i}", v) for i, v in enumerate(d.args)]
    return [("lo", d.args[0]), ("hi", d.args[1])]


def _searcher(raw: Any, search: Mapping[str, Distribution]) -> SearcherSpec:
    d = _mapping("searcher", raw, ("name", "sampler", "seed", "n_startup_trials", "storage",
                                   "points_to_evaluate"))
    _str("searcher.name", d.get("name", "optuna"), ("optuna",))
    sampler = _str("searcher.sampler", d.get("sampler", "tpe"), ("tpe", "random"))
    seed = _int("searcher.seed", d.get("seed", 0), 0)
    startup = _int("searcher.n_startup_trials", d.get("n_startup_trials", 10), 0)
    # Relative paths are kept as written: they resolve in the experiment directory.
    storage = study.check_storage(d.get("storage", study.DEFAULT_STORAGE), error=SpecError)
    points = d.get("points_to_evaluate") or []
    if not isinstance(points, list):
        raise SpecError(f"searcher.points_to_evaluate: expected a list of points, got {points!r}")
    if points and not search:
        raise SpecError("searcher.points_to_evaluate: given, but nothing is searched")
    out = []
    for i, p in enumerate(points):
        where = f"searcher.points_to_evaluate[{i}]"
        if not isinstance(p, Mapping):
            raise SpecError(f"{where}: expected a mapping of searched keys to values, got {p!r}")
        missing = sorted(set(search) - set(p))
        extra = sorted(set(p) - set(search))
        if extra:
            raise SpecError(f"{where}.{extra[0]}: not a searched key; expected one of "
                            f"{', '.join(search)}")
        if missing:
            raise SpecError(f"{where}: missing a value for {missing[0]} (give every searched key)")
        for k, v in p.items():
            if not search[k].contains(v):
                raise SpecError(f"{where}.{k}: {v!r} is outside {search[k].to_dict()}")
        out.append(dict(p))
    return SearcherSpec(sampler, seed, startup, storage, tuple(out))


def _scheduler(raw: Any, num_epochs: int) -> SchedulerSpec:
    d = _mapping("scheduler", raw, ("name", "grace_period", "reduction_factor", "brackets",
                                    "max_t"))
    name = _str("scheduler.name", d.get("name", "asha"), ("asha", "fifo"))
    if "max_t" in d and d["max_t"] != num_epochs:
        raise SpecError(f"scheduler.max_t: is training.num_epochs ({num_epochs}); set that "
                        f"instead of max_t = {d['max_t']!r}")
    grace = _int("scheduler.grace_period", d.get("grace_period", 1), 1)
    if grace > num_epochs:
        raise SpecError(f"scheduler.grace_period: {grace} exceeds training.num_epochs = "
                        f"{num_epochs}")
    rf = _num("scheduler.reduction_factor", d.get("reduction_factor", 3.0))
    if rf <= 1:
        raise SpecError(f"scheduler.reduction_factor: expected a number > 1, got {rf}")
    brackets = _int("scheduler.brackets", d.get("brackets", 1), 1)
    if name == "fifo" and any(k in d for k in ("grace_period", "reduction_factor", "brackets")):
        bad = next(k for k in ("grace_period", "reduction_factor", "brackets") if k in d)
        raise SpecError(f"scheduler.{bad}: only used by name: asha")
    return SchedulerSpec(name, grace, rf, brackets)


def _rank_spec(raw: Any) -> RankSpec:
    d = _mapping("rank", raw, ("top_k", "split"))
    return RankSpec(_int("rank.top_k", d.get("top_k", 5), 1),
                    _str("rank.split", d.get("split", "test"), ("test", "valid")))


def _resources(raw: Any) -> ResourceSpec:
    d = _mapping("run.resources", raw, ("cpu", "gpu", "gpu_share"))
    cpu = _num("run.resources.cpu", d.get("cpu", 1.0), gt=0)
    gpu = d.get("gpu", "auto")
    if gpu != "auto":
        if not _is_num(gpu) or gpu < 0:
            raise SpecError(f"run.resources.gpu: expected auto or a number >= 0, got {gpu!r}")
        if gpu > 1 and not float(gpu).is_integer():
            raise SpecError(f"run.resources.gpu: above 1 a trial needs whole GPUs, got {gpu}")
        gpu = float(gpu)
    share = d.get("gpu_share", 1.0)
    if "gpu_share" in d and gpu != "auto":
        raise SpecError("run.resources.gpu_share: only used with gpu: auto (give the share as "
                        "gpu: instead)")
    if not _is_num(share) or not 0 < share or (share > 1 and not float(share).is_integer()):
        raise SpecError(f"run.resources.gpu_share: expected a fraction in (0, 1] or whole GPUs, "
                        f"got {share!r}")
    return ResourceSpec(cpu, gpu, float(share))


def _run(raw: Any, base_dir: Path, storage_override) -> RunSpec:
    names = [f.name for f in dataclasses.fields(RunSpec)]
    d = _mapping("run", raw, names)
    if storage_override is not None:
        key, value, where = "--storage-path", str(storage_override), Path.cwd()
    elif d.get("storage_path") is not None:
        key, value, where = "run.storage_path", _str("run.storage_path", d["storage_path"]), \
            base_dir
    else:
        key, value, where = "run.storage_path", "ray_results", Path.cwd()
    try:
        storage = storage_mod.spec_storage_path(key, value, where)
    except storage_mod.StorageError as e:
        raise SpecError(str(e)) from None
    local_dir = d.get("local_dir")
    if local_dir is not None:
        p = Path(_str("run.local_dir", local_dir)).expanduser()
        local_dir = str((p if p.is_absolute() else base_dir / p).resolve())
    else:
        local_dir = str((Path.cwd() / "ray_results").resolve())
    cache = d.get("jax_cache_dir")
    if cache is not None:
        p = Path(_str("run.jax_cache_dir", cache)).expanduser()
        cache = str((p if p.is_absolute() else base_dir / p).resolve())
    elif storage_mod.is_remote(storage):
        # Object storage: each node keeps its own cache (a path every node can create).
        cache = str(Path(tempfile.gettempdir()) / "dcmtune-jax-cache")
    else:
        cache = str(Path(storage) / ".jax_cache")  # shared by all nodes that mount storage
    budget = d.get("time_budget_s")
    return RunSpec(
        num_samples=_int("run.num_samples", d.get("num_samples", 20), 1),
        max_concurrent_trials=_int("run.max_concurrent_trials", d.get("max_concurrent_trials"),
                                   1, none_ok=True),
        metric=_str("run.metric", d.get("metric", "valid_esp_rmse")),
        mode=_mode(d.get("mode", "min")),
        resources=_resources(d.get("resources")),
        max_failures=_int("run.max_failures", d.get("max_failures", 1), 0),
        storage_path=str(storage),
        checkpoint_every=_int("run.checkpoint_every", d.get("checkpoint_every", 5), 0),
        num_to_keep=_int("run.num_to_keep", d.get("num_to_keep", 3), 1, none_ok=True),
        time_budget_s=_num("run.time_budget_s", budget, gt=0, none_ok=True),
        jax_cache_dir=cache,
        local_dir=local_dir,
    )


def _mode(value: Any) -> str:
    if value == "max":
        raise SpecError("run.mode: every sweep metric is lower-is-better, so expected min, got "
                        "'max'")
    return _str("run.mode", value, ("min",))


def _check_run(run: RunSpec, spec: SweepSpec) -> None:
    """Checks of `run:` that depend on the rest of the spec."""
    _int("run.num_samples", run.num_samples, 1)
    if run.metric not in SWEEP_METRICS:
        hint = (" (the test split never chooses anything)" if run.metric.startswith("test_")
                else "")
        raise SpecError(f"run.metric: unknown metric {run.metric!r}{hint}; expected one of "
                        f"{', '.join(m for m in SWEEP_METRICS if m.startswith('valid_'))}")
    if not run.metric.startswith("valid_"):
        raise SpecError(f"run.metric: {run.metric} is measured on the training split; trials are "
                        "chosen and ranked on the validation split, so expected a valid_* "
                        "metric")
    searched_weights = [k for k in spec.search if k in LOSS_WEIGHTS]
    if run.metric.endswith("_loss") and searched_weights:
        raise SpecError(f"run.metric: {run.metric} changes scale with the searched loss weight "
                        f"{searched_weights[0]}, so trials cannot be compared; use "
                        "valid_esp_rmse")
    for i, point in enumerate(spec.searcher.points_to_evaluate):
        try:
            spec.config_for(point)
        except ConfigError as e:
            raise SpecError(f"searcher.points_to_evaluate[{i}]: not a valid config ({e})") \
                from None
