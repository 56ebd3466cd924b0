"""Training and evaluation batches: size buckets, the epoch's update plan, and data placement.

Size buckets (DataConfig.batching = "bucketed", the default): training conformers are grouped by
atom count into at most `max_buckets` buckets (`dcmtune.data.bucket_bounds` picks the bounds
that minimise the padded work, `group_by_bucket` assigns conformers: the helper prediction
uses), each padded only to its own (atoms, grid points). Message passing costs ~A(A-1) per
molecule and the ESP ~A*G, so a 12-atom bucket no longer pads 3-atom molecules. The step
compiles once per bucket shape. An update's k micro-batches come from one bucket (one shape);
a bucket of n conformers is spread evenly over ceil(n / (b*k)) updates, the slots left over
filled with masked dummy molecules (mol_mask False), so every training conformer is used
exactly once per epoch and every update's loss is the mean over its real molecules. The order
of conformers within buckets and of updates across buckets is drawn from fold_in(rng, epoch):
a resumed run repeats it exactly.

The padded path (batching = "padded") is the trainer before buckets: one shape (the data's
largest), floor(n / (b*k)) updates over a permutation of all conformers, the remainder dropped.

Placement: the data of an epoch is device-resident (one padded array per bucket, each update's
rows gathered on the device) unless it exceeds DataConfig.device_data_budget_mb; then host
numpy arrays are streamed, the next batches built and copied to the device by a background
thread ahead of the step (`prefetch`). Both paths feed identical batches.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
from typing import Callable, Iterable, Iterator, Optional, Sequence

import jax
import numpy as np

from dcmtune.data import ESPData, bucket_bounds, group_by_bucket, make_batch

__all__ = ["Bucket", "slot_cost", "plan_buckets", "plan_from_bounds", "padded_bucket",
           "assign_buckets", "epoch_updates", "padded_updates", "num_updates", "batch_bytes",
           "TrainFeed", "eval_batches", "prefetch", "describe", "MIN_BUCKET_UPDATES",
           "COMPILE_COST", "PREFETCH_DEPTH"]

log = logging.getLogger(__name__)

# A bucket must fill this many updates: a smaller one wastes a large share on its padded last
# update.
MIN_BUCKET_UPDATES = 2
# What compiling one more bucket shape costs, in `slot_cost` units (a unit takes ~11 us of a
# default-model step on 2 CPU cores, so ~5.5 s; the step compiles in 5-30 s there, depending on
# load): a bucket is only added where the run's saved work pays for its compile, so short runs
# (the demo sweep's 12 epochs) keep one shape and long ones get several.
COMPILE_COST = 5e5
# Batches built and copied ahead of the step when streaming.
PREFETCH_DEPTH = 2


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Conformers padded to one shape.

    Attributes:
      num_atoms: Padded atoms (A_bucket).
      num_grid: Padded grid points (G_bucket).
      members: Indices of the bucket's conformers in the dataset, ascending.
    """

    num_atoms: int
    num_grid: int
    members: np.ndarray

    @property
    def size(self) -> int:
        return int(len(self.members))


def slot_cost(num_atoms: int, num_grid: int, n_dcm: int = 2) -> float:
    """Relative work of one padded molecule slot: message passing over all A(A-1) pairs, the
    per-atom layers (~4 pairs' worth each) and the ESP of A*n_dcm charges at G points (~1e-3
    pairs' worth each; measured on 2 CPU cores with the default model, bench/throughput.py)."""
    return num_atoms * (num_atoms - 1) + 4.0 * num_atoms + 1e-3 * n_dcm * num_atoms * num_grid


def _buckets_of(data: ESPData, idx: np.ndarray, bounds: Sequence[int]) -> list[Bucket]:
    """Conformers `idx` of `data` grouped by the atom `bounds`, each bucket's grid trimmed to
    its members' largest."""
    out = []
    for num_atoms, pos in group_by_bucket(data.N[idx], bounds=bounds).items():
        members = np.sort(idx[pos])
        out.append(Bucket(num_atoms, int(max(1, data.n_grid[members].max())), members))
    return out


def plan_buckets(data: ESPData, batch_size: int, accumulation: int, max_buckets: int,
                 n_dcm: int = 2, num_epochs: Optional[int] = None) -> list[Bucket]:
    """Training buckets of `data`: at most `max_buckets`, each filling at least
    MIN_BUCKET_UPDATES updates of batch_size * accumulation molecules, as many as pay for
    their compiles over `num_epochs` epochs (None: compiles are free, e.g. evaluation)."""
    slots = batch_size * accumulation
    per_epoch = COMPILE_COST / num_epochs if num_epochs else 0.0
    bounds = bucket_bounds(data.N, data.n_grid, lambda a, g: slot_cost(a, g, n_dcm), slots,
                           max_buckets, min_members=MIN_BUCKET_UPDATES * slots,
                           bucket_cost=per_epoch)
    return plan_from_bounds(data, bounds)


def plan_from_bounds(data: ESPData, bounds: Sequence[int]) -> list[Bucket]:
    """The buckets of all of `data` for atom `bounds` (e.g. those a checkpoint recorded)."""
    return _buckets_of(data, np.arange(data.num_conformers), bounds)


def padded_bucket(data: ESPData) -> list[Bucket]:
    """All of `data` as one bucket at its full padding (the padded path)."""
    return [Bucket(data.num_atoms, data.num_grid, np.arange(data.num_conformers))]


def assign_buckets(data: ESPData, like: Sequence[Bucket]) -> list[Bucket]:
    """Buckets for other conformers (validation, test) with the atom bounds of `like` (plus
    one more for molecules larger than all of them); grids trimmed per bucket."""
    bounds = sorted({b.num_atoms for b in like})
    if data.num_conformers and int(data.N.max()) > bounds[-1]:
        bounds.append(int(data.N.max()))
    return _buckets_of(data, np.arange(data.num_conformers), bounds)


def num_updates(buckets: Sequence[Bucket], slots: int) -> int:
    """Updates of one bucketed epoch: ceil(size / slots) per bucket."""
    return sum(math.ceil(b.size / slots) for b in buckets)


def epoch_updates(buckets: Sequence[Bucket], batch_size: int, accumulation: int, key
                  ) -> list[tuple[int, np.ndarray]]:
    """The epoch's updates: (bucket index, (k, b) positions in the bucket's members; -1 =
    a masked dummy molecule), in a random order drawn from the PRNG `key`.

    Every member appears exactly once. A bucket of n conformers gives u = ceil(n / (b*k))
    updates of n // u or n // u + 1 real molecules (real ones first, row-major), shuffled
    within the bucket; the updates of all buckets are then shuffled together.
    """
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).astype(np.uint32))
    slots = batch_size * accumulation
    out = []
    for i, bucket in enumerate(buckets):
        n = bucket.size
        u = math.ceil(n / slots)
        perm = rng.permutation(n)
        sizes = n // u + (np.arange(u) < n % u)
        start = 0
        for m in sizes:
            pos = np.full(slots, -1, np.int64)
            pos[:m] = perm[start:start + m]
            start += m
            out.append((i, pos.reshape(accumulation, batch_size).astype(np.int32)))
    order = rng.permutation(len(out))
    return [out[j] for j in order]


def padded_updates(n: int, batch_size: int, accumulation: int, key
                   ) -> list[tuple[int, np.ndarray]]:
    """The padded path's updates: floor(n / (b*k)) over a permutation of all n conformers
    (jax.random.permutation of `key`, as before buckets), the remainder dropped."""
    upe = n // (batch_size * accumulation)
    perm = np.asarray(jax.random.permutation(key, n))
    idx = perm[: upe * accumulation * batch_size].reshape(upe, accumulation, batch_size)
    return [(0, idx[u].astype(np.int32)) for u in range(upe)]


def batch_bytes(data: ESPData, buckets: Sequence[Bucket]) -> int:
    """Bytes of `buckets` of `data` as padded batches (what device residence costs)."""
    total = 0
    for b in buckets:
        row = make_batch(data, b.members[:1], 1, b.num_atoms, b.num_grid)
        total += sum(v.nbytes for v in row.values()) * (b.size + 1)
    return int(total)


def _bucket_batch(data: ESPData, bucket: Bucket, pos: np.ndarray) -> dict[str, np.ndarray]:
    """Host batch (k, b, ...) of positions `pos` (k, b) in `bucket` (-1 = dummy; real ones
    first in row-major order)."""
    k, b = pos.shape
    flat = pos.reshape(-1)
    real = flat[flat >= 0]
    batch = make_batch(data, bucket.members[real], k * b, bucket.num_atoms, bucket.num_grid)
    return {key: v.reshape((k, b) + v.shape[1:]) for key, v in batch.items()}


class TrainFeed:
    """The device batches of training updates from `buckets` of `data`.

    `inputs` yields (device arrays, (k, b) row indices into them) for `dcmtune.train._update`,
    which gathers the rows inside the step. Resident: each bucket's conformers are one padded
    device array (plus a dummy row at index `size`), so no batch is built or copied per update.
    Streaming: the update's k*b rows are built on the host and copied to the device
    PREFETCH_DEPTH updates ahead by a background thread (indices arange(k*b)). Both give the
    step the same batch values, so both train to the same results (one compiled program per
    bucket shape and path).
    """

    def __init__(self, data: ESPData, buckets: Sequence[Bucket], resident: bool):
        self.data, self.buckets, self.resident = data, list(buckets), resident
        self.device = None
        if resident:
            self.device = [jax.device_put(make_batch(data, b.members, b.size + 1, b.num_atoms,
                                                     b.num_grid)) for b in self.buckets]

    def inputs(self, updates: Sequence[tuple[int, np.ndarray]]
               ) -> Iterator[tuple[dict, np.ndarray]]:
        """(batch of k*b rows, (k, b) indices into it) per update."""
        if not updates:
            return
        k, b = updates[0][1].shape
        ident = np.arange(k * b, dtype=np.int32).reshape(k, b)
        if self.resident:  # the step gathers the rows itself: one program per update
            for i, pos in updates:
                yield self.device[i], np.where(pos < 0, self.buckets[i].size, pos).astype(np.int32)
            return

        def host():
            for i, pos in updates:
                batch = _bucket_batch(self.data, self.buckets[i], pos)
                yield {key: v.reshape((-1,) + v.shape[2:]) for key, v in batch.items()}

        for batch in prefetch(host()):
            yield batch, ident


def eval_batches(data: ESPData, buckets: Sequence[Bucket], batch_size: int, resident: bool
                 ) -> Callable[[], Iterable[dict]]:
    """Evaluation batches of `batch_size` molecules per bucket (the last of each padded with
    dummies): a callable returning an iterable of device batches (resident: made once)."""
    def host():
        for b in buckets:
            for s in range(0, b.size, batch_size):
                yield make_batch(data, b.members[s:s + batch_size], batch_size, b.num_atoms,
                                 b.num_grid)

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


def describe(buckets: Sequence[Bucket]) -> str:
    """One line: the buckets' shapes and sizes, e.g. "5x798 (100), 8x1200 (70)"."""
    return ", ".join(f"{b.num_atoms}x{b.num_grid} ({b.size})" for b in buckets)
