"""The trainer's data feed: an epoch's batches on the device, resident or streamed.

Which conformers form each update comes from `dcmtune.data.batches` (size buckets, the epoch's
update plan, drawn from `fold_in(rng, epoch)`: a resumed run repeats it exactly). Here they
reach the step: device-resident data (one padded array per bucket; the step gathers each
update's rows on the device) unless it exceeds DataConfig.device_data_budget_mb; then host
numpy arrays are streamed, the next batches built and copied to the device by a background
thread ahead of the step (`prefetch`). Both paths feed identical batches.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np

from dcmtune.data.batches import Bucket, bucket_batch, epoch_updates, make_batch
from dcmtune.data.dataset import ESPData

__all__ = [
    "TrainFeed",
    "eval_batches",
    "prefetch",
    "epoch_plan",
    "padded_updates",
    "PREFETCH_DEPTH",
]

# Batches built and copied ahead of the step when streaming.
PREFETCH_DEPTH = 2


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
    """

    def __init__(self, data: ESPData, buckets: Sequence[Bucket], resident: bool):
        self.data, self.buckets, self.resident = data, list(buckets), resident
        self.device = None
        if resident:
            self.device = [
                jax.device_put(make_batch(data, b.members, b.size + 1, b.num_atoms, b.num_grid))
                for b in self.buckets
            ]

    def inputs(
        self, updates: Sequence[tuple[int, np.ndarray]]
    ) -> Iterator[tuple[dict, np.ndarray]]:
        """(batch of k*b rows, (k, b) indices into it) per update."""
        if not updates:
            return
        k, b = updates[0][1].shape
        ident = np.arange(k * b, dtype=np.int32).reshape(k, b)
        if self.device is not None:  # resident: the step gathers the rows itself
            for i, pos in updates:
                yield self.device[i], np.where(pos < 0, self.buckets[i].size, pos).astype(np.int32)
            return

        def host():
            for i, pos in updates:
                batch = bucket_batch(self.data, self.buckets[i], pos)
                yield {key: v.reshape((-1,) + v.shape[2:]) for key, v in batch.items()}

        for batch in prefetch(host()):
            yield batch, ident


def eval_batches(
    data: ESPData, buckets: Sequence[Bucket], batch_size: int, resident: bool
) -> Callable[[], Iterable[dict]]:
    """Evaluation batches of `batch_size` molecules per bucket (the last of each padded with
    dummies): a callable returning an iterable of device batches (resident: made once)."""

    def host():
        for b in buckets:
            for s in range(0, b.size, batch_size):
                yield make_batch(
                    data, b.members[s : s + batch_size], batch_size, b.num_atoms, b.num_grid
                )

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
