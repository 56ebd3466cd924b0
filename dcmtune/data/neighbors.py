"""Neighbour lists: each conformer's directed atom pairs within the model's cutoff.

DCMNet's messages are weighted by a smooth cutoff that is exactly zero at and beyond `cutoff`
(e3x.nn.smooth_cutoff), so a pair farther apart contributes exactly nothing, to the outputs
and to every gradient. Of all atom pairs of a drug-sized molecule, only 20-40% lie within the
default 4 A (bench/RESULTS.md "Drug-sized molecules"); the rest need not be computed.

A batch carries its pairs as `pairs` (B, K, 2): per molecule the (destination, source) atom
indices of its K slots, real pairs first in row-major order (ascending destination), the free
slots filled with the self pair (A-1, A-1) of the molecule's last atom slot, which the model
never counts as an edge (an atom is not its own neighbour) and which keeps the destinations
ascending. K is the batch's pair capacity: a training bucket's largest pair count
(`pair_capacity(..., exact=True)`), or for prediction the count rounded up to a few shapes per
octave (`pair_capacity`), so programs stay few.

Pairs are found on the host in float64 with a margin of PAIR_MARGIN: a pair the device might
see just inside the cutoff (float32 coordinates) is always kept; a kept pair beyond it
contributes an exact zero. Plain numpy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PAIR_MARGIN", "pair_mask", "pair_counts", "neighbor_pairs", "pair_capacity"]

# Pairs within cutoff + PAIR_MARGIN (Angstrom) are kept: float32 rounding of coordinates
# (~1e-6 A at 10 A) can never move a dropped pair inside the cutoff.
PAIR_MARGIN = 1e-3
# Conformers per vectorised chunk (memory: chunk * A * A booleans and floats).
_CHUNK = 256


def pair_mask(R: np.ndarray, atom_mask: np.ndarray, cutoff: float) -> np.ndarray:
    """Which ordered pairs (i, j) of each conformer are neighbours.

    Args:
      R: Shape (M, A, 3), Angstrom.
      atom_mask: Shape (M, A) bool, real atoms.
      cutoff: Angstrom.

    Returns:
      Shape (M, A, A) bool: both real, i != j, |R_i - R_j| < cutoff + PAIR_MARGIN.
    """
    R = np.asarray(R, np.float64)
    real = np.asarray(atom_mask, bool)
    M, A = real.shape
    out = np.zeros((M, A, A), bool)
    reach = (float(cutoff) + PAIR_MARGIN) ** 2
    off_diagonal = ~np.eye(A, dtype=bool)
    for s in range(0, M, _CHUNK):
        r, m = R[s : s + _CHUNK], real[s : s + _CHUNK]
        d = r[:, :, None, :] - r[:, None, :, :]  # Shape (c, A, A, 3).
        close = np.einsum("cijx,cijx->cij", d, d) < reach  # Shape (c, A, A).
        out[s : s + _CHUNK] = close & m[:, :, None] & m[:, None, :] & off_diagonal
    return out


def pair_counts(R: np.ndarray, atom_mask: np.ndarray, cutoff: float) -> np.ndarray:
    """Shape (M,) int64: neighbour pairs (ordered) of each conformer (see `pair_mask`)."""
    M = len(atom_mask)
    counts = np.zeros(M, np.int64)
    for s in range(0, M, _CHUNK):
        mask = pair_mask(R[s : s + _CHUNK], atom_mask[s : s + _CHUNK], cutoff)
        counts[s : s + _CHUNK] = mask.sum(axis=(1, 2))
    return counts


def neighbor_pairs(
    R: np.ndarray, atom_mask: np.ndarray, cutoff: float, num_pairs: int
) -> np.ndarray:
    """Each conformer's neighbour pairs in `num_pairs` slots.

    Args:
      R: Shape (M, A, 3), Angstrom. atom_mask: Shape (M, A) bool. cutoff: Angstrom.
      num_pairs: Slots per conformer (K); at least the largest count.

    Returns:
      Shape (M, K, 2) int32: (destination, source) atom indices, real pairs first in ascending
      (destination, source) order, then the self pair (A-1, A-1).

    Raises:
      ValueError: a conformer has more pairs than `num_pairs`.
    """
    M, A = np.shape(atom_mask)
    K = int(num_pairs)
    out = np.full((M, K, 2), max(A - 1, 0), np.int32)
    for s in range(0, M, _CHUNK):
        mask = pair_mask(R[s : s + _CHUNK], atom_mask[s : s + _CHUNK], cutoff)
        m, i, j = np.nonzero(mask)  # Row-major: by conformer, then destination, then source.
        counts = np.bincount(m, minlength=len(mask))
        if counts.size and counts.max() > K:
            raise ValueError(
                f"neighbor_pairs: a conformer has {int(counts.max())} pairs within "
                f"{cutoff} A, more than the {K} slots"
            )
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        slot = np.arange(len(m)) - starts[m]
        out[s + m, slot, 0], out[s + m, slot, 1] = i, j
    return out


def pair_capacity(count: int, exact: bool = False, minimum: int = 8) -> int:
    """Pair slots for a largest count of `count`: with `exact` (training, whose buckets know
    their data) the count itself (at least 1; never more than a bucket's all pairs);
    otherwise (prediction) the next of 2^n, 1.25 * 2^n, 1.5 * 2^n, 1.75 * 2^n (at most 25%
    spare, four shapes per octave), at least `minimum`, so molecules of varying sizes share few
    programs."""
    if exact:
        return max(int(count), 1)
    n = max(int(count), int(minimum), 1)
    octave = 1 << (n.bit_length() - 1)  # Largest power of two <= n.
    step = max(octave // 4, 1)
    return -(-n // step) * step
