"""Fixed-shape batches and size buckets: how conformers of mixed sizes are padded and grouped.

A batch is a dict of arrays with fixed shapes (B, A, ...) and masks (`make_batch`), so one
compiled step serves a run. Molecules of mixed sizes are grouped into size buckets, each padded
only to its own atoms and grid points: powers of two for prediction (`size_bucket`,
`group_by_bucket`), bounds fitted to the data for training (`bucket_bounds`, `plan_buckets`).
Message passing costs ~A(A-1) per molecule and the ESP ~A*G, so a 12-atom bucket no longer pads
3-atom molecules. With a cutoff, each bucket also fixes its pair slots per molecule
(`Bucket.num_pairs`, its members' largest count of neighbour pairs within the cutoff,
`dcmtune.data.neighbors`), and its batches carry the pairs. The atom bounds are planned with the
all-pairs cost as before the pairs: a run keeps the buckets (and programs) it had, each
computing at most the edges it did, never more (planning with pair counts would merge some
small-molecule buckets whose split no longer pays for its compile, and trade epoch time for
compile time).

Training (DataConfig.batching = "bucketed", the default): an update's k micro-batches come from
one bucket (one shape); a bucket of n conformers is spread evenly over ceil(n / (b*k)) updates,
the slots left over filled with masked dummy molecules (mol_mask False), so every training
conformer is used exactly once per epoch and every update's loss is the mean over its real
molecules (`epoch_updates`). The padded path (batching = "padded") is the trainer before
buckets: one shape, the data's largest. Where the batches live (device or streamed) is the
trainer's business (`dcmtune.train.feed`). Plain numpy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from dcmtune.data.dataset import ESPData
from dcmtune.data.neighbors import neighbor_pairs, pair_capacity, pair_counts

__all__ = [
    "make_batch",
    "size_bucket",
    "group_by_bucket",
    "bucket_bounds",
    "Bucket",
    "slot_cost",
    "plan_buckets",
    "plan_from_bounds",
    "padded_bucket",
    "assign_buckets",
    "num_updates",
    "epoch_updates",
    "batch_bytes",
    "bucket_batch",
    "bucket_rows",
    "describe",
    "MIN_BUCKET_UPDATES",
    "COMPILE_COST",
]

# A bucket must fill this many updates: a smaller one wastes a large share on its padded last
# update.
MIN_BUCKET_UPDATES = 2
# What compiling one more bucket shape costs, in `slot_cost` units (a unit takes ~11 us of a
# default-model step on 2 CPU cores, so ~5.5 s; the step compiles in 5-30 s there, depending on
# load): a bucket is only added where the run's saved work pays for its compile, so short runs
# (the demo sweep's 12 epochs) keep one shape and long ones get several.
COMPILE_COST = 5e5


def make_batch(
    data: ESPData,
    idx: np.ndarray,
    batch_size: int | None = None,
    num_atoms: int | None = None,
    num_grid: int | None = None,
    cutoff: float | None = None,
    num_pairs: int | None = None,
) -> dict[str, np.ndarray]:
    """A fixed-shape batch of conformers `idx`, padded with masked dummy molecules to
    `batch_size` (default len(idx)), and to `num_atoms` atoms and `num_grid` grid points
    (default: the data's; a size bucket's may be smaller, never below the real counts of `idx`).
    With a `cutoff` (Angstrom), also each molecule's neighbour pairs in `num_pairs` slots
    (default: the batch's largest count, rounded up by `pair_capacity`).

    Returns a dict: R (B, A, 3), Z (B, A), atom_mask (B, A), esp (B, G), grid (B, G, 3),
    grid_mask (B, G), mono (B, A), has_mono (B,), dipole (B, 3), has_dipole (B,), com (B, 3),
    Q (B,), mol_mask (B,); with a cutoff, pairs (B, K, 2) (`dcmtune.data.neighbors`).
    """
    idx = np.asarray(idx, dtype=np.int64)
    B = len(idx) if batch_size is None else batch_size
    if len(idx) > B:
        raise ValueError(f"make_batch: {len(idx)} conformers do not fit batch_size {B}")
    pad = B - len(idx)
    A = data.num_atoms if num_atoms is None else int(num_atoms)
    G = data.num_grid if num_grid is None else int(num_grid)
    if len(idx) and (data.N[idx].max() > A or data.n_grid[idx].max() > G):
        raise ValueError(
            f"make_batch: conformers of up to {data.N[idx].max()} atoms and "
            f"{data.n_grid[idx].max()} grid points do not fit ({A}, {G})"
        )

    def take(a, axis_size=None):
        return _take(a, idx, pad, axis_size)

    mol_mask = np.arange(B) < len(idx)
    n_grid = take(data.n_grid)
    Z, R = take(data.Z, A), take(data.R, A)
    batch = {
        "R": R,
        "Z": Z,
        "atom_mask": Z > 0,
        "esp": take(data.esp, G),
        "grid": take(data.grid, G),
        "grid_mask": np.arange(G)[None, :] < n_grid[:, None],
        "mono": take(data.mono, A) if data.mono is not None else np.zeros((B, A), np.float32),
        "has_mono": mol_mask & (data.mono is not None),
        "dipole": take(data.dipole) if data.dipole is not None else np.zeros((B, 3), np.float32),
        "has_dipole": mol_mask & (data.dipole is not None),
        "com": take(data.com),
        "Q": take(data.Q),
        "mol_mask": mol_mask,
    }
    if cutoff is not None:
        batch["pairs"] = _pairs(R, Z > 0, cutoff, num_pairs)
    return batch


def _take(a: np.ndarray, idx: np.ndarray, pad: int, axis_size: int | None) -> np.ndarray:
    """Rows `idx` of `a` and `pad` zero rows; axis 1 (atoms or grid points) trimmed or
    zero-padded to `axis_size` when given."""
    a = a[idx]
    if axis_size is not None:
        a = a[:, :axis_size]
        if a.shape[1] < axis_size:
            width = [(0, 0)] * a.ndim
            width[1] = (0, axis_size - a.shape[1])
            a = np.pad(a, width)
    return np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) if pad else a


def _pairs(R: np.ndarray, real: np.ndarray, cutoff: float, num_pairs: int | None) -> np.ndarray:
    """(B, K, 2) neighbour pairs of a batch; K = `num_pairs`, or its largest count rounded up."""
    if num_pairs is None:
        num_pairs = pair_capacity(int(pair_counts(R, real, cutoff).max(initial=0)))
    return neighbor_pairs(R, real, cutoff, num_pairs)


# --------------------------------------------------------------------------- size buckets


def size_bucket(n, minimum: int = 8, bounds: Sequence[int] | None = None):
    """The padded size for `n` atoms (or grid points, or molecules): the smallest power of two
    >= max(n, minimum), or with `bounds` (ascending sizes, e.g. from `bucket_bounds`) the
    smallest bound >= n. Works on ints and on integer arrays (elementwise).

    Shared by prediction and training: every shape a jitted step sees is a bucket, so a mix of
    sizes costs one compiled program per bucket, not one per size. Powers of two (prediction:
    shapes stable across calls) never more than double the work; training knows its data and
    fits its bounds to it (`bucket_bounds`).

    Raises:
      ValueError: with `bounds`, for a size above the largest bound.
    """
    if bounds is not None:
        b = np.asarray(bounds, dtype=np.int64)
        n_arr = np.asarray(n, dtype=np.int64)
        if n_arr.size and n_arr.max() > b[-1]:
            raise ValueError(
                f"size_bucket: size {int(n_arr.max())} above the largest bound {int(b[-1])}"
            )
        out = b[np.searchsorted(b, n_arr, side="left")]
        return int(out) if out.ndim == 0 else out
    m = np.maximum(np.asarray(n, dtype=np.int64), max(int(minimum), 1))
    out = np.left_shift(1, np.ceil(np.log2(m)).astype(np.int64))
    out = np.where(out < m, out * 2, out)  # guard against log2 rounding at exact powers
    return int(out) if out.ndim == 0 else out


def group_by_bucket(
    sizes: Sequence[int], minimum: int = 8, bounds: Sequence[int] | None = None
) -> dict[int, np.ndarray]:
    """Indices of `sizes` grouped by `size_bucket`: {bucket: indices in input order}, buckets
    ascending. Example: sizes (3, 12, 5, 20) -> {8: [0, 2], 16: [1], 32: [3]}; with
    bounds (5, 20) -> {5: [0, 2], 20: [1, 3]}."""
    buckets = size_bucket(np.asarray(sizes, dtype=np.int64).reshape(-1), minimum, bounds)
    return {int(b): np.flatnonzero(buckets == b) for b in np.unique(buckets)}


def bucket_bounds(
    num_atoms: Sequence[int] | np.ndarray,
    num_grid: Sequence[int] | np.ndarray,
    cost,
    slots: int,
    max_buckets: int,
    min_members: int = 1,
    bucket_cost: float = 0.0,
) -> list[int]:
    """Atom-count bounds of at most `max_buckets` size buckets that minimise the padded work.

    A bucket of n conformers runs ceil(n / slots) updates of `slots` molecules, each padded to
    the bucket's largest atom count and grid size, costing `cost(atoms, grid points)` per
    molecule; each bucket also costs `bucket_cost` (its compile, in the same units). Exact
    dynamic programming over the distinct atom counts; every bucket holds at least
    `min_members` conformers.

    Args:
      num_atoms, num_grid: (M,) real atoms and grid points per conformer.
      cost: cost(atoms, grid) -> float, the work of one padded molecule slot.

    Returns:
      Ascending atom bounds; the last is max(num_atoms).
    """
    n_atoms = np.asarray(num_atoms, dtype=np.int64).reshape(-1)
    n_grid = np.asarray(num_grid, dtype=np.int64).reshape(-1)
    sizes, inverse = np.unique(n_atoms, return_inverse=True)
    count = np.bincount(inverse, minlength=len(sizes))
    grid_max = np.zeros(len(sizes), np.int64)
    np.maximum.at(grid_max, inverse, n_grid)
    S = len(sizes)
    cum = np.concatenate([[0], np.cumsum(count)])
    seg_grid = np.zeros((S, S), np.int64)  # seg_grid[i, j]: largest grid of sizes i..j
    for i in range(S):
        seg_grid[i, i:] = np.maximum.accumulate(grid_max[i:])

    def seg_cost(i: int, j: int) -> float:  # one bucket of the distinct sizes i..j
        n = int(cum[j + 1] - cum[i])
        if n < min_members:
            return math.inf
        return math.ceil(n / slots) * slots * cost(int(sizes[j]), int(seg_grid[i, j]))

    K = max(1, min(int(max_buckets), S))
    best, back = _partitions(seg_cost, S, K)
    totals = best[1:, S - 1]
    if not np.isfinite(totals).any():  # fewer than min_members conformers: one bucket
        return [int(sizes[-1])]
    k = 1 + int(np.argmin(totals + bucket_cost * np.arange(1, K + 1)))
    bounds, j = [], S - 1
    while k >= 1:
        bounds.append(int(sizes[j]))
        j, k = int(back[k, j]) - 1, k - 1
    return sorted(bounds)


def _partitions(
    seg_cost: Callable[[int, int], float], S: int, K: int
) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic programming over S ordered sizes: best[k, j] is the cheapest k buckets covering
    the sizes 0..j (a bucket ending at j), back[k, j] where that last bucket starts."""
    best = np.full((K + 1, S), math.inf)
    back = np.zeros((K + 1, S), np.int64)
    for j in range(S):
        best[1, j] = seg_cost(0, j)
    for k in range(2, K + 1):
        for j in range(S):
            for i in range(1, j + 1):
                c = best[k - 1, i - 1] + seg_cost(i, j)
                if c < best[k, j]:
                    best[k, j], back[k, j] = c, i
    return best, back


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Conformers padded to one shape.

    Attributes:
      num_atoms: Padded atoms (A_bucket).
      num_grid: Padded grid points (G_bucket).
      members: Indices of the bucket's conformers in the dataset, ascending.
      num_pairs: Neighbour-pair slots per molecule (K_bucket), or None: all A(A-1) pairs (no
        cutoff, or one within which every pair of its molecules lies).
      cutoff: The neighbour cutoff (Angstrom) of the run, or None.
    """

    num_atoms: int
    num_grid: int
    members: np.ndarray
    num_pairs: int | None = None
    cutoff: float | None = None

    @property
    def size(self) -> int:
        return int(len(self.members))


def slot_cost(num_atoms: int, num_grid: int, n_dcm: int = 2) -> float:
    """Relative work of one padded molecule slot: message passing over all A(A-1) pairs, the
    per-atom layers (~4 pairs' worth each) and the ESP of A*n_dcm charges at G points (~1e-3
    pairs' worth each; measured on 2 CPU cores with the default model, bench/throughput.py)."""
    return num_atoms * (num_atoms - 1) + 4.0 * num_atoms + 1e-3 * n_dcm * num_atoms * num_grid


def _pair_counts(data: ESPData, cutoff: float | None) -> np.ndarray | None:
    """Neighbour pairs of each conformer of `data` within `cutoff` (None without one)."""
    return None if cutoff is None else pair_counts(data.R, data.Z > 0, cutoff)


def _buckets_of(
    data: ESPData, idx: np.ndarray, bounds: Sequence[int], cutoff: float | None = None
) -> list[Bucket]:
    """Conformers `idx` of `data` grouped by the atom `bounds`, each bucket's grid trimmed to
    its members' largest and, with a `cutoff`, its pair slots to their largest pair count."""
    counts = _pair_counts(data.subset(idx), cutoff)
    out = []
    for num_atoms, pos in group_by_bucket(data.N[idx], bounds=bounds).items():
        order = np.argsort(idx[pos])
        members = idx[pos][order]
        pairs = None if counts is None else _slots(int(counts[pos].max()), num_atoms)
        grid = int(max(1, data.n_grid[members].max()))
        out.append(Bucket(num_atoms, grid, members, pairs, cutoff))
    return out


def _slots(count: int, num_atoms: int) -> int | None:
    """Pair slots of a bucket whose members have at most `count` pairs; None (all pairs, whose
    indices are constants of the program, a little cheaper than gathered ones) where the
    slots would hold every pair anyway."""
    return None if count >= num_atoms * (num_atoms - 1) else pair_capacity(count, exact=True)


def plan_buckets(
    data: ESPData,
    batch_size: int,
    accumulation: int,
    max_buckets: int,
    n_dcm: int = 2,
    num_epochs: int | None = None,
    cutoff: float | None = None,
) -> list[Bucket]:
    """Training buckets of `data`: at most `max_buckets`, each filling at least
    MIN_BUCKET_UPDATES updates of batch_size * accumulation molecules, as many as pay for
    their compiles over `num_epochs` epochs (None: compiles are free, e.g. evaluation). With a
    `cutoff`, each bucket's batches carry its members' neighbour pairs (the atom bounds are
    the same either way, see the module docstring)."""
    slots = batch_size * accumulation
    per_epoch = COMPILE_COST / num_epochs if num_epochs else 0.0
    bounds = bucket_bounds(
        data.N,
        data.n_grid,
        lambda a, g: slot_cost(a, g, n_dcm),
        slots,
        max_buckets,
        min_members=MIN_BUCKET_UPDATES * slots,
        bucket_cost=per_epoch,
    )
    return plan_from_bounds(data, bounds, cutoff)


def plan_from_bounds(
    data: ESPData, bounds: Sequence[int], cutoff: float | None = None
) -> list[Bucket]:
    """The buckets of all of `data` for atom `bounds` (e.g. those a checkpoint recorded)."""
    return _buckets_of(data, np.arange(data.num_conformers), bounds, cutoff)


def padded_bucket(data: ESPData, cutoff: float | None = None) -> list[Bucket]:
    """All of `data` as one bucket at its full padding (the padded path)."""
    counts = _pair_counts(data, cutoff)
    pairs = None if counts is None else _slots(int(counts.max(initial=0)), data.num_atoms)
    members = np.arange(data.num_conformers)
    return [Bucket(data.num_atoms, data.num_grid, members, pairs, cutoff)]


def assign_buckets(data: ESPData, like: Sequence[Bucket]) -> list[Bucket]:
    """Buckets for other conformers (validation, test) with the atom bounds and cutoff of
    `like` (plus one more for molecules larger than all of them); grids and pair slots
    trimmed per bucket."""
    bounds = sorted({b.num_atoms for b in like})
    if data.num_conformers and int(data.N.max()) > bounds[-1]:
        bounds.append(int(data.N.max()))
    return _buckets_of(data, np.arange(data.num_conformers), bounds, like[0].cutoff)


def num_updates(buckets: Sequence[Bucket], slots: int) -> int:
    """Updates of one bucketed epoch: ceil(size / slots) per bucket."""
    return sum(math.ceil(b.size / slots) for b in buckets)


def epoch_updates(
    buckets: Sequence[Bucket], batch_size: int, accumulation: int, seed
) -> list[tuple[int, np.ndarray]]:
    """The epoch's updates: (bucket index, (k, b) positions in the bucket's members; -1 =
    a masked dummy molecule), in a random order drawn from `seed` (uint32 words: the trainer
    passes its legacy JAX PRNG key `fold_in(rng, epoch)`, so a resumed run repeats the order).

    Every member appears exactly once. A bucket of n conformers gives u = ceil(n / (b*k))
    updates of n // u or n // u + 1 real molecules (real ones first, row-major), shuffled
    within the bucket; the updates of all buckets are then shuffled together.
    """
    rng = np.random.default_rng(np.asarray(seed).astype(np.uint32))
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
            pos[:m] = perm[start : start + m]
            start += m
            out.append((i, pos.reshape(accumulation, batch_size).astype(np.int32)))
    order = rng.permutation(len(out))
    return [out[j] for j in order]


def batch_bytes(data: ESPData, buckets: Sequence[Bucket]) -> int:
    """Bytes of `buckets` of `data` as padded batches (what device residence costs)."""
    total = 0
    for b in buckets:
        row = bucket_rows(data, b, b.members[:1])
        total += sum(v.nbytes for v in row.values()) * (b.size + 1)
    return int(total)


def bucket_rows(
    data: ESPData, bucket: Bucket, idx: np.ndarray, batch_size: int | None = None
) -> dict[str, np.ndarray]:
    """`make_batch` of conformers `idx` at `bucket`'s shape (atoms, grid points, pairs)."""
    cutoff = None if bucket.num_pairs is None else bucket.cutoff
    return make_batch(
        data, idx, batch_size, bucket.num_atoms, bucket.num_grid, cutoff, bucket.num_pairs
    )


def bucket_batch(data: ESPData, bucket: Bucket, pos: np.ndarray) -> dict[str, np.ndarray]:
    """Host batch (k, b, ...) of positions `pos` (k, b) in `bucket` (-1 = dummy; real ones
    first in row-major order)."""
    k, b = pos.shape
    flat = pos.reshape(-1)
    real = flat[flat >= 0]
    batch = bucket_rows(data, bucket, bucket.members[real], k * b)
    return {key: v.reshape((k, b) + v.shape[1:]) for key, v in batch.items()}


def describe(buckets: Sequence[Bucket]) -> str:
    """One line: the buckets' shapes and sizes, e.g. "5x798 (100), 8x1200 (70)", with pair
    slots "5x798x24 (100)"."""
    return ", ".join(
        f"{b.num_atoms}x{b.num_grid}"
        + ("" if b.num_pairs is None else f"x{b.num_pairs}")
        + f" ({b.size})"
        for b in buckets
    )
