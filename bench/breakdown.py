"""Where a trained model's ESP error is, beside classical charges on the same grid points.

Evaluates a checkpoint on a split of its run (as `python -m dcmtune.analysis PATH --split S`)
and prints, per grid shell, nearest element, molecule size and functional class
(`dcmtune.analysis.breakdown`), the ESP RMSE pooled over each group's grid points (kcal/mol/e)
of:
  model    the checkpoint's distributed charges;
  mmff94   RDKit's MMFF94 charges from each molecule's SMILES (the data's provenance), over the
           molecules MMFF94 has parameters for (a prediction);
  am1bcc   AM1-BCC charges (antechamber + sqm) at each molecule's first conformer in the split,
           over the molecules with a SMILES (a prediction; `dcmtune.data.semiempirical`);
  espaloma EspalomaCharge charges (expaloma, a graph network trained on AM1-BCC) from each
           molecule's SMILES, no geometry (a prediction; `dcmtune.data.espaloma`);
  gfn2     GFN2-xTB charges (tblite) the same way as am1bcc (a prediction);
  lsq      one least-squares charge set per molecule fitted to its own conformers' ESP on this
           split (a bound for atom-centred charges, not a prediction);
  resp     two-stage RESP charges fitted the same way (`dcmtune.data.resp`; a bound), over the
           molecules with a SMILES.

Usage:
  python bench/breakdown.py dcmtune/models/organic-v2 --split test      # markdown tables
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from dcmtune.analysis import analyze_checkpoint
from dcmtune.analysis.breakdown import KIND_TITLES, KINDS, esp_breakdown, smiles_from_provenance
from dcmtune.data.baselines import (
    esp_design_matrix,
    rdkit_charge_array,
    shared_charges_per_molecule,
)
from dcmtune.data.dataset import ESPData
from dcmtune.data.espaloma import espaloma_charge_array
from dcmtune.data.resp import resp_charges_per_molecule
from dcmtune.data.semiempirical import am1bcc_charge_array, gfn2_charge_array


def atom_charge_esp(data: ESPData, charges: np.ndarray) -> np.ndarray:
    """(M, G) ESP (Hartree/e) of atom-centred `charges` (M, A) at each conformer's valid grid
    points (0 beyond n_grid)."""
    out = np.zeros(data.esp.shape)
    for i in range(data.num_conformers):
        n, g = int(data.N[i]), int(data.n_grid[i])
        T = esp_design_matrix(data.R[i, :n].astype(np.float64), data.grid[i, :g].astype(np.float64))
        out[i, :g] = T @ charges[i, :n].astype(np.float64)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", help="checkpoint or run directory (or a shipped model's directory)")
    p.add_argument("--split", default="test")
    args = p.parse_args(argv)

    a = analyze_checkpoint(args.path, args.split)
    data = a.data
    smiles = smiles_from_provenance(list(a.config.data.data_files))
    results = {"model": esp_breakdown(data, a.esp_pred, smiles)}
    q, ok = rdkit_charge_array(data, smiles, "mmff94")
    if ok.any():
        sub = data.subset(np.flatnonzero(ok))
        results["MMFF94"] = esp_breakdown(sub, atom_charge_esp(sub, q[ok]), smiles)
    for name, (q_se, ok_se) in (
        ("AM1-BCC", am1bcc_charge_array(data, smiles)),
        ("EspalomaCharge", espaloma_charge_array(data, smiles)),
        ("GFN2-xTB", gfn2_charge_array(data, smiles.keys())),
    ):
        if ok_se.any():
            sub = data.subset(np.flatnonzero(ok_se))
            results[name] = esp_breakdown(sub, atom_charge_esp(sub, q_se[ok_se]), smiles)
    lsq = shared_charges_per_molecule(data)
    results["LSQ per molecule (bound)"] = esp_breakdown(data, atom_charge_esp(data, lsq), smiles)
    resp, ok_resp = resp_charges_per_molecule(data, smiles)
    if ok_resp.any():
        sub = data.subset(np.flatnonzero(ok_resp))
        results["RESP per molecule (bound)"] = esp_breakdown(
            sub, atom_charge_esp(sub, resp[ok_resp]), smiles
        )

    m = results["model"]
    print(
        f"{args.path} on {args.split}: {m.n_points} grid points of "
        f"{data.num_conformers} conformers, {len(np.unique(data.mol_id))} molecules; "
        f"MMFF94 on {len(np.unique(data.mol_id[ok]))} molecules, RESP on "
        f"{len(np.unique(data.mol_id[ok_resp]))}; shells recovered from the "
        f"geometry, largest deviation {m.shell_max_deviation:.2g} x vdW\n"
    )
    names = list(results)
    for kind in KINDS:
        base = m.tables[kind][["group", "n_points", "n_molecules"]]
        for name, b in results.items():
            t = b.tables[kind][["group", "esp_rmse"]].rename(columns={"esp_rmse": name})
            base = base.merge(t, on="group", how="left")
        rows = [
            [str(r["group"]), str(int(r["n_points"])), str(int(r["n_molecules"]))]
            + [("–" if pd.isna(r[n]) else f"{r[n]:.3f}") for n in names]
            for _, r in base.iterrows()
        ]
        rows.append(
            ["all", str(m.n_points), str(len(np.unique(data.mol_id)))]
            + [f"{results[n].esp_rmse:.3f}" for n in names]
        )
        header = [KIND_TITLES[kind], "points", "molecules", *names]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
