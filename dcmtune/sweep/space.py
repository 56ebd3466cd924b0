"""The values of a sweep spec: the search space's distributions and the typed checks every
spec value goes through.

A searched hyper-parameter is a dotted config key with one distribution, written in YAML as a
one-key mapping:

  training.learning_rate: {loguniform: [1.0e-4, 1.0e-2]}  lo > 0, lo < hi
  training.chg_w:         {uniform: [0.0, 2.0]}            lo < hi
  training.esp_w:         {quniform: [500, 2000, 250]}     lo + k*q, hi included
  model.num_iterations:   {randint: [1, 3]}                lo..hi, hi INCLUDED
  model.features:         {choice: [16, 32, 64]}

Every problem raises `SpecError`, one line starting with the offending key. Nothing here
imports Ray; `Distribution.to_tune` imports `ray.tune` only when called.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from dcmtune.config import DataConfig, ExperimentConfig, ModelConfig, TrainingConfig

__all__ = ["SpecError", "Distribution", "DISTRIBUTIONS", "parse_distribution", "field_kind"]

DISTRIBUTIONS = ("loguniform", "uniform", "quniform", "randint", "choice")
# The config sections a dotted key may name.
SECTIONS = {"model": ModelConfig, "training": TrainingConfig, "data": DataConfig}


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


def _int(key: str, value: Any, lo: int | None = None, none_ok: bool = False) -> int | None:
    if value is None and none_ok:
        return None
    if not _is_int(value) or (lo is not None and value < lo):
        want = "an integer" + (f" >= {lo}" if lo is not None else "")
        raise SpecError(f"{key}: expected {want}, got {value!r}")
    return value


def _num(key: str, value: Any, gt: float | None = None, none_ok: bool = False) -> float | None:
    if value is None and none_ok:
        return None
    if not _is_num(value) or (gt is not None and value <= gt):
        want = "a number" + (f" > {gt}" if gt is not None else "")
        raise SpecError(f"{key}: expected {want}, got {value!r}")
    return float(value)


def _str(key: str, value: Any, choices: Sequence[str] | None = None) -> str:
    if not isinstance(value, str) or (choices is not None and value not in choices):
        want = " or ".join(choices) if choices else "a string"
        raise SpecError(f"{key}: expected {want}, got {value!r}")
    return value


def field_kind(dotted: str) -> type:
    """The element type (int, float, bool, str) of a dotted config field; SpecError if none."""
    head, _, tail = dotted.partition(".")
    if not tail:
        cls, name = ExperimentConfig, head
    elif head in SECTIONS:
        cls, name = SECTIONS[head], tail
    else:
        raise SpecError(
            f"{dotted}: unknown config section {head!r}; expected model., training. "
            "or a top-level field such as random_seed"
        )
    hints = typing.get_type_hints(cls)
    if name not in hints or name.startswith("_") or name in SECTIONS:
        fields = [f.name for f in dataclasses.fields(cls) if f.name not in SECTIONS]
        raise SpecError(
            f"{dotted}: unknown config field; expected one of "
            f"{', '.join((head + '.' if tail else '') + f for f in fields)}"
        )
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


def parse_distribution(key: str, dotted: str, spec: Any) -> Distribution:
    """Parses `{kind: args}` for config field `dotted`; `key` is its name in error messages."""
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise SpecError(
            f"{key}: expected one distribution written as {{kind: [args]}} with kind "
            f"one of {', '.join(DISTRIBUTIONS)}, got {spec!r}"
        )
    ((kind, args),) = spec.items()
    if kind not in DISTRIBUTIONS:
        raise SpecError(
            f"{key}: unknown distribution {kind!r}; expected one of {', '.join(DISTRIBUTIONS)}"
        )
    field = field_kind(dotted)
    if not isinstance(args, (list, tuple)):
        raise SpecError(f"{key}: {kind} expects a list, got {args!r}")
    if kind == "choice":
        return Distribution(dotted, kind, _choices(key, tuple(args), field), field is int)
    return Distribution(dotted, kind, _bounds(key, kind, tuple(args), field), field is int)


def _choices(key: str, args: tuple, field: type) -> tuple:
    """The options of a choice, each of the field's type, none repeated."""
    if not args:
        raise SpecError(f"{key}: choice needs at least one option, got []")
    for a in args:
        ok = {
            int: _is_int(a),
            float: _is_num(a),
            bool: isinstance(a, bool),
            str: isinstance(a, str),
        }.get(field, False)
        if not ok:
            raise SpecError(
                f"{key}: choice option {a!r} does not fit the field's type ({field.__name__})"
            )
    if len(set(args)) != len(args):
        raise SpecError(f"{key}: choice options repeat: {list(args)}")
    return args


def _bounds(key: str, kind: str, args: tuple, field: type) -> tuple:
    """(lo, hi) or (lo, hi, q) of a range distribution, checked against the field's type."""
    integer = field is int
    if field not in (int, float):
        raise SpecError(
            f"{key}: {kind} draws numbers but the field is a {field.__name__}; use choice"
        )
    n = 3 if kind == "quniform" else 2
    if len(args) != n or not all(_is_num(a) for a in args):
        form = "[lo, hi, q]" if n == 3 else "[lo, hi]"
        raise SpecError(f"{key}: {kind} expects {form} as finite numbers, got {list(args)}")
    lo, hi = args[0], args[1]
    if not lo < hi:
        raise SpecError(f"{key}: {kind} needs lo < hi, got lo = {lo}, hi = {hi}")
    if kind in ("loguniform", "uniform") and integer:
        raise SpecError(
            f"{key}: {kind} draws floats but the field is an integer; use randint, "
            "quniform with integer bounds, or choice"
        )
    if kind == "randint" and not integer:
        raise SpecError(
            f"{key}: randint draws integers but the field is a float; use uniform or quniform"
        )
    if kind == "randint" and not (_is_int(lo) and _is_int(hi)):
        raise SpecError(f"{key}: randint expects integer bounds, got {list(args)}")
    if kind == "loguniform" and lo <= 0:
        raise SpecError(f"{key}: loguniform needs lo > 0, got lo = {lo}")
    if kind == "quniform":
        return _quniform(key, args, integer)
    return args if integer else (float(lo), float(hi))


def _quniform(key: str, args: tuple, integer: bool) -> tuple:
    lo, hi, q = args
    if q <= 0:
        raise SpecError(f"{key}: quniform needs a step q > 0, got q = {q}")
    if integer and not all(_is_int(a) for a in args):
        raise SpecError(
            f"{key}: the field is an integer, so quniform needs integer lo, hi "
            f"and q, got {list(args)}"
        )
    steps = (hi - lo) / q
    if abs(steps - round(steps)) > 1e-9 * max(1.0, abs(steps)):
        raise SpecError(f"{key}: quniform needs hi - lo to be a multiple of q, got {list(args)}")
    return (lo, hi, q) if integer else (float(lo), float(hi), float(q))


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps True apart from 1 (YAML and Python both conflate them)."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b
