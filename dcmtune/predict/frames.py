"""Charge sites in local frames: each site relative to its atom and two others, as a virtual
site of a force field needs, and its spread over a molecule's conformers.

Convention (OpenMM's `LocalCoordinatesSite` with origin weights (1, 0, 0), x weights
(-1, 1, 0) and y weights (-1, 0, 1)):

1. Frame atoms (a, b, c): a is the parent atom, the atom the charge belongs to. b and c are
   the first usable atoms of a's bond graph in breadth-first order: a's bonded neighbours, then
   their other neighbours (so an atom with one neighbour uses that neighbour's other
   neighbour), then further; within one shell heavier atoms first, then lower index; atoms
   the graph does not reach follow by distance. c must not be collinear with a and b (the
   angle b-a-c between 11.5 and 168.5 degrees). Bonds come from the input's graph (SDF, mol2,
   SMILES) or from covalent radii (`dcmtune.data.molgraph.bond_matrix`).
2. Axes: e1 = (r_b - r_a)/|r_b - r_a|; e3 = e1 x (r_c - r_a), normalised; e2 = e3 x e1.
3. Local coordinates of a site at p: (x, y, z) = ((p - r_a).e1, (p - r_a).e2, (p - r_a).e3),
   Angstrom; p = r_a + x e1 + y e2 + z e3.

They do not change under a rigid rotation and translation of the molecule. Degenerate cases,
marked in the output (`frame_kind`): a linear molecule ("axis": no c; e2 from the global axis
least aligned with e1, so only x and the distance from the axis are rotation-invariant) and a
lone atom ("none": the global axes).

Conformers of one molecule (same elements in the same order, same bond graph) are grouped:
the frame atoms come from the first, and each site's local coordinates and charge are
reported as mean and standard deviation over the conformers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dcmtune.data.molgraph import bond_matrix

__all__ = [
    "CONVENTION",
    "FRAME_KINDS",
    "bond_lists",
    "frame_atoms",
    "frame_kinds",
    "frame_axes",
    "to_local",
    "to_global",
    "local_sites",
]

# The convention in one line, written into every sites file.
CONVENTION = (
    "frame [a, b, c]: a the parent atom, b and c its first non-collinear atoms in breadth-first "
    "bond order (heavier first, then lower index); e1 = unit(r_b - r_a), e3 = unit(e1 x (r_c - "
    "r_a)), e2 = e3 x e1; site = r_a + x e1 + y e2 + z e3 with local = [x, y, z] in Angstrom "
    "(OpenMM LocalCoordinatesSite(a, b, c, [1, 0, 0], [-1, 1, 0], [-1, 0, 1], local / 10 nm))"
)

FRAME_KINDS = ("plane", "axis", "none")
# c is usable when sin(angle b-a-c) exceeds this (11.5 degrees): a nearly linear frame would
# turn small vibrations into large rotations of its axes.
MIN_SIN = 0.2


def bond_lists(numbers: np.ndarray, positions: np.ndarray, bonds=None) -> list[list[int]]:
    """Each atom's bonded neighbours: from `bonds` ((b, 2) pairs) when given, else from
    covalent radii."""
    n = len(numbers)
    if bonds is None:
        adjacency = bond_matrix(positions[None], np.asarray(numbers)[None])[0]
        return [np.flatnonzero(adjacency[i]).tolist() for i in range(n)]
    out: list[list[int]] = [[] for _ in range(n)]
    for i, j in np.asarray(bonds, np.int64).reshape(-1, 2):
        out[int(i)].append(int(j))
        out[int(j)].append(int(i))
    return out


def _candidates(a: int, neighbours: list[list[int]], numbers, positions) -> list[int]:
    """Atoms other than a in frame order: breadth-first shells (heavier, then lower index
    first), then the atoms the graph does not reach, nearest first."""
    seen, order, shell = {a}, [], [a]
    while shell:
        nxt = sorted(
            {j for i in shell for j in neighbours[i] if j not in seen},
            key=lambda j: (-int(numbers[j]), j),
        )
        seen.update(nxt)
        order += nxt
        shell = nxt
    rest = [j for j in range(len(numbers)) if j not in seen]
    d = np.linalg.norm(positions[rest] - positions[a], axis=1) if rest else []
    return order + [j for _, j in sorted(zip(d, rest, strict=True))]


def frame_atoms(numbers: np.ndarray, positions: np.ndarray, bonds=None) -> np.ndarray:
    """(n, 3) int frame atoms (a, b, c) of every atom; b and/or c are -1 in degenerate cases
    (see the module docstring).

    Args:
      numbers: (n,) atomic numbers.
      positions: (n, 3) Angstrom (the reference conformer).
      bonds: (b, 2) bonded pairs, or None (covalent radii).
    """
    positions = np.asarray(positions, np.float64)
    neighbours = bond_lists(numbers, positions, bonds)
    out = np.full((len(numbers), 3), -1, np.int64)
    for a in range(len(numbers)):
        order = _candidates(a, neighbours, numbers, positions)
        out[a, 0] = a
        if not order:
            continue
        b = out[a, 1] = order[0]
        e1 = _unit(positions[b] - positions[a])
        for c in order[1:]:
            if np.linalg.norm(np.cross(e1, _unit(positions[c] - positions[a]))) > MIN_SIN:
                out[a, 2] = c
                break
    return out


def frame_kinds(frame: np.ndarray) -> list[str]:
    """ "plane", "axis" or "none" per atom of an (n, 3) frame."""
    return [
        FRAME_KINDS[0] if c >= 0 else FRAME_KINDS[1] if b >= 0 else FRAME_KINDS[2]
        for _, b, c in frame
    ]


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norm > 0, norm, 1.0)


def frame_axes(positions: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """(..., n, 3, 3) the axes e1, e2, e3 (rows) of every atom's frame.

    Args:
      positions: (..., n, 3) Angstrom (one conformer, or several stacked).
      frame: (n, 3) frame atoms from `frame_atoms`.
    """
    R = np.asarray(positions, np.float64)
    a, b, c = frame[:, 0], frame[:, 1], frame[:, 2]
    ra = R[..., a, :]
    e1 = _unit(R[..., np.maximum(b, 0), :] - ra)
    # A linear frame ("axis") takes the global axis least aligned with e1 as its second vector.
    least = np.eye(3)[np.argmin(np.abs(e1), axis=-1)]
    second = np.where((c >= 0)[:, None], R[..., np.maximum(c, 0), :] - ra, least)
    e3 = _unit(np.cross(e1, second))
    e2 = np.cross(e3, e1)
    axes = np.stack([e1, e2, e3], axis=-2)
    return np.where((b >= 0)[:, None, None], axes, np.eye(3))


def to_local(positions: np.ndarray, frame: np.ndarray, sites: np.ndarray) -> np.ndarray:
    """(..., n, K, 3) local coordinates (Angstrom) of the sites (..., n, K, 3) of each atom."""
    axes = frame_axes(positions, frame)
    d = np.asarray(sites, np.float64) - np.asarray(positions, np.float64)[..., frame[:, 0], None, :]
    return np.einsum("...nij,...nkj->...nki", axes, d)


def to_global(positions: np.ndarray, frame: np.ndarray, local: np.ndarray) -> np.ndarray:
    """(..., n, K, 3) site positions (Angstrom) from local coordinates: the inverse of
    `to_local`."""
    axes = frame_axes(positions, frame)
    ra = np.asarray(positions, np.float64)[..., frame[:, 0], None, :]
    return ra + np.einsum("...nij,...nki->...nkj", axes, np.asarray(local, np.float64))


def group_conformers(numbers: Sequence[np.ndarray], neighbours: Sequence) -> list[list[int]]:
    """Indices of the conformers of each molecule (same elements in order, same bond graph),
    in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, (z, nb) in enumerate(zip(numbers, neighbours, strict=True)):
        key = (np.asarray(z).tobytes(), tuple(tuple(sorted(x)) for x in nb))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def local_sites(predictions: Sequence) -> list[dict]:
    """Per molecule (its conformers grouped), every charge site in its local frame.

    Args:
      predictions: MoleculePredictions (`dcmtune.predict.predictor`).

    Returns:
      One JSON-ready dict per molecule: molecule (the first conformer's source), formula,
      conformers (count), sources, numbers, bonds ((b, 2) pairs used), and sites: one entry per
      charge site with atom (parent), site (index among its atom's sites), frame [a, b, c],
      frame_kind, local [x, y, z] (Angstrom) and charge (e), both the mean over the
      conformers, and local_std, charge_std (standard deviation over them; 0 for one).
    """
    neighbours = [bond_lists(p.numbers, p.positions, p.bonds) for p in predictions]
    out = []
    for idx in group_conformers([p.numbers for p in predictions], neighbours):
        first = predictions[idx[0]]
        frame = frame_atoms(first.numbers, first.positions, first.bonds)
        R = np.stack([predictions[i].positions for i in idx])
        local = to_local(R, frame, np.stack([predictions[i].charge_positions for i in idx]))
        q = np.stack([predictions[i].charges for i in idx]).astype(np.float64)
        mean, std = local.mean(axis=0), local.std(axis=0)
        kinds = frame_kinds(frame)
        pairs = sorted(
            {(min(i, j), max(i, j)) for i, nb in enumerate(neighbours[idx[0]]) for j in nb}
        )
        sites = [
            {
                "atom": a,
                "site": k,
                "frame": frame[a].tolist(),
                "frame_kind": kinds[a],
                "local": mean[a, k].tolist(),
                "local_std": std[a, k].tolist(),
                "charge": float(q[:, a, k].mean()),
                "charge_std": float(q[:, a, k].std()),
            }
            for a in range(len(first.numbers))
            for k in range(first.charges.shape[1])
        ]
        out.append(
            {
                "molecule": first.source,
                "formula": first.formula,
                "conformers": len(idx),
                "sources": [predictions[i].source for i in idx],
                "numbers": first.numbers.tolist(),
                "bonds": [list(p) for p in pairs],
                "sites": sites,
            }
        )
    return out
