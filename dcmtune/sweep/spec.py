"""Sweep specs: a YAML file -> a validated, frozen `SweepSpec` -> a Ray Tune param space.

A spec holds only what differs from the `ExperimentConfig` defaults (DESIGN.md section 6; every
key: docs/sweep_spec.md):

  name, description, notes, random_seed     the experiment (name = directory under storage_path)
  data:       DataConfig fields; data_files relative to the spec file (none = bundled demo set)
  model:      fixed ModelConfig values
  training:   fixed TrainingConfig values (training.num_epochs is ASHA's max_t); init_from
              (a checkpoint relative to the spec file, or a shipped model name) fine-tunes:
              every trial starts from its weights, and model: must be its (not searched)
  search:     dotted config key -> one distribution (`dcmtune.sweep.space`)
  searcher:   optuna: sampler (tpe | random | qmc | cmaes | grid | nsga2), multivariate, seed,
              n_startup_trials, population_size, storage (default: the
              journal file optuna.log in the experiment directory; see dcmtune.sweep.study),
              points_to_evaluate
  scheduler:  asha (grace_period, reduction_factor, brackets) | hyperband (reduction_factor) |
              median (grace_period, min_samples_required) | fifo; max_t = training.num_epochs
  run:        num_samples, max_concurrent_trials, metric, mode (or objectives: several, e.g. an
              error and a cost), resources {cpu, gpu, gpu_share},
              max_failures, storage_path (a directory or s3://, gs:// ...), checkpoint_every,
              num_to_keep, time_budget_s, max_trial_epochs, jax_cache_dir,
              local_dir
  rank:       top_k, split, select (used by the ranking of the best trials; select picks
              best_model/ from the front of several objectives)
  debug:      dotted config key -> value, applied by `--debug` on top of one point of the space
  tracking:   mlflow {tracking_uri, experiment_name, tags}, wandb {project, entity, group, mode,
              tags} (see dcmtune.train.tracking)

Each section is a frozen dataclass validated when it is built, like the configs. Every problem
raises `SpecError` with one line that starts with the offending key. Nothing here imports Ray
or JAX; `SweepSpec.param_space` imports `ray.tune` only when called.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from dcmtune import storage as storage_mod
from dcmtune._io import plain
from dcmtune._yaml import read_yaml
from dcmtune.config import ConfigError, ExperimentConfig
from dcmtune.data.dataset import is_bundled_name
from dcmtune.metrics import COST_METRICS
from dcmtune.sweep import study
from dcmtune.sweep.overrides import Override, apply_overrides
from dcmtune.sweep.sections import (
    SWEEP_METRICS,
    Objective,
    RankSpec,
    ResourceSpec,
    RunSpec,
    SchedulerSpec,
    SearcherSpec,
)
from dcmtune.sweep.space import (
    SECTIONS,
    Distribution,
    SpecError,
    _mapping,
    field_kind,
    parse_distribution,
)
from dcmtune.train import finetune
from dcmtune.train.checkpoints import CheckpointError
from dcmtune.train.tracking import TrackingSpec, parse_tracking

__all__ = [
    "SpecError",
    "Distribution",
    "SearcherSpec",
    "SchedulerSpec",
    "ResourceSpec",
    "RunSpec",
    "RankSpec",
    "Objective",
    "SweepSpec",
    "load_spec",
    "read_spec",
    "spec_from_dict",
    "find_spec",
    "SWEEP_METRICS",
    "LOSS_WEIGHTS",
    "SHIPPED_SPECS",
]  # sections and space re-exported

log = logging.getLogger(__name__)

LOSS_WEIGHTS = ("training.esp_w", "training.chg_w", "training.dip_w")
# The specs shipped with the package: the top-level search_spaces/ folder, installed as the
# package data dcmtune.search_spaces (found from any working directory).
SHIPPED_SPECS = Path(str(importlib.resources.files("dcmtune.search_spaces")))

_TOP_LEVEL = (
    "name",
    "description",
    "notes",
    "random_seed",
    "data",
    "model",
    "training",
    "search",
    "searcher",
    "scheduler",
    "run",
    "rank",
    "debug",
    "tracking",
)
_NOT_SEARCHABLE = {
    "training.num_epochs": "it is the scheduler's max_t; fix it under training:",
    "model.max_atomic_number": "it must cover the data; fix it under model:",
    "training.init_from": "it is the model every trial starts from; fix it under training:",
}


# --------------------------------------------------------------------------- the spec


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
      tracking: MLflow / W&B settings (`dcmtune.train.tracking`).
      overrides: Dotted key -> value given on the command line (`dcmtune.sweep.overrides`),
        already applied; recorded with the experiment.
    """

    name: str
    description: str
    path: Path | None
    base: ExperimentConfig
    search: Mapping[str, Distribution]
    searcher: SearcherSpec
    scheduler: SchedulerSpec
    run: RunSpec
    rank: RankSpec
    debug: Mapping[str, Any]
    tracking: TrackingSpec = TrackingSpec()
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        _check_name("name", self.name)
        _check_points(self.searcher.points_to_evaluate, self.search)
        _check_run(self.run, self)
        _check_objectives(self)
        if self.searcher.sampler == "grid":
            _check_grid(self)

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
    def study_storage(self) -> str | None:
        """The Optuna storage, resolved (`dcmtune.sweep.study.resolve_storage`); None = in
        memory."""
        return study.resolve_storage(self.searcher.storage, self.experiment_dir)

    @property
    def num_epochs(self) -> int:
        return self.base.training.num_epochs

    def param_space(self) -> dict:
        """The Tune param space: flat dotted keys -> Tune domains (imports ray.tune)."""
        return {k: d.to_tune() for k, d in self.search.items()}

    def config_for(self, point: Mapping[str, Any], **extra: Any) -> ExperimentConfig:
        """`base` with a point of the space (dotted keys) and `extra` dotted overrides."""
        values = {k: plain(v) for k, v in {**point, **extra}.items()}
        return self.base.replace(**values) if values else self.base

    def debug_point(self) -> dict:
        """One point of the space (each distribution's centre) with the `debug:` overrides."""
        return {**{k: d.center() for k, d in self.search.items()}, **self.debug}

    def to_dict(self) -> dict:
        """A JSON-able record of the resolved spec (written into the experiment directory)."""
        return {
            "name": self.name,
            "description": self.description,
            "path": str(self.path) if self.path else None,
            "base": self.base.to_dict(),
            "search": {k: d.to_dict() for k, d in self.search.items()},
            "searcher": dataclasses.asdict(self.searcher),
            "scheduler": dataclasses.asdict(self.scheduler),
            "run": dataclasses.asdict(self.run),
            "rank": dataclasses.asdict(self.rank),
            "debug": dict(self.debug),
            "tracking": self.tracking.to_dict(),
            "overrides": dict(self.overrides),
        }

    def renamed(self, name: str) -> SweepSpec:
        """A copy under another experiment name."""
        _check_name("--name", name)
        return dataclasses.replace(self, name=name, base=self.base.replace(name=name))

    def replace_run(self, **changes: Any) -> SweepSpec:
        """A copy with `run:` fields changed (e.g. from command-line flags), re-validated."""
        return dataclasses.replace(self, run=dataclasses.replace(self.run, **changes))


# --------------------------------------------------------------------------- building


def find_spec(name: str | Path) -> Path:
    """The spec file `name`: a path, else a spec shipped with the package (`quick`,
    `quick.yaml` or `search_spaces/quick.yaml` work from any working directory)."""
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name if path.suffix in (".yaml", ".yml") else path.name + ".yaml"
    shipped = SHIPPED_SPECS / stem
    if (len(path.parts) == 1 or path.parent.name == "search_spaces") and shipped.is_file():
        log.info("using the shipped spec %s", shipped)
        return shipped
    known = sorted(p.stem for p in SHIPPED_SPECS.glob("*.yaml"))
    raise SpecError(f"{name}: spec file not found (shipped specs: {', '.join(known) or 'none'})")


def load_spec(
    path: str | Path, storage_path: str | Path | None = None, overrides: Sequence[Override] = ()
) -> SweepSpec:
    """Reads and validates a sweep spec file.

    Args:
      path: The YAML file. Relative paths inside it are relative to its directory.
      storage_path: Overrides run.storage_path (relative to the current directory).
      overrides: (dotted key, value) pairs set before validation (`dcmtune.sweep.overrides`).

    Raises:
      SpecError: one line naming the key, for any problem (file missing, YAML syntax, unknown
        keys, bad ranges or types, missing data files, ...).
    """
    path = Path(path)
    raw = read_spec(path)
    raw.setdefault("name", path.stem)
    return spec_from_dict(
        raw,
        base_dir=path.resolve().parent,
        path=path.resolve(),
        storage_path=storage_path,
        overrides=overrides,
    )


def read_spec(path: str | Path) -> dict:
    """A spec file as written: its sections as a dict, read with the strict YAML rules of every
    dcmtune file (`dcmtune._yaml`), not yet validated (`spec_from_dict` does that).

    Raises:
      SpecError: one line naming the file (missing, not YAML, empty, not a mapping).
    """
    path = Path(path)
    raw = read_yaml(path, SpecError, "spec file")
    if raw is None:
        raise SpecError(f"{path}: the spec file is empty")
    if not isinstance(raw, Mapping):
        raise SpecError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return dict(raw)


def spec_from_dict(
    raw: Mapping[str, Any],
    base_dir: str | Path = ".",
    path: Path | None = None,
    storage_path: str | Path | None = None,
    overrides: Sequence[Override] = (),
) -> SweepSpec:
    """Validates a spec given as a dict (as read from YAML); see `load_spec`."""
    if not overrides:
        return _spec_from_dict(raw, Path(base_dir).resolve(), path, storage_path)
    try:
        spec = _spec_from_dict(
            apply_overrides(raw, overrides), Path(base_dir).resolve(), path, storage_path
        )
    except SpecError as e:  # point at the flag when the problem is an overridden key
        key = next((k for k, _ in overrides if str(e).startswith(k)), None)
        raise SpecError(f"--set {e}" if key else str(e)) from None
    return dataclasses.replace(spec, overrides=MappingProxyType(dict(overrides)))


def _spec_from_dict(
    raw: Mapping[str, Any], base_dir: Path, path: Path | None, storage_path: str | Path | None
) -> SweepSpec:
    raw = _mapping("", raw, _TOP_LEVEL)
    name = _check_name("name", raw.get("name"))
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise SpecError(f"description: expected a string, got {description!r}")
    base, sections = _base_config(raw, name, description, base_dir)  # 1. fixed values
    search = _search_space(raw.get("search"), base, sections)  # 2. the space
    spec = SweepSpec(  # 3. searcher, scheduler, run, rank, debug, tracking
        name=name,
        description=description,
        path=path,
        base=base,
        search=MappingProxyType(search),
        searcher=SearcherSpec.from_dict(raw.get("searcher")),
        scheduler=SchedulerSpec.from_dict(raw.get("scheduler"), base.training.num_epochs),
        run=RunSpec.from_dict(raw.get("run"), base_dir, storage_path),
        rank=RankSpec.from_dict(raw.get("rank")),
        debug=MappingProxyType(_debug(raw.get("debug"))),
        tracking=parse_tracking(raw.get("tracking"), base_dir, error=SpecError),
    )
    try:
        spec.config_for(spec.debug_point())
    except ConfigError as e:
        raise SpecError(f"debug: the debug point is not a valid config ({e})") from None
    return spec


def _base_config(
    raw: Mapping[str, Any], name: str, description: str, base_dir: Path
) -> tuple[ExperimentConfig, dict]:
    """The ExperimentConfig every trial starts from, and the fixed values per section."""
    top = {"name": name, "description": description}
    top.update({key: raw[key] for key in ("notes", "random_seed") if key in raw})
    sections = {
        sec: _mapping(sec, raw.get(sec), [f.name for f in dataclasses.fields(cls)])
        for sec, cls in SECTIONS.items()
    }
    sections["data"]["data_files"] = _data_files(sections["data"].get("data_files", []), base_dir)
    if sections["training"].get("init_from") is not None:
        sections["training"]["init_from"] = _init_from(sections["training"]["init_from"], base_dir)
    # Sweeps keep the trial directories lean: the trainer's own periodic checkpoints are off
    # unless the spec asks for them (Tune keeps its own, see run.num_to_keep).
    sections["training"].setdefault("save_every_n_epochs", 0)
    try:
        base = ExperimentConfig.from_dict({**top, **sections})
    except ConfigError as e:
        raise SpecError(str(e)) from None
    if base.training.init_from is not None:  # the source exists and has this model
        try:
            finetune.open_source(base.training.init_from, base.model)
        except CheckpointError as e:
            raise SpecError(str(e)) from None
    return base, sections


def _init_from(value: Any, base_dir: Path) -> str:
    """training.init_from resolved: a path made absolute (relative ones from the spec's
    directory), or a shipped model's name kept as a name when no such path exists."""
    if not isinstance(value, str) or not value.strip():
        raise SpecError(
            f"training.init_from: expected a checkpoint path or model name, got {value!r}"
        )
    p = Path(value).expanduser()
    p = p if p.is_absolute() else base_dir / p
    return str(p.resolve()) if p.exists() else value


def _data_files(files: Any, base_dir: Path) -> list[str]:
    """data.data_files resolved: names of bundled sets ("organic") kept as names, paths made
    absolute (relative ones from the spec's directory), each an existing file."""
    if isinstance(files, str):
        files = [files]
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise SpecError(f"data.data_files: expected a list of .npz paths, got {files!r}")
    resolved = []
    for i, f in enumerate(files):
        if is_bundled_name(f):
            resolved.append(f)
            continue
        p = Path(f).expanduser()
        p = p if p.is_absolute() else base_dir / p
        if not p.is_file():
            raise SpecError(f"data.data_files[{i}]: file not found: {p}")
        resolved.append(str(p.resolve()))
    return resolved


def _search_space(
    search_raw: Any, base: ExperimentConfig, sections: dict
) -> dict[str, Distribution]:
    """The searched keys: each a config field that may be searched, with a distribution whose
    every end point is a valid value of the field."""
    if search_raw is None:
        return {}
    if not isinstance(search_raw, Mapping):
        raise SpecError(
            f"search: expected a mapping of dotted keys to distributions, got {search_raw!r}"
        )
    search: dict[str, Distribution] = {}
    for key, spec in search_raw.items():
        where = f"search.{key}"
        _check_searchable(key, sections)
        dist = parse_distribution(where, key, spec)
        for label, value in _endpoints(dist):
            try:
                base.replace(**{key: value})
            except ConfigError as e:
                raise SpecError(
                    f"{where}: {label} = {value!r} is not a valid value ({e})"
                ) from None
        search[key] = dist
    return search


def _check_searchable(key: Any, sections: dict) -> None:
    """A dotted config key that may be searched: a model./training. field (or random_seed), not
    fixed as well, not one of _NOT_SEARCHABLE."""
    if not isinstance(key, str):
        raise SpecError(
            f"search.{key}: expected a dotted config key such as training.learning_rate"
        )
    where = f"search.{key}"
    head, _, tail = key.partition(".")
    if head == "data":
        raise SpecError(
            f"{where}: data settings cannot be searched (every trial must see the same split)"
        )
    if key in _NOT_SEARCHABLE:
        raise SpecError(f"{where}: cannot be searched: {_NOT_SEARCHABLE[key]}")
    if not tail and key != "random_seed":
        raise SpecError(
            f"{where}: expected a dotted key model.<field> or training.<field> (or random_seed)"
        )
    try:
        field_kind(key)
    except SpecError as e:
        raise SpecError(f"search.{e}") from None
    if tail and head in sections and tail in sections[head]:
        raise SpecError(f"{where}: is both fixed (under {head}:) and searched; keep one")
    if head == "model" and sections["training"].get("init_from") is not None:
        raise SpecError(
            f"{where}: a sweep that fine-tunes (training.init_from) keeps the source's model; "
            "fix model: to it"
        )


def _debug(raw: Any) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise SpecError(f"debug: expected a mapping of dotted keys to values, got {raw!r}")
    for key in raw:
        if str(key).startswith("data."):
            raise SpecError(
                f"debug.{key}: the debug trial uses the sweep's data and split; set data "
                "under data:"
            )
        try:
            field_kind(str(key))
        except SpecError as e:
            raise SpecError(f"debug.{e}") from None
    return dict(raw)


def _check_name(key: str, name: Any) -> str:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise SpecError(
            f"{key}: expected letters, digits, '_', '-' or '.' (a directory name), got {name!r}"
        )
    return name


def _endpoints(d: Distribution):
    if d.kind == "choice":
        return [(f"option {i}", v) for i, v in enumerate(d.args)]
    return [("lo", d.args[0]), ("hi", d.args[1])]


def _check_points(points: tuple, search: Mapping[str, Distribution]) -> None:
    """Every point to evaluate gives a possible value for every searched key, and nothing
    else."""
    if points and not search:
        raise SpecError("searcher.points_to_evaluate: given, but nothing is searched")
    for i, p in enumerate(points):
        where = f"searcher.points_to_evaluate[{i}]"
        missing = sorted(set(search) - set(p))
        extra = sorted(set(p) - set(search))
        if extra:
            raise SpecError(
                f"{where}.{extra[0]}: not a searched key; expected one of {', '.join(search)}"
            )
        if missing:
            raise SpecError(f"{where}: missing a value for {missing[0]} (give every searched key)")
        for k, v in p.items():
            if not search[k].contains(v):
                raise SpecError(f"{where}.{k}: {v!r} is outside {search[k].to_dict()}")


def _check_run(run: RunSpec, spec: SweepSpec) -> None:
    """Checks of `run:` that depend on the rest of the spec."""
    searched_weights = [k for k in spec.search if k in LOSS_WEIGHTS]
    for key, metric in objective_keys(run):
        if metric.endswith("_loss") and searched_weights:
            raise SpecError(
                f"{key}: {metric} changes scale with the searched loss weight "
                f"{searched_weights[0]}, so trials cannot be compared; use "
                "valid_esp_rmse"
            )
    for i, point in enumerate(spec.searcher.points_to_evaluate):
        try:
            spec.config_for(point)
        except ConfigError as e:
            raise SpecError(f"searcher.points_to_evaluate[{i}]: not a valid config ({e})") from None


def objective_keys(run: RunSpec) -> list[tuple[str, str]]:
    """(spec key, metric) of each metric the sweep optimises."""
    if not run.objectives:
        return [("run.metric", run.metric)]
    return [(f"run.objectives[{i}].metric", o.metric) for i, o in enumerate(run.objectives)]


def _check_objectives(spec: SweepSpec) -> None:
    """Several objectives: each cost can vary over the space, the sampler handles several, and
    rank.select names costs that are objectives."""
    run, select = spec.run, spec.rank.select
    for key, metric in objective_keys(run)[1:]:
        if metric == "charges_per_atom" and "model.n_dcm" not in spec.search:
            raise SpecError(
                f"{key}: charges_per_atom is model.n_dcm, which is not searched; search "
                "model.n_dcm or drop this objective"
            )
        if metric in COST_METRICS and not any(k.startswith("model.") for k in spec.search):
            raise SpecError(
                f"{key}: {metric} depends only on model.* keys, none of which is searched; "
                "search one or drop this objective"
            )
    if run.objectives and spec.searcher.sampler == "cmaes":
        raise SpecError(
            "searcher.sampler: cmaes handles one objective; use tpe or nsga2 with run.objectives"
        )
    if select == "most_accurate":
        return
    if not run.costs:
        raise SpecError(
            f"rank.select: {_select_text(select)} chooses on cost, but no cost is an objective; "
            "add one to run.objectives (e.g. {metric: charges_per_atom, mode: min})"
        )
    bounds = select["max_cost"] if isinstance(select, Mapping) else None
    if isinstance(bounds, float) and len(run.costs) > 1:
        raise SpecError(
            f"rank.select.max_cost: {len(run.costs)} costs are objectives "
            f"({', '.join(run.costs)}); give a bound per cost, e.g. {{{run.costs[0]}: 2}}"
        )
    for name in bounds if isinstance(bounds, Mapping) else ():
        if name not in run.costs:
            raise SpecError(
                f"rank.select.max_cost.{name}: not an objective; expected one of "
                f"{', '.join(run.costs)}"
            )


def _select_text(select: Any) -> str:
    return select if isinstance(select, str) else "max_cost"


def _check_grid(spec: SweepSpec) -> None:
    """The grid sampler runs every combination of the searched choices once."""
    other = [k for k, d in spec.search.items() if d.kind != "choice"]
    if other or not spec.search:
        key = f"search.{other[0]}" if other else "search"
        raise SpecError(f"{key}: the grid sampler needs every searched key to be a choice")
    size = math.prod(len(d.args) for d in spec.search.values())
    if spec.run.num_samples != size:
        raise SpecError(
            f"run.num_samples: the grid has {size} combinations; expected num_samples = {size}, "
            f"got {spec.run.num_samples}"
        )
