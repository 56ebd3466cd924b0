"""Splits of a dataset into train, valid and test, and the record written next to every run.

`split_by: molecule` keeps all conformers of a mol_id in one split, so the test split measures
unseen molecules; `split_seed` is separate from the training seed, so a sweep that varies the
training seed keeps one test set. Every element of the data stays in training. The record
(`split_record`) holds the indices, mol_ids and a data checksum; ranking reuses it. Plain numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from dcmtune.data.dataset import ESPData

__all__ = [
    "split_indices",
    "split_by_part",
    "limit_train_molecules",
    "split_dataset",
    "split_record",
]


def split_indices(
    mol_id: np.ndarray,
    split_by: str = "molecule",
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    num_train: int | None = None,
    num_valid: int | None = None,
    num_test: int | None = None,
    seed: int = 0,
    Z: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Assigns conformers to train/valid/test.

    Groups (a mol_id's conformers, or single conformers with `split_by="conformer"`) are
    shuffled with `seed` and dealt to test, then valid, until each holds at least its target
    number of conformers; train takes the rest (or `num_train` of them). Targets are counts
    when any of num_train/num_valid/num_test is given, else fractions of all conformers.

    With `Z` (M, A), a group is never dealt to test or valid if it holds the last remaining
    examples of an element: every element of the data is seen in training (a model cannot be
    judged on an element it never met). Such groups stay in train.

    Returns:
      {"train", "valid", "test"}: sorted conformer indices.

    Raises:
      ValueError: if the data cannot fill a non-empty train and valid split.
    """
    M = len(mol_id)
    if split_by == "molecule":
        _, group = np.unique(np.asarray(mol_id), return_inverse=True)
    elif split_by == "conformer":
        group = np.arange(M)
    else:
        raise ValueError(f"split_by: expected 'molecule' or 'conformer', got {split_by!r}")
    if any(n is not None for n in (num_train, num_valid, num_test)):
        t_test, t_valid = num_test or 0, num_valid or 0
    else:
        t_test, t_valid = math.ceil(test_fraction * M), math.ceil(valid_fraction * M)
    order = np.random.default_rng(seed).permutation(group.max() + 1)
    members = [np.flatnonzero(group == g) for g in order]
    out = _deal(members, Z, t_test, t_valid, num_train)
    groups = "molecules" if split_by == "molecule" else "conformers"
    if not out["train"]:
        raise ValueError(
            f"split: no conformers left for training ({M} conformers in "
            f"{len(members)} {groups}; test {len(out['test'])}, valid "
            f"{len(out['valid'])})"
        )
    if not out["valid"]:
        raise ValueError(
            f"split: the validation split is empty ({M} conformers in "
            f"{len(members)} {groups}); give num_valid or valid_fraction > 0"
        )
    return {k: np.sort(np.asarray(v, dtype=np.int64)) for k, v in out.items()}


def _deal(
    members: list[np.ndarray],
    Z: np.ndarray | None,
    t_test: int,
    t_valid: int,
    num_train: int | None,
) -> dict[str, list[int]]:
    """Deals the groups (conformer indices, in shuffled order) to test, then valid, until each
    holds `t_test` / `t_valid` conformers; train takes the rest (or `num_train`). A group that
    holds the last remaining examples of an element (of `Z`) stays in train."""
    elements = [set(np.unique(Z[idx])) - {0} if Z is not None else set() for idx in members]
    pool: dict[int, int] = {}  # element -> groups holding it that are not in test/valid
    for els in elements:
        for e in els:
            pool[e] = pool.get(e, 0) + 1
    out: dict[str, list[int]] = {"test": [], "valid": [], "train": []}
    for idx, els in zip(members, elements, strict=True):
        holdable = all(pool[e] > 1 for e in els)
        if holdable and len(out["test"]) < t_test:
            dest = "test"
        elif holdable and len(out["valid"]) < t_valid:
            dest = "valid"
        elif num_train is None or len(out["train"]) < num_train:
            dest = "train"
        else:
            continue
        if dest != "train":
            for e in els:
                pool[e] -= 1
        out[dest].extend(idx)
    return out


def limit_train_molecules(
    mol_id: np.ndarray, train: np.ndarray, n: int, seed: int = 0, Z: np.ndarray | None = None
) -> np.ndarray:
    """The training conformers of `n` of the training split's molecules, for learning curves
    (valid and test are not touched, so points of one curve share them).

    1. The training split's distinct mol_ids are put in one order drawn from `seed` (a stream
       separate from the split's own shuffle) that does not depend on `n`, so the choice is
       nested: the molecules kept for n are among those kept for any larger n.
    2. With `Z` (M, A), the order starts with the molecules that, taken greedily in that order,
       hold every element of the training split, so every element is still seen in training.
    3. The first `n` molecules of the order keep all their training conformers.

    Returns:
      The kept conformer indices, sorted (a subset of `train`).

    Raises:
      ValueError: "train_molecules: ..." if n is not in [1, number of training molecules], or is
        below the number of molecules needed to hold every element.
    """
    train = np.asarray(train, dtype=np.int64)
    mols = np.unique(np.asarray(mol_id)[train])  # (T,) training mol_ids
    if not 1 <= n <= len(mols):
        raise ValueError(
            f"train_molecules: expected an integer in [1, {len(mols)}] (the "
            f"training split's molecules), got {n}"
        )
    # 1. One seeded order, independent of n.
    order = list(mols[np.random.default_rng((seed, 1)).permutation(len(mols))])
    # 2. Molecules that bring an element not yet covered go first (greedy, in that order).
    cover: list = []
    if Z is not None:
        Zt, mt = np.asarray(Z)[train], np.asarray(mol_id)[train]
        missing = set(np.unique(Zt).tolist()) - {0}
        for m in order:
            els = set(np.unique(Zt[mt == m]).tolist()) - {0}
            if els & missing:
                cover.append(m)
                missing -= els
        if n < len(cover):
            raise ValueError(
                f"train_molecules: expected at least {len(cover)} (molecules needed "
                f"to keep every element of the training split), got {n}"
            )
        order = cover + [m for m in order if m not in set(cover)]
    # 3. The first n molecules, all their training conformers.
    keep = np.isin(np.asarray(mol_id)[train], np.asarray(order[:n]))
    return np.sort(train[keep])


def split_by_part(
    part: np.ndarray, split: Callable[[np.ndarray], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """`split(indices)` for each data file's conformers on its own, joined.

    With several files loaded together (`ESPData.part`), each file's molecules are dealt with
    the same seed and fractions as if it were loaded alone: adding a file of new molecules
    leaves the others' split exactly as it was, and every file keeps its share in test and
    valid. `split` maps an index array to {"train", "valid", "test"} positions into it.
    """
    out: dict[str, list[np.ndarray]] = {"train": [], "valid": [], "test": []}
    for p in np.unique(part):
        idx = np.flatnonzero(part == p)
        for k, v in split(idx).items():
            out[k].append(idx[v])
    return {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in out.items()}


def split_dataset(data: ESPData, cfg) -> dict[str, np.ndarray]:
    """`split_indices` with the settings of a `DataConfig` (every element kept in train), then,
    with `cfg.train_molecules`, only that many training molecules (`limit_train_molecules`).

    Fraction splits of several files loaded together deal each file on its own
    (`split_by_part`); count splits (num_train/num_valid/num_test) deal all conformers at once.
    """
    by_counts = any(n is not None for n in (cfg.num_train, cfg.num_valid, cfg.num_test))

    def split(idx: np.ndarray | None) -> dict[str, np.ndarray]:
        sel = slice(None) if idx is None else idx
        return split_indices(
            data.mol_id[sel],
            cfg.split_by,
            cfg.valid_fraction,
            cfg.test_fraction,
            cfg.num_train,
            cfg.num_valid,
            cfg.num_test,
            seed=cfg.split_seed,
            Z=data.Z[sel],
        )

    if data.part is None or by_counts:
        splits = split(None)
    else:
        splits = split_by_part(data.part, split)
    if cfg.train_molecules is not None:
        splits["train"] = limit_train_molecules(
            data.mol_id, splits["train"], cfg.train_molecules, cfg.split_seed, data.Z
        )
    return splits


def split_record(data: ESPData, splits: Mapping[str, np.ndarray], **settings) -> dict:
    """The JSON-able record of a split, written next to every run and reused by ranking.

    Besides the indices and mol_ids per split it names where the molecule ids come from
    (`mol_id_source`: "file", "graph" = grouped by bond graph, or "mixed") and what the held-out
    splits really guarantee (`guarantee`: whole molecules only with split_by "molecule").
    """
    by_molecule = settings.get("split_by", "molecule") == "molecule"
    how = {
        "file": "",
        "graph": " (molecules grouped by bond graph: the files have no mol_id)",
        "mixed": " (some files' molecules grouped by bond graph)",
    }[data.mol_id_source]
    return {
        "guarantee": (
            "molecules: no mol_id of a held-out split is in training" + how
            if by_molecule
            else "conformers only: conformers of one molecule may be "
            "in training and in a held-out split"
        ),
        "settings": settings,
        "checksum": data.checksum(),
        "num_conformers": data.num_conformers,
        "num_molecules": int(len(np.unique(data.mol_id))),
        "mol_id_source": data.mol_id_source,
        "indices": {k: [int(i) for i in v] for k, v in splits.items()},
        "mol_ids": {k: sorted(set(data.mol_id[v].tolist())) for k, v in splits.items()},
    }
