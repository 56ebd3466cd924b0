"""Command-line changes to a spec's fixed keys: `--set KEY=VALUE` and `--data FILE...`.

An override names one fixed key of the spec by its dotted path and gives a YAML value read with
the file's rules (`300`, `1e-2`, `true`, `[16, 32]`, `null`):

  --set training.num_epochs=300      --set run.num_samples=64      --set run.resources.gpu=0
  --set scheduler.grace_period=10    --set data.split_seed=1       --set debug.training.num_epochs=2
  --set 'scheduler={name: fifo}'     (a whole section, replacing the file's)
  --data mine.npz other.npz          (replaces data.data_files; paths from the working directory)

Overrides are applied to the spec as read, before it is validated, so a bad one fails exactly as
the same value in the file would (one line naming the key, exit 2). The search space is not a
fixed key (edit the file's `search:`), nor is the name (use `--name`). The applied overrides are
kept in `SweepSpec.overrides` and in the experiment's record, and `--resume` refuses other ones.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dcmtune._yaml import read_yaml_value
from dcmtune.data.dataset import is_bundled_name
from dcmtune.sweep.space import SpecError

__all__ = ["Override", "parse_set", "data_override", "apply_overrides", "format_overrides"]

Override = tuple[str, Any]  # (dotted key, value)

# Keys with one value, and sections whose keys `--set SECTION.KEY=...` reaches.
_SCALARS = ("description", "notes", "random_seed")
_SECTIONS = (
    "data",
    "model",
    "training",
    "searcher",
    "scheduler",
    "run",
    "rank",
    "debug",
    "tracking",
)
_JSON_TYPES = (str, int, float, bool, type(None), list, dict)


def parse_set(item: str) -> Override:
    """`KEY=VALUE` from `--set`, the key checked to be a fixed key, the value read as YAML.

    Raises:
      SpecError: one line starting with `--set`.
    """
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SpecError(f"--set {item}: expected KEY=VALUE, e.g. training.num_epochs=300")
    _check_key(key)
    value = read_yaml_value(text, SpecError, f"--set {key}")
    if not _json_able(value):
        raise SpecError(
            f"--set {key}: expected a number, string, true/false, null, list or mapping, "
            f"got {text!r}"
        )
    return key, value


def data_override(files: Sequence[str]) -> Override:
    """`--data FILE...` as an override of data.data_files: names of bundled sets ("organic")
    kept, paths made absolute from the working directory, each an existing file."""
    if not files:
        raise SpecError("--data: expected at least one .npz file or bundled set name")
    resolved = []
    for f in files:
        if is_bundled_name(f):
            resolved.append(f)
            continue
        p = Path(f).expanduser().absolute()
        if not p.is_file():
            raise SpecError(f"--data: file not found: {f}")
        resolved.append(str(p.resolve()))
    return "data.data_files", resolved


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[Override]) -> dict:
    """A copy of the raw spec (as read from YAML) with the overrides set, in order."""
    out = copy.deepcopy(dict(raw))
    searched = out.get("search") if isinstance(out.get("search"), Mapping) else {}
    for key, value in overrides:
        _check_key(key)
        if key in searched:
            raise SpecError(
                f"--set {key}: this spec searches it (search.{key}); fix it in a copy of the "
                "spec, or search a narrower range there"
            )
        path = _path(key)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, Mapping):
                where = ".".join(path[: i + 1])
                raise SpecError(f"--set {key}: {where} is {child!r} in the spec, not a section")
            node[part] = dict(child)
            node = node[part]
        node[path[-1]] = copy.deepcopy(value)
    return out


def format_overrides(overrides: Mapping[str, Any]) -> str:
    """`key=value key=value` as typed (for messages and the dry run)."""
    return " ".join(f"{k}={_yaml_text(v)}" for k, v in overrides.items()) or "none"


def _check_key(key: str) -> None:
    head, _, rest = key.partition(".")
    if head == "search":
        raise SpecError(
            f"--set {key}: the search space is not a fixed key; edit the spec's search:"
        )
    if head == "name":
        raise SpecError(f"--set {key}: the experiment name is set with --name")
    if head in _SCALARS:
        if rest:
            raise SpecError(f"--set {key}: {head} is a single value; expected --set {head}=...")
        return
    if head not in _SECTIONS:
        known = ", ".join(_SCALARS + _SECTIONS)
        raise SpecError(f"--set {key}: unknown spec key {head!r}; expected one of {known}")
    if "" in rest.split(".") and rest:
        raise SpecError(f"--set {key}: expected {head}.<key>, e.g. training.num_epochs")


def _path(key: str) -> list[str]:
    """The nested keys of an override (debug: takes dotted config keys as its keys)."""
    head, _, rest = key.partition(".")
    if not rest:
        return [head]
    return [head, rest] if head == "debug" else [head, *rest.split(".")]


def _json_able(value: Any) -> bool:
    if isinstance(value, list):
        return all(_json_able(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_able(v) for k, v in value.items())
    return isinstance(value, _JSON_TYPES)


def _yaml_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_text(v) for v in value) + "]"
    return str(value)
