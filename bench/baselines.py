"""Classical ESP baselines of a dataset, to report beside a trained DCMNet.

For every molecule, the ESP RMSE (kcal/mol/e) over all its conformers' grid points of:

  (a) mono       the stored per-conformer ESP-fitted atom charges (total charge constrained);
  (b) shared     ONE least-squares charge set per molecule fitted across all its conformers;
  (c) mulliken   the stored Mulliken charges (extra key `mulliken`).

Usage:  python bench/baselines.py [FILE.npz ...] [--json]   (default: the bundled demo set)

`--smoke`: the same tables for the first 3 molecules only (of the files in order).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from dcmtune.data import bundled_dataset_path, load_npz
from dcmtune.data.baselines import esp_design_matrix, fit_esp_charges_shared
from dcmtune.units import HARTREE_TO_KCAL

METHODS = ("mono", "shared", "mulliken")


def molecule_rmse(data, mulliken: np.ndarray | None) -> dict[str, dict[str, float]]:
    """{mol_id: {method: RMSE kcal/mol/e}} with errors pooled over the molecule's conformers."""
    out = {}
    ids, first = np.unique(data.mol_id, return_index=True)
    for mid in ids[np.argsort(first)]:
        idx = np.flatnonzero(data.mol_id == mid)
        n = int(data.N[idx[0]])
        Rs = [data.R[i, :n].astype(np.float64) for i in idx]
        grids = [data.grid[i, : data.n_grid[i]].astype(np.float64) for i in idx]
        esps = [data.esp[i, : data.n_grid[i]].astype(np.float64) for i in idx]
        Ts = [esp_design_matrix(R, g) for R, g in zip(Rs, grids, strict=True)]
        shared = fit_esp_charges_shared(Rs, grids, esps, float(data.Q[idx[0]]))
        charges = {"shared": [shared] * len(idx)}
        if data.mono is not None:
            charges["mono"] = [data.mono[i, :n].astype(np.float64) for i in idx]
        if mulliken is not None:
            charges["mulliken"] = [mulliken[i, :n].astype(np.float64) for i in idx]
        out[str(mid)] = {
            m: float(
                np.sqrt(
                    np.mean(
                        np.concatenate(
                            [(T @ q - v) ** 2 for T, q, v in zip(Ts, charges[m], esps, strict=True)]
                        )
                    )
                )
                * HARTREE_TO_KCAL
            )
            for m in METHODS
            if m in charges
        }
    return out


def summary(per_molecule: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, min and max over molecules of each method's RMSE."""
    out = {}
    for m in METHODS:
        vals = np.array([r[m] for r in per_molecule.values() if m in r])
        if len(vals):
            out[m] = {
                "mean": float(vals.mean()),
                "min": float(vals.min()),
                "max": float(vals.max()),
                "molecules": int(len(vals)),
            }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", help="dataset .npz files (default: bundled demo set)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--smoke", action="store_true", help="the first 3 molecules only")
    args = p.parse_args(argv)
    files = args.files or [str(bundled_dataset_path())]
    data = load_npz(files)
    mulliken = []
    for f in files:
        with np.load(f, allow_pickle=False) as z:
            mulliken.append(z["mulliken"] if "mulliken" in z.files else None)
    if any(m is None for m in mulliken) or len({m.shape[1] for m in mulliken}) != 1:
        mulliken = [None]  # missing in a file, or files padded differently
    mull = np.concatenate(mulliken) if mulliken[0] is not None else None
    if args.smoke:
        ids, first = np.unique(data.mol_id, return_index=True)
        keep = np.flatnonzero(np.isin(data.mol_id, ids[np.argsort(first)][:3]))
        data, mull = data.subset(keep), (mull[keep] if mull is not None else None)
    per_mol = molecule_rmse(data, mull)
    summ = summary(per_mol)
    if args.json:
        json.dump({"files": files, "per_molecule": per_mol, "summary": summ}, sys.stdout, indent=1)
        print()
        return 0
    print("ESP RMSE (kcal/mol/e) per molecule, pooled over its conformers")
    print(f"{'mol_id':<12}" + "".join(f"{m:>10}" for m in METHODS))
    for mid, r in per_mol.items():
        print(f"{mid:<12}" + "".join(f"{r[m]:>10.3f}" if m in r else f"{'-':>10}" for m in METHODS))
    print()
    print(f"{'over molecules':<16}{'mean':>8}{'min':>8}{'max':>8}")
    for m, s in summ.items():
        print(f"{m:<16}{s['mean']:>8.3f}{s['min']:>8.3f}{s['max']:>8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
