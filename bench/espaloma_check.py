"""EspalomaCharge (expaloma) against sqm AM1-BCC on the bundled organic set, per molecule.

EspalomaCharge is a graph network trained to reproduce AM1-BCC; this checks how close it comes
to the AM1-BCC this project computes (antechamber + sqm, an AM1 single point at each molecule's
first conformer's stored geometry, `dcmtune.data.semiempirical`) and what the difference costs
in ESP error. Two parts, no training:

  molecules   `--molecules K` molecules spread evenly over the set's order: per molecule, the
              RMS and largest difference of the two charge sets (e) and the ESP RMSE (kcal/mol/e)
              of each on all the molecule's stored conformers and grids (computed the way the
              model's metric is), and the mean over the molecules.
  test splits for each `--split-seeds` seed, the organic test split of the molecule split
              (the split `python bench/accuracy.py generalise` trains on, made here without
              training) scored with both, as that bench scores its am1bcc column (its AM1-BCC
              figures reproduce docs/model.md's, which shows the split is the same).

Usage:
  python bench/espaloma_check.py                     # 10 molecules; seeds 0 1 2; writes the JSON
  python bench/espaloma_check.py --molecules 20 --split-seeds 0 --json out.json
  python bench/espaloma_check.py --smoke             # 2 molecules, seed 0, no JSON
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from dcmtune.analysis.breakdown import smiles_from_provenance
from dcmtune.config import config_from_flat
from dcmtune.data import ESPData, load_dataset, split_dataset
from dcmtune.data.baselines import esp_rmse_of_atom_charges
from dcmtune.data.espaloma import espaloma_charge_array
from dcmtune.data.semiempirical import am1bcc_charge_array

DEFAULT_JSON = Path(__file__).resolve().parent / "tables" / "espaloma_check.json"


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def spread_molecules(data: ESPData, k: int) -> list[str]:
    """`k` mol_ids spread evenly over the data's molecule order (first and last included)."""
    ids = list(dict.fromkeys(map(str, data.mol_id)))
    picks = np.unique(np.linspace(0, len(ids) - 1, min(k, len(ids))).round().astype(int))
    return [ids[i] for i in picks]


def molecule_rows(data: ESPData, smiles: dict[str, str], mol_ids: list[str]) -> list[dict]:
    """One row per molecule: charge differences (e) and ESP RMSE (kcal/mol/e) of both."""
    rows = []
    for mid in mol_ids:
        sub = data.subset(np.flatnonzero(data.mol_id == mid))
        n = int(sub.N[0])
        (am1, ok_a), t_a = _timed(am1bcc_charge_array, sub, {mid: smiles[mid]})
        (esp, ok_e), t_e = _timed(espaloma_charge_array, sub, {mid: smiles[mid]})
        if not (ok_a.all() and ok_e.all()):
            raise SystemExit(f"espaloma_check.py: {mid}: a method failed (see the log)")
        dq = esp[0, :n] - am1[0, :n]
        rows.append(
            {
                "mol_id": mid,
                "smiles": smiles[mid],
                "atoms": n,
                "conformers": int(sub.num_conformers),
                "charge_rms_diff": float(np.sqrt(np.mean(dq**2))),
                "charge_max_diff": float(np.max(np.abs(dq))),
                "am1bcc_esp_rmse": esp_rmse_of_atom_charges(sub, am1),
                "espaloma_esp_rmse": esp_rmse_of_atom_charges(sub, esp),
                "am1bcc_s": t_a,
                "espaloma_s": t_e,
            }
        )
    return rows


def split_rows(data: ESPData, smiles: dict[str, str], files: list[str], seeds) -> list[dict]:
    """Per split seed, the test ESP RMSE of AM1-BCC and EspalomaCharge over the test molecules
    with a SMILES (as `bench/accuracy.py generalise` scores them)."""
    rows = []
    for seed in seeds:
        cfg = config_from_flat(data_files=files, split_by="molecule", split_seed=seed)
        test = data.subset(split_dataset(data, cfg.data)["test"])
        row: dict = {"split_seed": seed, "test_molecules": len(set(test.mol_id))}
        for name, fn in (("am1bcc", am1bcc_charge_array), ("espaloma", espaloma_charge_array)):
            (q, ok), seconds = _timed(fn, test, smiles)
            row[name] = esp_rmse_of_atom_charges(test.subset(np.flatnonzero(ok)), q[ok])
            row[f"{name}_molecules"] = len(set(test.mol_id[ok]))
            row[f"{name}_s"] = seconds
        rows.append(row)
    return rows


def _print_tables(mol_rows: list[dict], seed_rows: list[dict]) -> None:
    cols = ("charge_rms_diff", "charge_max_diff", "am1bcc_esp_rmse", "espaloma_esp_rmse")
    print(
        "| molecule | atoms | charge RMS diff (e) | largest diff (e) | AM1-BCC ESP RMSE | "
        "EspalomaCharge ESP RMSE |\n|---|---|---|---|---|---|"
    )
    for r in mol_rows:
        print(f"| {r['mol_id']} | {r['atoms']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    means = " | ".join(f"{np.mean([r[c] for r in mol_rows]):.3f}" for c in cols)
    print(f"| mean of {len(mol_rows)} | | {means} |")
    print(
        f"\nseconds for the {len(mol_rows)} molecules: AM1-BCC "
        f"{sum(r['am1bcc_s'] for r in mol_rows):.1f}, EspalomaCharge "
        f"{sum(r['espaloma_s'] for r in mol_rows):.1f} (its first call loads and compiles)"
    )
    if seed_rows:
        print("\ntest ESP RMSE (kcal/mol/e), organic set, molecule split")
        print("| split seed | test molecules | AM1-BCC | EspalomaCharge |\n|---|---|---|---|")
        for r in seed_rows:
            print(
                f"| {r['split_seed']} | {r['test_molecules']} | {r['am1bcc']:.3f} | "
                f"{r['espaloma']:.3f} |"
            )
        am1, esp = (np.mean([r[c] for r in seed_rows]) for c in ("am1bcc", "espaloma"))
        print(f"| mean | | {am1:.3f} | {esp:.3f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-files", nargs="+", default=["organic"], help="default: organic set")
    p.add_argument("--molecules", type=int, default=10, help="molecules compared one by one")
    p.add_argument("--split-seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--json", default=None, help=f"output (default {DEFAULT_JSON}; not --smoke)")
    p.add_argument("--smoke", action="store_true", help="2 molecules, the first seed, no JSON")
    args = p.parse_args(argv)
    if args.smoke:
        args.molecules, args.split_seeds = 2, args.split_seeds[:1]
    files = list(args.data_files)
    data = load_dataset(files)
    smiles = smiles_from_provenance(files)
    mol_ids = [m for m in spread_molecules(data, args.molecules) if m in smiles]
    mol_rows = molecule_rows(data, smiles, mol_ids)
    seed_rows = split_rows(data, smiles, files, args.split_seeds)
    _print_tables(mol_rows, seed_rows)
    out = args.json or (None if args.smoke else DEFAULT_JSON)
    if out:
        summary = {
            c: float(np.mean([r[c] for r in mol_rows]))
            for c in ("charge_rms_diff", "am1bcc_esp_rmse", "espaloma_esp_rmse")
        }
        doc = {"data_files": files, "molecules": mol_rows, "mean": summary, "splits": seed_rows}
        Path(out).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
