"""Generating ESP data on an existing Ray cluster: one task per molecule.

`connect(address, cpus_per_task)` joins a running cluster (`ray.init(address=...)`; it never
starts one) and returns a `dcmtune.qm.generator.Runner` for `generate_dataset`. The runner
submits one Ray task per molecule (`num_cpus=cpus_per_task`, `max_retries`: a molecule whose
worker process or node is lost is run again), largest first, and hands each result to the
generator as it finishes (`ray.wait`), which keeps it on disk (`dcmtune.qm.parts`) and moves the
progress bar. A task sets OpenMP/BLAS threads and `pyscf.lib.num_threads` to the CPUs Ray gave
it before any PySCF work (the variables also reach the worker process through the task's
runtime environment, before NumPy loads BLAS). Only Ray core is used.

The Ray wing is the sweep's (no Ray below it); `python -m dcmtune.data generate --address`
reaches this module through the data command, which may cross the wing order.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence

from dcmtune.cli import one_line
from dcmtune.qm.pyscf_esp import compute_molecule
from dcmtune.qm.specs import GenerationSettings, MoleculeSpec, QMError, TaskLost

__all__ = ["MAX_RETRIES", "TASK_PREFIX", "RayRunner", "connect", "compute_on_ray"]

log = logging.getLogger(__name__)

# Runs of one molecule's task after a lost worker or node (Ray's max_retries). A Python
# exception in the task (an SCF that did not converge) is not retried.
MAX_RETRIES = 3
# The task's name (and its worker's process title, "ray::<name>"): this prefix + mol_id.
TASK_PREFIX = "dcmtune-generate:"
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_PROBE_TIMEOUT_S = 10.0


def _task_cpus() -> int:
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(round(cpus)))


def compute_on_ray(spec: MoleculeSpec, settings: GenerationSettings) -> dict:
    """One molecule inside a Ray task: threads from the task's CPUs, then `compute_molecule`."""
    n = _task_cpus()
    os.environ.update({k: str(n) for k in _THREAD_VARS})
    from pyscf import lib

    lib.num_threads(n)
    return compute_molecule(spec, settings)


def _probe(address: str) -> None:
    """Raises QMError unless something listens at HOST:PORT (a quick, clear refusal before
    `ray.init`, which would retry an unreachable address for a long time)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise QMError(f"--address {address!r}: expected auto or HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=_PROBE_TIMEOUT_S):
            pass
    except OSError as e:
        raise QMError(
            f"--address {address}: no Ray cluster reachable there ({one_line(e)}); start one "
            "with `ray start --head` or give the head's GCS address"
        ) from None


class RayRunner:
    """A `Runner` on a connected Ray cluster (made by `connect`); `close()` disconnects."""

    def __init__(self, address: str, cpus_per_task: int, max_retries: int = MAX_RETRIES):
        self.address, self.cpus_per_task, self.max_retries = address, cpus_per_task, max_retries

    def __call__(
        self,
        specs: Sequence[MoleculeSpec],
        indices: Sequence[int],
        settings: GenerationSettings,
        done: Callable[[int, dict], None],
    ) -> dict:
        import ray

        threads = {k: str(self.cpus_per_task) for k in _THREAD_VARS}
        task = ray.remote(compute_on_ray)
        options = dict(
            num_cpus=self.cpus_per_task,
            max_retries=self.max_retries,
            retry_exceptions=False,
            runtime_env={"env_vars": threads},
        )
        # Largest molecules first keeps every CPU busy until the end.
        order = sorted(indices, key=lambda i: -int(specs[i].numbers.sum()))
        refs = {
            task.options(name=f"{TASK_PREFIX}{specs[i].name}", **options).remote(
                specs[i], settings
            ): i
            for i in order
        }
        pending = list(refs)
        try:
            while pending:
                finished, pending = ray.wait(pending, num_returns=1)
                for ref in finished:
                    done(refs[ref], ray.get(ref))
        except BaseException as e:
            for ref in pending:
                ray.cancel(ref, force=True)
            cause = getattr(e, "cause", None)
            if isinstance(e, ray.exceptions.RayTaskError) and isinstance(cause, Exception):
                raise cause from None  # the task's own error (e.g. SCFError), without Ray's dump
            if isinstance(e, ray.exceptions.RayError):  # lost beyond its retries: one line
                raise TaskLost(
                    f"a molecule's task was lost after {self.max_retries} retries "
                    f"({type(e).__name__}); finished molecules are kept: run the same command again"
                ) from None
            raise
        return {
            "workers": None,
            "ray": {
                "address": self.address,
                "cpus_per_task": self.cpus_per_task,
                "tasks": len(order),
                "max_retries": self.max_retries,
                "retried": "not counted: Ray reruns a task whose worker or node was lost "
                "(max_retries); the results do not depend on it",
            },
        }

    def close(self) -> None:
        import ray

        ray.shutdown()


def connect(address: str, cpus_per_task: int = 1) -> RayRunner:
    """Joins the running Ray cluster at `address` ("auto" or HOST:PORT); never starts one.

    Raises:
      QMError: a bad `cpus_per_task`, no cluster reachable at `address`, or a cluster with
        fewer CPUs than one task asks for.
    """
    if cpus_per_task < 1:
        raise QMError(f"--cpus-per-task: expected >= 1, got {cpus_per_task}")
    if address != "auto":
        _probe(address)
    import ray

    try:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise QMError(f"--address {address}: cannot join the Ray cluster ({one_line(e)})") from None
    cpus = ray.cluster_resources().get("CPU", 0.0)
    if cpus < cpus_per_task:
        ray.shutdown()
        raise QMError(
            f"--cpus-per-task {cpus_per_task}: the cluster at {address} has {cpus:g} CPUs"
        )
    log.info("joined the Ray cluster at %s (%g CPUs)", address, cpus)
    return RayRunner(address, cpus_per_task)
