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
    "MEM_FRACTION_VAR",
    "DEPRECATED_MEM_FRACTION_VAR",
]

# Of a trial's GPU share, the fraction XLA may use: the rest is headroom for the CUDA context,
# cuDNN/cuBLAS workspaces and fragmentation, so packed trials do not run each other out of memory.
MEMORY_FRACTION = 0.9
# jaxlib 0.10's name of XLA's memory fraction, and the deprecated one (both set is an error).
MEM_FRACTION_VAR = "XLA_CLIENT_MEM_FRACTION"
DEPRECATED_MEM_FRACTION_VAR = "XLA_PYTHON_CLIENT_MEM_FRACTION"


def compilation_cache_env(cache_dir: str | Path) -> dict[str, str]:
    """A persistent compilation cache: every compile is stored, so a new process (a trial, a
    resumed run) skips the XLA compile of programs it has seen (the e3x model costs 5-20 s)."""
    return {
        "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def gpu_memory_env(gpu_share: float) -> dict[str, str]:
    """No preallocation, and a memory cap of MEMORY_FRACTION x the share of one GPU.

    The cap is XLA_CLIENT_MEM_FRACTION, the name jaxlib 0.10 reads. Its deprecated name
    XLA_PYTHON_CLIENT_MEM_FRACTION is blanked (jaxlib treats an empty value as unset): a value
    inherited from the shell or the Ray node would otherwise be an error next to the new one.
    """
    share = min(gpu_share, 1.0)
    return {
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        MEM_FRACTION_VAR: f"{MEMORY_FRACTION * share:.3f}",
        DEPRECATED_MEM_FRACTION_VAR: "",
    }


def apply_defaults(env: dict[str, str], environ: MutableMapping[str, str] = os.environ) -> None:
    """Sets each variable of `env` that the user has not set already (a memory fraction the
    user set under either name counts for both)."""
    user_fraction = any(environ.get(k) for k in (MEM_FRACTION_VAR, DEPRECATED_MEM_FRACTION_VAR))
    for key, value in env.items():
        if key in (MEM_FRACTION_VAR, DEPRECATED_MEM_FRACTION_VAR) and user_fraction:
            continue
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
