"""Jitted programs whose traces are kept across processes (serialized `jax.export` modules).

A trial process with a warm XLA compilation cache still spends most of its start tracing: the
e3x model's jaxpr is rebuilt for every program (with ~115 small constant computations, each one
an XLA executable to load) and lowered to StableHLO, only for XLA's cache to supply the
executable. `cached_jit(fun, static_argnames=...)` is `jax.jit(fun, ...)` that, when a
persistent compilation cache directory is configured (`jax_compilation_cache_dir`, which
`dcmtune.train.environment` sets for trials and for `python -m dcmtune.train`), keeps each
program it traces as serialized StableHLO in `<cache dir>/dcmtune-programs/` and, in later
processes, calls the deserialized program instead of tracing `fun` (its executable still comes from
XLA's cache).

A program's file name is a hash of everything its trace depends on: the function's name, its
static arguments, the tree structure, shapes and dtypes of the other arguments, the backend,
the JAX flags that change traces, the versions of jax, jaxlib, flax, optax and e3x, and the
source of the dcmtune package. Anything that changes a trace therefore traces anew; a stale
file is never read for a different program. Without a cache directory, for arguments that
cannot be exported, or when a file cannot be read back (a warning), it is exactly `jax.jit`.
Files are written atomically (several trial processes may share the directory).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import optax
from jax import export

from dcmtune import _io
from dcmtune.provenance import versions

__all__ = ["cached_jit", "program_dir", "serializable", "SUBDIR"]

log = logging.getLogger(__name__)

SUBDIR = "dcmtune-programs"
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "e3x")
_TRACE_FLAGS = (
    "jax_enable_x64",
    "jax_default_matmul_precision",
    "jax_numpy_rank_promotion",
    "jax_threefry_partitionable",
    "jax_default_prng_impl",
)


def program_dir() -> Path | None:
    """<persistent compilation cache dir>/dcmtune-programs, or None without a cache dir."""
    cache = jax.config.values.get("jax_compilation_cache_dir")
    return Path(cache) / SUBDIR if cache else None


@functools.cache
def _environment_key() -> str:
    """Versions, trace-changing flags and dcmtune's source: what every key shares."""
    versions_ = versions(_PACKAGES, missing="?")
    source = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]  # dcmtune/
    for path in sorted(package.rglob("*.py")):
        source.update(path.relative_to(package).as_posix().encode())
        source.update(path.read_bytes())
    flags = {f: str(getattr(jax.config, f, None)) for f in _TRACE_FLAGS}
    return json.dumps([versions_, flags, source.hexdigest()], sort_keys=True)


# Pytree classes of dcmtune that appear in the programs' arguments and results, by their
# serialized name (`serializable`): dataclasses without static fields.
_DATACLASSES: dict[str, type] = {}


def serializable(name: str) -> Callable[[type], type]:
    """Class decorator: the class (a pytree dataclass without static fields) may appear in the
    arguments and results of kept programs, serialized under `name`."""

    def register(cls: type) -> type:
        _DATACLASSES[name] = cls
        return cls

    return register


@functools.cache
def _register_pytrees() -> None:
    """Registers optax's states and the `serializable` classes with jax.export (once)."""
    named = [
        (optax.EmptyState, "optax.EmptyState"),
        (optax.ScaleByAdamState, "optax.ScaleByAdamState"),
        (optax.ScaleByScheduleState, "optax.ScaleByScheduleState"),
    ]
    for cls, name in named:
        export.register_namedtuple_serialization(cls, serialized_name=name)
    for name, cls in _DATACLASSES.items():
        # Dataclass pytrees without static fields: empty auxiliary data.
        export.register_pytree_node_serialization(
            cls,
            serialized_name=name,
            serialize_auxdata=lambda aux: b"",
            deserialize_auxdata=lambda data: (),
        )


def _leaf_signature(x: Any) -> tuple:
    """What a trace depends on of one argument leaf: shape, dtype, weak typing (arrays), or
    the Python type (scalars). Hashable and cheap (called on every call: dtype objects, not
    their names)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return (type(x),)
    return (x.shape, dtype, getattr(x, "weak_type", False))


class _CachedJit:
    """`jax.jit(fun, static_argnames)` whose traces persist (see the module docstring)."""

    def __init__(self, fun: Callable, static_argnames: Sequence[str]):
        self._fun = fun
        self._static = tuple(static_argnames)
        self._signature = inspect.signature(fun)
        self._jit = jax.jit(fun, static_argnames=self._static)
        self._name = f"{fun.__module__}.{fun.__qualname__}"
        self._calls: dict[tuple, Callable] = {}  # in-process: signature -> program
        functools.update_wrapper(self, fun)

    def __call__(self, *args, **kwargs):
        directory = program_dir()
        if directory is None:
            return self._jit(*args, **kwargs)
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        static = {k: v for k, v in bound.arguments.items() if k in self._static}
        dynamic = tuple(v for k, v in bound.arguments.items() if k not in self._static)
        leaves, tree = jax.tree.flatten(dynamic)
        fast = (tuple(static.items()), tree, tuple(_leaf_signature(x) for x in leaves))
        program = self._calls.get(fast)
        if program is None:
            program = self._calls[fast] = self._program(directory, static, dynamic, tree, fast)
        return program(*dynamic)

    def _program(
        self, directory: Path, static: dict, dynamic: tuple, tree, fast: tuple
    ) -> Callable:
        key = hashlib.sha256(
            json.dumps(
                [
                    self._name,
                    repr(fast[0]),
                    str(tree),
                    [repr(sig) for sig in fast[2]],
                    jax.default_backend(),
                    _environment_key(),
                ]
            ).encode()
        ).hexdigest()[:32]
        path = directory / f"{self._fun.__name__}-{key}.bin"
        _register_pytrees()
        exported = _read(path, tree)
        if exported is None:
            try:
                data = export.export(self._jit)(*dynamic, **static).serialize()
                _io.write_bytes(path, bytes(data))
            except Exception as e:  # never fatal: plain jit traces again (and raises a real error)
                log.info(
                    "%s: not kept across processes (%s: %s); plain jit",
                    self._name,
                    type(e).__name__,
                    e,
                )
                return functools.partial(self._jit, **static)
            # The program read back, as later processes get it (its results are not weakly
            # typed, so the programs they feed have the same keys in every process).
            exported = export.deserialize(bytearray(data))
        return jax.jit(exported.call)

    def _cache_size(self) -> int:
        """Programs held in this process: traced by jit, and deserialized or exported."""
        jitted: Any = self._jit  # jax's private, untyped count of traced programs
        return jitted._cache_size() + len(self._calls)


def _read(path: Path, tree) -> export.Exported | None:
    """The program in `path` if it exists, deserializes and takes arguments of `tree`."""
    if not path.is_file():
        return None
    try:
        exported = export.deserialize(bytearray(path.read_bytes()))
    except Exception as e:  # a damaged or foreign file: trace again and replace it
        log.warning("%s: unreadable program (%s: %s); tracing again", path, type(e).__name__, e)
        return None
    expected: Any = jax.tree.structure((tree.unflatten([0] * tree.num_leaves), {}))
    if exported.in_tree != expected:
        log.warning("%s: program for other arguments; tracing again", path)
        return None
    return exported


def cached_jit(fun: Callable | None = None, *, static_argnames: Sequence[str] = ()):
    """`jax.jit` with traces kept across processes; usable as a decorator with arguments."""
    if fun is None:
        return functools.partial(cached_jit, static_argnames=static_argnames)
    return _CachedJit(fun, static_argnames)
