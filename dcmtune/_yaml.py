"""Strict YAML reading for every file a user hands dcmtune (sweep specs, tracking settings).

`read_yaml(path, error)` returns the document or raises `error` (a ValueError subclass) with one
line naming the file: not found, not UTF-8, unreadable, a syntax error with its line, or a
duplicated key (PyYAML would silently keep the last one). 1e-4 reads as a float (YAML 1.1
wants 1.0e-4).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

__all__ = ["read_yaml", "read_yaml_value"]


class _DuplicateKey(yaml.YAMLError):
    pass


class _Loader(yaml.SafeLoader):
    """SafeLoader with the two fixes above."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise _DuplicateKey(f"{key}: duplicated key (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | Path, error: type[ValueError], what: str = "YAML file") -> Any:
    """The YAML document in `path` (None for an empty file).

    Raises:
      error: one line naming `path` (or, for a duplicated key, the key and its line).
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        return yaml.load(path.read_bytes().decode("utf-8"), Loader=_Loader)
    except UnicodeDecodeError as e:
        raise error(
            f"{path}: not a text (UTF-8) YAML file (byte {e.start}); expected a {what}"
        ) from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror})") from None
    except _DuplicateKey as e:
        raise error(str(e)) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise error(f"{path}: not valid YAML{where} ({problem})") from None


def read_yaml_value(text: str, error: type[ValueError], what: str) -> Any:
    """One YAML value given on a command line (`300`, `1e-2`, `true`, `[16, 32]`, `null`), read
    with the same rules as a file.

    Raises:
      error: one line naming `what` and the text.
    """
    try:
        return yaml.load(text, Loader=_Loader)
    except _DuplicateKey as e:
        raise error(f"{what}: {e}") from None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise error(f"{what}: {text!r} is not a YAML value ({problem})") from None
