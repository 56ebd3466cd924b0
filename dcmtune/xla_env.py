"""What a trial process gets: JAX/XLA settings, the compile cache and GPU resources.

Plain Python: no JAX and no Ray import, so the sweep driver decides resources before Ray starts.
The settings must be in the environment before JAX is imported in a process: the CLIs apply them
to their own process, the sweep hands them to trial processes through Ray's runtime environment.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, MutableMapping, Optional

from dcmtune.search_space import ResourceSpec, SpecError

__all__ = ["compilation_cache_env", "gpu_memory_env", "apply_defaults", "use_compilation_cache",
           "MEMORY_FRACTION", "TrialResources", "detect_local_gpus", "resolve_resources",
           "trial_env_vars"]

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
    return {"XLA_PYTHON_CLIENT_PREALLOCATE": "false",
            "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{MEMORY_FRACTION * share:.3f}"}


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

    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", env["JAX_COMPILATION_CACHE_DIR"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@dataclasses.dataclass(frozen=True)
class TrialResources:
    """What one trial asks Ray for: CPUs and a GPU share (0 = a CPU trial)."""

    cpu: float
    gpu: float

    def as_tune(self) -> dict[str, float]:
        return {"cpu": self.cpu, "gpu": self.gpu}


def detect_local_gpus(environ: Mapping[str, str] = os.environ,
                      which: Callable[[str], Optional[str]] = shutil.which,
                      run: Callable[..., Any] = subprocess.run) -> int:
    """GPUs a local Ray would see, without starting Ray or JAX.

    Follows Ray's rule: CUDA_VISIBLE_DEVICES, when set, is the list of usable GPUs (empty = none);
    otherwise `nvidia-smi -L` counts them. No nvidia-smi means no GPUs.
    """
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        items = [v for v in visible.split(",") if v.strip() and v.strip() != "-1"]
        return len(items)
    exe = which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = run([exe, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return 0
    if out.returncode != 0:
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def resolve_resources(requested: ResourceSpec, cluster: Mapping[str, float]) -> TrialResources:
    """The resources of one trial on a cluster with `cluster` resources (ray.cluster_resources()).

    `gpu: auto` takes `gpu_share` of a GPU where the cluster has GPUs and makes CPU trials where it
    has none. An explicit GPU request on a cluster without (enough) GPUs is refused.

    Raises:
      SpecError: naming run.resources.gpu or run.resources.cpu.
    """
    n_gpu = float(cluster.get("GPU", 0.0))
    n_cpu = float(cluster.get("CPU", 0.0))
    if requested.gpu == "auto":
        gpu = requested.gpu_share if n_gpu > 0 else 0.0
        key = "run.resources.gpu_share"
    else:
        gpu = float(requested.gpu)
        key = "run.resources.gpu"
        if gpu > 0 and n_gpu == 0:
            raise SpecError(f"run.resources.gpu: {gpu:g} GPU per trial requested, but the cluster "
                            "has no GPUs; use gpu: auto or gpu: 0")
    if gpu > n_gpu and gpu > 0:
        raise SpecError(f"{key}: {gpu:g} GPUs per trial requested, but the cluster has "
                        f"{n_gpu:g}")
    if n_cpu and requested.cpu > n_cpu:
        raise SpecError(f"run.resources.cpu: {requested.cpu:g} CPUs per trial requested, but the "
                        f"cluster has {n_cpu:g}")
    return TrialResources(cpu=float(requested.cpu), gpu=float(gpu))


def trial_env_vars(resources: TrialResources, jax_cache_dir: str | Path) -> dict[str, str]:
    """Environment variables of a trial process (Ray's runtime_env "env_vars").

    - XLA_PYTHON_CLIENT_PREALLOCATE=false: XLA grows its pool on demand instead of grabbing 75%
      of the device at start, so trials sharing a GPU can start at all.
    - XLA_PYTHON_CLIENT_MEM_FRACTION = 0.9 x the trial's share of one GPU: the cap of that pool.
    - JAX_PLATFORMS=cpu for CPU trials (no CUDA probing); unset for GPU trials, so JAX uses the
      GPU(s) Ray assigned. CUDA_VISIBLE_DEVICES is never set here: Ray sets it per trial.
    - A persistent compilation cache shared by all trials (every compile is cached: trials
      differing only in traced hyper-parameters then skip the 10-20 s e3x compile).
    """
    env = compilation_cache_env(jax_cache_dir)
    if resources.gpu > 0:
        env.update(gpu_memory_env(resources.gpu))
    else:
        env["JAX_PLATFORMS"] = "cpu"
    return env
