"""The process environment of training: JAX/XLA settings, the compile cache, GPU memory.

Plain Python: no JAX import, so a command (or the sweep driver, for its trials) sets them before
JAX is imported in a process. The settings must be in the environment before JAX is imported:
`python -m dcmtune.train` applies them to its own process, the sweep hands them to trial
processes through Ray's runtime environment (`dcmtune.sweep.resources.trial_env_vars`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

__all__ = [
    "compilation_cache_env",
    "gpu_memory_env",
    "apply_defaults",
    "use_compilation_cache",
    "MEMORY_FRACTION",
]

# Of a trial's GPU share, the fraction XLA may use: the rest is headroom for the CUDA context,
# cuDNN/cuBLAS workspaces and fragmentation, so packed trials do not run each other out of memory.
MEMORY_FRACTION = 0.9


def compilation_cache_env(cache_dir: str | Path) -> dict[str, str]:
    """A persistent compilation cache: every compile is stored, so a new process (a trial, a
    resumed run) skips the XLA compile of programs it has seen (the e3x model costs 5-20 s)."""
    return {
        "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def gpu_memory_env(gpu_share: float) -> dict[str, str]:
    """No preallocation, and a memory cap of MEMORY_FRACTION x the share of one GPU."""
    share = min(gpu_share, 1.0)
    return {
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{MEMORY_FRACTION * share:.3f}",
    }


def apply_defaults(env: dict[str, str], environ: MutableMapping[str, str] = os.environ) -> None:
    """Sets each variable of `env` that the user has not set already."""
    for key, value in env.items():
        environ.setdefault(key, value)


def use_compilation_cache(cache_dir: str | Path) -> None:
    """Turns on the persistent compilation cache in this process, unless the user chose one.

    Works before JAX is imported (through the environment) and after it (through jax.config;
    the cache is opened at the first compile).
    """
    env = compilation_cache_env(cache_dir)
    if "jax" not in sys.modules:
        apply_defaults(env)
        return
    import jax

    if jax.config.values.get("jax_compilation_cache_dir") is None:
        jax.config.update("jax_compilation_cache_dir", env["JAX_COMPILATION_CACHE_DIR"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
