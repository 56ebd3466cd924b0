"""Typed, validated configuration: one default per field, variants override it.

`ExperimentConfig` holds a `ModelConfig`, a `DataConfig` and a `TrainingConfig`. Every config is
validated when it is built (`__post_init__`), so a bad value fails at the boundary with the key,
the expected value and the given one. The resolved config is written as JSON next to every run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from dcmtune import _io

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "TrainingConfig",
    "ExperimentConfig",
    "SCHEDULE_TYPES",
    "flat_fields",
    "config_from_flat",
    "flat_dict",
]

SCHEDULE_TYPES = ("cosine", "exponential", "step")
# Parameter groups training.freeze may keep fixed (dcmtune.model.dcmnet.param_group).
FREEZABLE_GROUPS = ("embedding", "message_passing")
SPLIT_BY = ("molecule", "conformer")
BATCHING = ("bucketed", "padded")
DIPOLE_UNITS = ("debye", "e_bohr", "e_angstrom")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def _base_type(annotation: Any) -> tuple[type, bool, bool]:
    """Returns (element type, is_optional, is_list) for the annotations used in these configs."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0]
        origin = typing.get_origin(annotation)
    if origin is list:
        return typing.get_args(annotation)[0], optional, True
    return annotation, optional, False


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Checks `value` against `annotation`; ints are accepted for float fields."""
    kind, optional, is_list = _base_type(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: expected {kind.__name__}, got None")
    if is_list:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {kind.__name__}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, kind) for i, v in enumerate(value)]
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                raise ConfigError(f"{key}: expected an integer, got the float {value!r}")
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")  # internal


def _check(key: str, ok: bool, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def _fields(config: Any) -> tuple[dataclasses.Field, ...]:
    """The fields of a config class or instance (every config is a dataclass)."""
    assert dataclasses.is_dataclass(config), config
    return dataclasses.fields(config)


class _Config:
    """Mixin: type coercion at construction, dict/JSON round trip, strict `from_dict`."""

    _section = ""

    def _validate_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in _fields(self):
            key = f"{self._section}.{f.name}" if self._section else f.name
            object.__setattr__(self, f.name, _coerce(key, getattr(self, f.name), hints[f.name]))

    def _require(self, name: str, ok: bool, expected: str) -> None:
        """ConfigError naming `<section>.<name>` and its value unless `ok`."""
        key = f"{self._section}.{name}" if self._section else name
        _check(key, ok, expected, getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        assert dataclasses.is_dataclass(self) and not isinstance(self, type)
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        if not isinstance(d, Mapping):
            raise ConfigError(f"{cls._section or 'config'}: expected a mapping, got {d!r}")
        names = [f.name for f in _fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            where = f"{cls._section}." if cls._section else ""
            raise ConfigError(
                f"{where}{unknown[0]}: unknown key; expected one of {', '.join(names)}"
            )
        return cls(**dict(d))


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Config):
    """DCMNet hyper-parameters.

    Attributes:
      n_dcm: Distributed charges per atom.
      features: Feature channels per degree.
      max_degree: Highest spherical-harmonic degree in the message passing (>= 1, vectors are
        needed for the charge displacements).
      num_iterations: Message-passing steps.
      num_basis_functions: Radial basis functions (reciprocal Bernstein).
      cutoff: Neighbour cutoff in Angstrom.
      max_atomic_number: Largest atomic number the embedding knows.
      include_pseudotensors: Whether features carry both parities.
      d_max: Bound on each charge's displacement from its atom, in Angstrom.
    """

    _section = "model"
    n_dcm: int = 2
    features: int = 16
    max_degree: int = 2
    num_iterations: int = 2
    num_basis_functions: int = 16
    cutoff: float = 4.0
    max_atomic_number: int = 36
    include_pseudotensors: bool = False
    d_max: float = 0.5

    def __post_init__(self) -> None:
        self._validate_types()
        s = self._section
        _check(f"{s}.n_dcm", 1 <= self.n_dcm <= 64, "an integer in [1, 64]", self.n_dcm)
        _check(
            f"{s}.features", 1 <= self.features <= 4096, "an integer in [1, 4096]", self.features
        )
        _check(
            f"{s}.max_degree", 1 <= self.max_degree <= 6, "an integer in [1, 6]", self.max_degree
        )
        _check(
            f"{s}.num_iterations",
            1 <= self.num_iterations <= 16,
            "an integer in [1, 16]",
            self.num_iterations,
        )
        _check(
            f"{s}.num_basis_functions",
            1 <= self.num_basis_functions <= 256,
            "an integer in [1, 256]",
            self.num_basis_functions,
        )
        _check(
            f"{s}.cutoff",
            math.isfinite(self.cutoff) and self.cutoff > 0,
            "a positive cutoff in Angstrom",
            self.cutoff,
        )
        _check(
            f"{s}.max_atomic_number",
            1 <= self.max_atomic_number <= 118,
            "an integer in [1, 118]",
            self.max_atomic_number,
        )
        _check(
            f"{s}.d_max",
            math.isfinite(self.d_max) and self.d_max > 0,
            "a positive displacement bound in Angstrom",
            self.d_max,
        )


@dataclasses.dataclass(frozen=True)
class DataConfig(_Config):
    """Which data, and how it is split.

    Attributes:
      data_files: `.npz` files (DESIGN.md section 2); empty means the bundled demo set.
      split_by: "molecule" keeps all conformers of a `mol_id` in one split; "conformer" does not.
      valid_fraction, test_fraction: Split sizes as fractions of the conformers.
      num_train, num_valid, num_test: Split sizes as conformer counts (override the fractions;
        whole molecules are kept together, so a split may hold slightly more).
      train_molecules: Keep only this many of the training split's molecules (all their
        training conformers), chosen with split_seed in a nested order; valid and test stay
        those of the full split. For learning curves; None keeps them all.
      split_seed: Seed of the split, separate from the training seed.
      dipole_units: Units of `Dxyz` in the files ("e_bohr" for mmml-era files).
      batching: "bucketed" pads each training batch only to its size bucket (atoms and grid
        points; every conformer once per epoch), "padded" pads all to the data's largest and
        drops the remainder (the trainer before buckets; checkpoints without this key).
      max_buckets: At most this many bucket shapes (compiled steps); 1 = one shape.
      device_data_budget_mb: Above this size of the padded train + validation batches, data
        stays in host memory and batches are streamed to the device (dcmtune.train.feed).
        None (the default) follows the device: half of the memory XLA may use on it (a GPU
        trial's share, XLA_CLIENT_MEM_FRACTION), or 1024 MB where the device reports no limit
        (a CPU).
    """

    _section = "data"
    data_files: list[str] = dataclasses.field(default_factory=list)
    split_by: str = "molecule"
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    num_train: int | None = None
    num_valid: int | None = None
    num_test: int | None = None
    train_molecules: int | None = None
    split_seed: int = 0
    dipole_units: str = "debye"
    batching: str = "bucketed"
    max_buckets: int = 4
    device_data_budget_mb: float | None = None

    def __post_init__(self) -> None:
        self._validate_types()
        s = self._section
        _check(f"{s}.split_by", self.split_by in SPLIT_BY, " or ".join(SPLIT_BY), self.split_by)
        _check(
            f"{s}.dipole_units",
            self.dipole_units in DIPOLE_UNITS,
            ", ".join(DIPOLE_UNITS),
            self.dipole_units,
        )
        for name in ("valid_fraction", "test_fraction"):
            v = getattr(self, name)
            _check(f"{s}.{name}", 0.0 <= v < 1.0, "a fraction in [0, 1)", v)
        _check(
            f"{s}.valid_fraction",
            self.valid_fraction + self.test_fraction < 1.0,
            "valid_fraction + test_fraction < 1",
            self.valid_fraction + self.test_fraction,
        )
        for name in ("num_train", "num_valid", "num_test"):
            v = getattr(self, name)
            _check(f"{s}.{name}", v is None or v >= 0, "a non-negative count", v)
        _check(
            f"{s}.num_train",
            self.num_train is None or self.num_train >= 1,
            "at least 1 training conformer",
            self.num_train,
        )
        _check(
            f"{s}.train_molecules",
            self.train_molecules is None or self.train_molecules >= 1,
            "at least 1 training molecule, or None (all)",
            self.train_molecules,
        )
        _check(f"{s}.batching", self.batching in BATCHING, " or ".join(BATCHING), self.batching)
        _check(
            f"{s}.max_buckets",
            1 <= self.max_buckets <= 64,
            "an integer in [1, 64]",
            self.max_buckets,
        )
        _check(
            f"{s}.device_data_budget_mb",
            self.device_data_budget_mb is None
            or (math.isfinite(self.device_data_budget_mb) and self.device_data_budget_mb >= 0),
            "a size in MB >= 0, or null (follow the device's memory)",
            self.device_data_budget_mb,
        )


@dataclasses.dataclass(frozen=True)
class TrainingConfig(_Config):
    """Optimisation, schedule, loss weights and checkpointing.

    Attributes:
      num_epochs: Passes over the training split.
      batch_size: Molecules per micro-batch.
      gradient_accumulation_steps: Micro-batches per optimizer update (k); an update sees
        batch_size * k molecules.
      learning_rate: Peak learning rate (after warmup).
      esp_w, chg_w, dip_w: Loss weights of the ESP (Hartree/e)^2, monopole e^2 and dipole
        Debye^2 terms.
      use_grad_clip, grad_clip_norm: Global-norm clipping of the accumulated gradient.
      use_ema, ema_decay: Exponential moving average of the parameters, used for evaluation.
      use_lr_schedule, lr_schedule_type: "cosine", "exponential" or "step", with linear warmup.
      warmup_epochs: Linear warmup length in epochs (converted to optimizer updates); None
        (the default) adapts to the run: min(5, num_epochs // 10), so any num_epochs works.
        An explicit value must lie in [0, num_epochs).
      min_lr_factor: Floor of the schedule as a fraction of learning_rate.
      step_every_epochs, step_factor: The "step" schedule multiplies the learning rate by
        step_factor every step_every_epochs epochs.
      save_every_n_epochs: Periodic checkpoint interval (0 = none).
      keep_top_k_checkpoints: Periodic checkpoints kept, best by validation loss.
      report_test_metrics: Also evaluate the test split every epoch and report its metrics as
        test_* (for benchmark tables of learning curves, bench/learning_curves.py). Nothing is
        chosen on them: sweeps select and rank on valid_* metrics only.
      init_from: Fine-tuning: start from the weights (and EMA weights) of this checkpoint, run
        directory (its best checkpoint), sweep directory (its best_model) or shipped model name
        (`dcmtune.models.list_models()`; looked up only when no such path exists), with a
        fresh optimizer, schedule, step and epoch count. Its model section must be this run's.
        None: random initial weights.
      freeze: Parameter groups kept fixed while training: "embedding" (the atom-type
        embedding) and/or "message_passing" (the message passes and their residual MLPs);
        the charge and displacement heads always train (`dcmtune.model.dcmnet.param_group`).
    """

    _section = "training"
    num_epochs: int = 200
    batch_size: int = 8
    learning_rate: float = 1e-2
    esp_w: float = 1000.0
    chg_w: float = 0.01
    dip_w: float = 0.0
    use_grad_clip: bool = True
    grad_clip_norm: float = 2.0
    use_ema: bool = True
    ema_decay: float = 0.999
    gradient_accumulation_steps: int = 1
    use_lr_schedule: bool = True
    lr_schedule_type: str = "cosine"
    warmup_epochs: int | None = None
    min_lr_factor: float = 0.01
    step_every_epochs: int = 30
    step_factor: float = 0.5
    save_every_n_epochs: int = 10
    keep_top_k_checkpoints: int = 5
    report_test_metrics: bool = False
    init_from: str | None = None
    freeze: list[str] = dataclasses.field(default_factory=list)

    @property
    def effective_warmup_epochs(self) -> int:
        """The warmup in epochs: `warmup_epochs`, or min(5, num_epochs // 10) when it is None."""
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        return min(5, self.num_epochs // 10)

    def __post_init__(self) -> None:
        self._validate_types()
        need = self._require
        need("num_epochs", self.num_epochs >= 1, "at least 1")
        need("batch_size", self.batch_size >= 1, "at least 1")
        need("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, "at least 1")
        need("learning_rate", 0 < self.learning_rate < 1, "a value in (0, 1)")
        for name in ("esp_w", "chg_w", "dip_w"):
            v = getattr(self, name)
            need(name, math.isfinite(v) and v >= 0, "a finite weight >= 0")
        positive = self.esp_w + self.chg_w + self.dip_w > 0
        need("esp_w", positive, "at least one positive loss weight")
        need("grad_clip_norm", self.grad_clip_norm > 0, "a positive norm")
        need("ema_decay", 0 <= self.ema_decay < 1, "a decay in [0, 1)")
        self._check_schedule()
        need("save_every_n_epochs", self.save_every_n_epochs >= 0, "0 (off) or more")
        need("keep_top_k_checkpoints", self.keep_top_k_checkpoints >= 0, "0 or more")
        need("init_from", self.init_from is None or self.init_from.strip() != "", "a path or name")
        for i, group in enumerate(self.freeze):
            _check(
                f"{self._section}.freeze[{i}]",
                group in FREEZABLE_GROUPS,
                " or ".join(FREEZABLE_GROUPS),
                group,
            )
        need("freeze", len(set(self.freeze)) == len(self.freeze), "each group at most once")
        need("freeze", not self.freeze or self.init_from is not None, "[] without init_from")

    def _check_schedule(self) -> None:
        need = self._require
        need(
            "lr_schedule_type", self.lr_schedule_type in SCHEDULE_TYPES, " or ".join(SCHEDULE_TYPES)
        )
        warmup = self.warmup_epochs
        need(
            "warmup_epochs",
            warmup is None or 0 <= warmup < self.num_epochs,
            f"an integer in [0, num_epochs={self.num_epochs}) or None (automatic)",
        )
        need("min_lr_factor", 0 <= self.min_lr_factor <= 1, "a fraction in [0, 1]")
        need(
            "min_lr_factor",
            self.lr_schedule_type != "exponential" or self.min_lr_factor > 0,
            "a factor > 0 for the exponential schedule",
        )
        need("step_every_epochs", self.step_every_epochs >= 1, "at least 1")
        need("step_factor", 0 < self.step_factor <= 1, "a factor in (0, 1]")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig(_Config):
    """One training run: model, data, training, and bookkeeping.

    The run's directory is `<output_dir>/<name>`.
    """

    name: str = "dcmnet"
    description: str = ""
    random_seed: int = 42
    output_dir: str = "experiments"
    created_at: str = ""
    git_commit: str = ""
    notes: str = ""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)

    _SECTIONS: ClassVar[dict[str, type[_Config]]] = {
        "model": ModelConfig,
        "data": DataConfig,
        "training": TrainingConfig,
    }

    def __post_init__(self) -> None:
        for key in ("name", "description", "output_dir", "created_at", "git_commit", "notes"):
            _check(key, isinstance(getattr(self, key), str), "a string", getattr(self, key))
        _check(
            "random_seed",
            isinstance(self.random_seed, int) and not isinstance(self.random_seed, bool),
            "an integer",
            self.random_seed,
        )
        _check(
            "name",
            bool(self.name) and "/" not in self.name and self.name not in (".", ".."),
            "a non-empty name without '/'",
            self.name,
        )
        for key, cls in self._SECTIONS.items():
            _check(key, isinstance(getattr(self, key), cls), cls.__name__, getattr(self, key))

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExperimentConfig:
        if not isinstance(d, Mapping):
            raise ConfigError(f"config: expected a mapping, got {d!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown key; expected one of {', '.join(names)}")
        kwargs = dict(d)
        for key, section in cls._SECTIONS.items():
            if key in kwargs:
                kwargs[key] = section.from_dict(kwargs[key])
        return cls(**kwargs)

    def replace(self, **dotted: Any) -> ExperimentConfig:
        """Returns a copy with dotted keys overridden, e.g. `replace(**{"model.n_dcm": 3})`."""
        d = self.to_dict()
        for key, value in dotted.items():
            head, _, tail = key.partition(".")
            if tail:
                if head not in self._SECTIONS or not isinstance(d.get(head), dict):
                    raise ConfigError(f"{key}: unknown section {head!r}")
                d[head][tail] = value
            else:
                d[head] = value
        return self.from_dict(d)

    def save(self, path: str | Path) -> None:
        _io.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> ExperimentConfig:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_dict(d)


# --------------------------------------------------------------------------- flat keys


def flat_fields() -> dict[str, str]:
    """{field name: section} for every config field ("" for top-level ones)."""
    out = {
        f.name: ""
        for f in dataclasses.fields(ExperimentConfig)
        if f.name not in ("model", "data", "training")
    }
    for section, cls in (
        ("model", ModelConfig),
        ("data", DataConfig),
        ("training", TrainingConfig),
    ):
        out.update({f.name: section for f in dataclasses.fields(cls)})
    return out


def config_from_flat(base: ExperimentConfig | None = None, **kwargs) -> ExperimentConfig:
    """`base` (default: the defaults) with flat keyword overrides, e.g. n_dcm=3, esp_w=1e3."""
    sections = flat_fields()
    dotted = {}
    for key, value in kwargs.items():
        if key not in sections:
            raise ConfigError(f"{key}: unknown config field")
        dotted[f"{sections[key]}.{key}" if sections[key] else key] = value
    return (base or ExperimentConfig()).replace(**dotted)


def flat_dict(d: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
    """Nested mappings flattened to one level with joined keys (pure Python: the sweep driver
    uses it without flax).

    `{"model": {"n_dcm": 2}, "seed": 0}` -> `{"model.n_dcm": 2, "seed": 0}`: the dotted keys of
    sweep specs, Tune params and ranking columns. Non-mapping values (lists included) and empty
    mappings are kept as values.
    """
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update({f"{k}{sep}{kk}": vv for kk, vv in flat_dict(v, sep).items()})
        else:
            out[str(k)] = v
    return out
