"""What one sweep trial asks Ray for, decided on the driver without starting Ray or JAX.

`resolve_resources` turns a spec's `run.resources` into CPUs and a GPU share for the cluster at
hand (`gpu: auto` takes a GPU share where the cluster has GPUs and makes CPU trials where it has
none); `trial_env_vars` gives the trial processes their XLA settings (no preallocation, a memory
fraction of 0.9 x the share, one persistent compile cache; `dcmtune.train.environment`);
`check_trial_backend` stops a GPU trial whose JAX fell back to the CPU.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dcmtune.sweep.spec import ResourceSpec, SpecError
from dcmtune.train.environment import compilation_cache_env, gpu_memory_env

__all__ = [
    "TrialResources",
    "check_trial_backend",
    "detect_local_gpus",
    "resolve_resources",
    "trial_env_vars",
]


@dataclasses.dataclass(frozen=True)
class TrialResources:
    """What one trial asks Ray for: CPUs and a GPU share (0 = a CPU trial)."""

    cpu: float
    gpu: float

    def as_tune(self) -> dict[str, float]:
        return {"cpu": self.cpu, "gpu": self.gpu}


def detect_local_gpus(
    environ: Mapping[str, str] = os.environ,
    which: Callable[[str], str | None] = shutil.which,
    run: Callable[..., Any] = subprocess.run,
) -> int:
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
            raise SpecError(
                f"run.resources.gpu: {gpu:g} GPU per trial requested, but the cluster "
                "has no GPUs; use gpu: auto or gpu: 0"
            )
    if gpu > n_gpu and gpu > 0:
        raise SpecError(f"{key}: {gpu:g} GPUs per trial requested, but the cluster has {n_gpu:g}")
    if n_cpu and requested.cpu > n_cpu:
        raise SpecError(
            f"run.resources.cpu: {requested.cpu:g} CPUs per trial requested, but the "
            f"cluster has {n_cpu:g}"
        )
    return TrialResources(cpu=float(requested.cpu), gpu=float(gpu))


def check_trial_backend(gpu_share: float, backend: str) -> None:
    """Refuses a trial that asked for a GPU share but whose JAX runs on `backend` "cpu" (a
    jaxlib without CUDA, or JAX_PLATFORMS=cpu): it would train on the CPU, silently.

    Raises:
      SpecError: one line naming run.resources.gpu.
    """
    if gpu_share > 0 and backend == "cpu":
        raise SpecError(
            f"run.resources.gpu: the trial asked for {gpu_share:g} GPU but JAX fell back to "
            "the CPU (jaxlib without CUDA, or JAX_PLATFORMS=cpu); install jax[cuda12] or use "
            "gpu: 0"
        )


def trial_env_vars(resources: TrialResources, jax_cache_dir: str | Path) -> dict[str, str]:
    """Environment variables of a trial process (Ray's runtime_env "env_vars").

    - XLA_PYTHON_CLIENT_PREALLOCATE=false: XLA grows its pool on demand instead of grabbing 75%
      of the device at start, so trials sharing a GPU can start at all.
    - XLA_CLIENT_MEM_FRACTION = 0.9 x the trial's share of one GPU: the cap of that pool (the
      name jaxlib 0.10 reads; the deprecated XLA_PYTHON_CLIENT_MEM_FRACTION is blanked, as
      both set is an error).
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
