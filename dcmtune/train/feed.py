"""The trainer's data feed: an epoch's batches on the device, resident or streamed.

Which conformers form each update comes from `dcmtune.data.batches` (size buckets, the epoch's
update plan, drawn from `fold_in(rng, epoch)`: a resumed run repeats it exactly). Here they
reach the step: device-resident data (one padded array per bucket; the step gathers each
update's rows on the device) unless it exceeds DataConfig.device_data_budget_mb; then host
numpy arrays are streamed, the next batches built and copied to the device by a background
thread ahead of the step (`prefetch`). Both paths feed identical batches.

Steps sized for the cache (CPU): an update's b*k molecules are differentiated in scan steps of
`step_molecules` molecules each (the same update: every loss term is divided by the counts of
the whole update, `dcmtune.train.step.accumulated_grads`), few enough that one step's per-edge
features stay in the core's L2 cache. e3x's tensor product materialises, per edge, the outer
product of filter and features in an edge-minor layout; its transposing loop re-reads both
(E, (L+1)^2, F) inputs 81 * F times with a stride of one edge row, at L2 speed while they fit
and at memory speed beyond: the default model's time per edge was 3.3x higher with 2,500 edges
per step than with 1,250 (bench/RESULTS.md "Drug-sized molecules"). Evaluation batches follow
the same rule. Accelerators keep the whole micro-batch (their caches are not the limit; launches
are).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np

from dcmtune.config import ModelConfig
from dcmtune.data.batches import Bucket, bucket_batch, bucket_rows, epoch_updates
from dcmtune.data.dataset import ESPData

__all__ = [
    "TrainFeed",
    "eval_batches",
    "prefetch",
    "epoch_plan",
    "padded_updates",
    "step_molecules",
    "PREFETCH_DEPTH",
    "CPU_STEP_BYTES",
    "device_memory_bytes",
    "data_budget_mb",
    "DEVICE_DATA_SHARE",
    "HOST_DATA_BUDGET_MB",
]

# Batches built and copied ahead of the step when streaming.
PREFETCH_DEPTH = 2
# Of the memory XLA may use on the device, the share resident data may take (the rest holds
# parameters, optimizer state and each step's activations); and the budget where the device
# reports no limit (a CPU: host memory).
DEVICE_DATA_SHARE = 0.5
HOST_DATA_BUDGET_MB = 1024.0
# Bytes of per-edge features (float32) one scan step holds at most on a CPU: 1,024 edges of
# the default model (16 features x 9 components), two such inputs in half of a 2 MiB L2.
CPU_STEP_BYTES = 1024 * 16 * 9 * 4


def device_memory_bytes() -> int | None:
    """The memory XLA may use on the default device (its allocator's `bytes_limit`: on a GPU
    the trial's share, XLA_CLIENT_MEM_FRACTION), or None where it reports none (a CPU)."""
    stats = jax.devices()[0].memory_stats()
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def data_budget_mb(configured: float | None) -> float:
    """The device-data budget: `configured` (data.device_data_budget_mb), or with None
    DEVICE_DATA_SHARE of `device_memory_bytes`, HOST_DATA_BUDGET_MB without a device limit."""
    if configured is not None:
        return float(configured)
    limit = device_memory_bytes()
    return HOST_DATA_BUDGET_MB if limit is None else DEVICE_DATA_SHARE * limit / 2**20


def step_molecules(
    bucket: Bucket, batch_size: int, model: ModelConfig, backend: str | None = None
) -> int:
    """Molecules per scan step (or evaluation batch) of `bucket`: on a CPU the largest divisor
    of `batch_size` whose edges' features fit CPU_STEP_BYTES (at least 1); elsewhere
    `batch_size`.

    The edges of a molecule are its pair slots (`bucket.num_pairs`), or all A(A-1) pairs.
    """
    if (backend or jax.default_backend()) != "cpu":
        return batch_size
    A = bucket.num_atoms
    pairs = bucket.num_pairs if bucket.num_pairs is not None else A * (A - 1)
    parity = 2 if model.include_pseudotensors else 1
    row = 4 * model.features * (model.max_degree + 1) ** 2 * parity  # bytes per edge
    fit = CPU_STEP_BYTES // (row * max(pairs, 1))
    return max(d for d in range(1, batch_size + 1) if batch_size % d == 0 and d <= max(fit, 1))


def epoch_plan(
    buckets: Sequence[Bucket], batch_size: int, accumulation: int, key
) -> list[tuple[int, np.ndarray]]:
    """`data.batches.epoch_updates` drawn from the JAX PRNG `key` (fold_in(rng, epoch))."""
    return epoch_updates(buckets, batch_size, accumulation, jax.random.key_data(key))


def padded_updates(n: int, batch_size: int, accumulation: int, key) -> list[tuple[int, np.ndarray]]:
    """The padded path's updates: floor(n / (b*k)) over a permutation of all n conformers
    (jax.random.permutation of `key`, as before buckets), the remainder dropped."""
    upe = n // (batch_size * accumulation)
    perm = np.asarray(jax.random.permutation(key, n))
    idx = perm[: upe * accumulation * batch_size].reshape(upe, accumulation, batch_size)
    return [(0, idx[u].astype(np.int32)) for u in range(upe)]


class TrainFeed:
    """The device batches of training updates from `buckets` of `data`.

    `inputs` yields (device arrays, (k, b) row indices into them) for `dcmtune.train.step.update`,
    which gathers the rows inside the step. Resident: each bucket's conformers are one padded
    device array (plus a dummy row at index `size`), so no batch is built or copied per update.
    Streaming: the update's k*b rows are built on the host and copied to the device
    PREFETCH_DEPTH updates ahead by a background thread (indices arange(k*b)). Both give the
    step the same batch values, so both train to the same results (one compiled program per
    bucket shape and path).

    `steps` (default b): molecules per scan step of each bucket (`step_molecules`); an
    update's (k, b) rows are fed as (k * b / m, m).
    """

    def __init__(
        self,
        data: ESPData,
        buckets: Sequence[Bucket],
        resident: bool,
        steps: Sequence[int] | None = None,
    ):
        self.data, self.buckets, self.resident = data, list(buckets), resident
        self.steps = None if steps is None else list(steps)
        self.device = None
        if resident:
            self.device = [
                jax.device_put(bucket_rows(data, b, b.members, b.size + 1)) for b in self.buckets
            ]

    def _rows(self, i: int, rows: np.ndarray) -> np.ndarray:
        """Row indices (k, b) of an update of bucket `i` as (k * b / m, m) scan steps."""
        m = rows.shape[1] if self.steps is None else self.steps[i]
        return rows.reshape(-1, m)

    def inputs(
        self, updates: Sequence[tuple[int, np.ndarray]]
    ) -> Iterator[tuple[dict, np.ndarray]]:
        """(batch of k*b rows, (k * b / m, m) indices into it) per update."""
        if not updates:
            return
        k, b = updates[0][1].shape
        ident = np.arange(k * b, dtype=np.int32).reshape(k, b)
        if self.device is not None:  # resident: the step gathers the rows itself
            for i, pos in updates:
                rows = np.where(pos < 0, self.buckets[i].size, pos).astype(np.int32)
                yield self.device[i], self._rows(i, rows)
            return

        def host():
            for i, pos in updates:
                batch = bucket_batch(self.data, self.buckets[i], pos)
                yield {key: v.reshape((-1,) + v.shape[2:]) for key, v in batch.items()}

        for batch, (i, _) in zip(prefetch(host()), updates, strict=False):
            yield batch, self._rows(i, ident)


def eval_batches(
    data: ESPData, buckets: Sequence[Bucket], batch_size: int | Sequence[int], resident: bool
) -> Callable[[], Iterable[dict]]:
    """Evaluation batches of `batch_size` molecules per bucket (one size, or one per bucket;
    the last of each padded with dummies): a callable returning an iterable of device batches
    (resident: made once)."""
    sizes = [batch_size] * len(buckets) if isinstance(batch_size, int) else list(batch_size)

    def host():
        for b, n in zip(buckets, sizes, strict=True):
            for s in range(0, b.size, n):
                yield bucket_rows(data, b, b.members[s : s + n], n)

    if resident:
        on_device = [jax.device_put(x) for x in host()]
        return lambda: on_device
    return lambda: prefetch(host())


def prefetch(batches: Iterable[dict], depth: int = PREFETCH_DEPTH) -> Iterator[dict]:
    """Device copies of host `batches`, made by a background thread `depth` batches ahead.

    The thread stops when the consumer finishes or abandons the iterator; an exception in it
    is raised in the consumer.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for b in batches:
                if not put(jax.device_put(b)):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer
            put(e)

    thread = threading.Thread(target=work, name="dcmtune-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)
