"""Checks a generated ESP file by regenerating a sample of its molecules (within tolerances).

A bitwise checksum cannot certify a rebuild: BLAS, the SCF's convergence path and float32
rounding move the last digits from machine to machine. Instead `verify_sample` regenerates some
molecules of a file from its provenance JSON (the same settings, seeds and SMILES, so the same
geometries and grids) and compares them with the stored arrays within `TOLERANCES`.

The geometries of SMILES inputs come from RDKit, whose embedding may change between RDKit
versions; a geometry that differs is reported as such (`R` beyond tolerance), together with the
RDKit version that made the file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dcmtune.data.file_format import provenance_path
from dcmtune.qm.conformers import smiles_spec
from dcmtune.qm.generator import generate, generated_arrays
from dcmtune.qm.inputs import load_molecules
from dcmtune.qm.specs import G2_SOURCE, GenerationSettings, MoleculeSpec, QMError

__all__ = ["TOLERANCES", "verify_sample"]

# Largest allowed |stored - regenerated| per key (units of the key).
TOLERANCES = {
    "R": 1e-4,  # Angstrom
    "vdw_surface": 1e-4,  # Angstrom
    "esp": 1e-6,  # Hartree/e
    "mono": 1e-3,  # e (a least-squares fit amplifies SCF noise on buried atoms)
    "Dxyz": 1e-3,  # Debye
}


def _settings(prov: dict) -> GenerationSettings:
    s = dict(prov["settings"])
    s["shells"] = tuple(s["shells"])
    return GenerationSettings(**s)


def _spec(record: dict, seed: int) -> MoleculeSpec:
    """The generator input of one provenance record (g2 name, SMILES or an existing .xyz)."""
    if record.get("smiles") is not None:
        return smiles_spec(record["mol_id"], record["smiles"], seed, record["source"])
    if record["source"] == G2_SOURCE:
        return load_molecules([record["mol_id"]])[0]
    return load_molecules([], [record["source"]])[0]


def verify_sample(
    path: str | Path, mol_ids: Sequence[str] = (), sample: int = 3, seed: int = 0, workers: int = 2
) -> list[dict]:
    """Regenerates molecules of `path` and compares them with the stored arrays.

    Args:
      path: a generated .npz with its provenance JSON beside it.
      mol_ids: the molecules to regenerate; default `sample` of them drawn with `seed`.
      workers: see `dcmtune.qm.generator.generate`.

    Returns:
      one row per molecule: {"mol_id", "conformers", "max_abs": {key: deviation}, "ok"}.

    Raises:
      QMError: no provenance, or a mol_id that is not in the file.
    """
    path = Path(path)
    prov_path = provenance_path(path)
    if not prov_path.is_file():
        raise QMError(f"{path}: no provenance file {prov_path.name} beside it")
    prov = json.loads(prov_path.read_text())
    records = {r["mol_id"]: r for r in prov["molecules"]}
    if not mol_ids:
        rng = np.random.default_rng(seed)
        mol_ids = sorted(rng.choice(sorted(records), min(sample, len(records)), replace=False))
    unknown = [m for m in mol_ids if m not in records]
    if unknown:
        raise QMError(f"{path}: no molecule(s) {unknown} in the file")
    settings = _settings(prov)
    specs = [_spec(records[m], settings.seed) for m in mol_ids]
    new = generated_arrays(specs, generate(specs, settings, workers=workers), settings)
    with np.load(path, allow_pickle=False) as f:
        old = {k: f[k] for k in ("mol_id", "n_grid", "N", *TOLERANCES)}
    return [_compare(m, old, new) for m in mol_ids]


def _compare(mol_id: str, old: dict, new: dict) -> dict:
    a, b = np.flatnonzero(old["mol_id"] == mol_id), np.flatnonzero(new["mol_id"] == mol_id)
    dev = {}
    if len(a) != len(b) or np.any(old["n_grid"][a] != new["n_grid"][b]):
        return {
            "mol_id": mol_id,
            "conformers": int(len(a)),
            "max_abs": {},
            "ok": False,
            "problem": "conformer or grid-point counts differ",
        }
    for key in TOLERANCES:
        d = 0.0
        for i, j in zip(a, b, strict=True):
            n = old["N"][i] if key in ("R", "mono") else old["n_grid"][i]
            x = old[key][i] if key == "Dxyz" else old[key][i, :n]
            y = new[key][j] if key == "Dxyz" else new[key][j, :n]
            d = max(d, float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()))
        dev[key] = d
    ok = all(dev[k] <= t for k, t in TOLERANCES.items())
    return {"mol_id": mol_id, "conformers": int(len(a)), "max_abs": dev, "ok": ok}
