"""Writing predictions: a self-describing .npz or .json, and extended XYZ with the charge
sites (ASE, OVITO and VMD read it). Every file is written atomically (`dcmtune._io`)."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dcmtune import _io
from dcmtune.predict.predictor import MoleculePrediction, PredictError
from dcmtune.units import HARTREE_TO_KCAL

__all__ = ["write_predictions", "write_extxyz", "FORMAT", "UNITS"]

FORMAT = "dcmtune-predictions-1"
UNITS = {
    "R": "Angstrom",
    "positions": "Angstrom",
    "charges": "e",
    "charge_positions": "Angstrom",
    "mono": "e",
    "monopoles": "e",
    "Q": "e",
    "total_charge": "e",
    "Dxyz": "Debye",
    "dipole": "Debye",
    "com": "Angstrom",
    "dipole_origin": "Angstrom",
    "vdw_surface": "Angstrom",
    "esp_points": "Angstrom",
    "esp": "Hartree/e",
    "esp_kcal": "kcal/mol/e",
    "esp_reference": "Hartree/e",
    "esp_rmse": "kcal/mol/e",
    "Dxyz_reference": "Debye",
    "dipole_reference": "Debye",
}


def _padded(arrays: Sequence[np.ndarray], shape_tail: tuple, dtype) -> np.ndarray:
    """Stacks arrays of different leading lengths, zero-padded to the longest."""
    n = max((len(a) for a in arrays), default=0)
    out = np.zeros((len(arrays), n) + shape_tail, dtype)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return out


def write_predictions(
    predictions: Sequence[MoleculePrediction], path: str | Path, model: str | Path | None = None
) -> Path:
    """Writes predictions to a self-describing `.npz` or `.json` (by the suffix), atomically.

    `.npz`: arrays padded like a dcmtune data file (real atoms first) - Z (M, A), R (M, A, 3),
    N (M,), Q (M,), charges (M, A, K), charge_positions (M, A, K, 3), mono (M, A), Dxyz (M, 3),
    com (M, 3), source (M,); with ESP also vdw_surface (M, G, 3), esp and esp_kcal (M, G),
    n_grid (M,) (0 = none); from a data file also esp_reference (M, G), esp_rmse (M,) and
    Dxyz_reference (M, 3) (NaN = no reference); plus `format`, `model` and `units` (a JSON
    object: key -> unit). When every molecule has ESP the file is also a valid
    dcmtune data file (the model's ESP and monopoles as the reference).
    `.json`: {"format", "model", "units", "molecules": [one object per molecule]}.
    """
    path = Path(path)
    if path.suffix not in (".npz", ".json"):
        raise PredictError(f"{path}: expected an output name ending in .npz or .json")
    preds = list(predictions)
    if not preds:
        raise PredictError(f"{path}: no predictions to write")
    meta = {"format": FORMAT, "model": str(model) if model is not None else "", "units": UNITS}
    if path.suffix == ".json":
        return _io.write_json(path, {**meta, "molecules": [_as_json(p) for p in preds]})
    arrays = {**_atom_arrays(preds), **_esp_arrays(preds)}
    arrays.update(
        format=np.array(FORMAT),
        model=np.array(meta["model"]),
        units=np.array(json.dumps(UNITS, sort_keys=True)),
    )
    return _io.atomic_write(path, lambda f: np.savez(f, **arrays))


def _atom_arrays(preds: Sequence[MoleculePrediction]) -> dict[str, np.ndarray]:
    """The atoms, charges and dipoles, padded like a dcmtune data file."""
    K = preds[0].charges.shape[1]
    arrays = {
        "source": np.array([p.source for p in preds]),
        "Z": _padded([p.numbers for p in preds], (), np.int32),
        "R": _padded([p.positions for p in preds], (3,), np.float64),
        "N": np.array([len(p.numbers) for p in preds], np.int32),
        "Q": np.array([p.total_charge for p in preds], np.float64),
        "charges": _padded([p.charges for p in preds], (K,), np.float32),
        "charge_positions": _padded([p.charge_positions for p in preds], (K, 3), np.float32),
        "mono": _padded([p.monopoles for p in preds], (), np.float32),
        "Dxyz": np.array([p.dipole for p in preds], np.float32),
        "com": np.array([p.dipole_origin for p in preds], np.float64),
    }
    if any(p.dipole_reference is not None for p in preds):
        nan = np.full(3, np.nan)
        refs = [nan if p.dipole_reference is None else p.dipole_reference for p in preds]
        arrays["Dxyz_reference"] = np.array(refs)
    return arrays


def _esp_arrays(preds: Sequence[MoleculePrediction]) -> dict[str, np.ndarray]:
    """The ESP points and values (n_grid 0 = none), and the reference where there is one."""
    if all(p.esp is None for p in preds):
        return {}
    points = [np.zeros((0, 3)) if p.esp is None else p.esp_points for p in preds]
    values = [np.zeros(0) if p.esp is None else p.esp for p in preds]
    arrays = {
        "vdw_surface": _padded(points, (3,), np.float64),
        "esp": _padded(values, (), np.float32),
        "n_grid": np.array([len(v) for v in values], np.int32),
    }
    arrays["esp_kcal"] = arrays["esp"].astype(np.float64) * HARTREE_TO_KCAL
    if any(p.esp_reference is not None for p in preds):
        refs = [
            np.zeros(len(v)) if p.esp_reference is None else p.esp_reference
            for p, v in zip(preds, values, strict=True)
        ]
        arrays["esp_reference"] = _padded(refs, (), np.float32)
        rmse = [np.nan if p.esp_rmse is None else p.esp_rmse for p in preds]
        arrays["esp_rmse"] = np.array(rmse)
    return arrays


def _as_json(p: MoleculePrediction) -> dict:
    d = {
        "source": p.source,
        "formula": p.formula,
        "numbers": p.numbers,
        "positions": p.positions,
        "total_charge": p.total_charge,
        "charges": p.charges,
        "charge_positions": p.charge_positions,
        "monopoles": p.monopoles,
        "dipole": p.dipole,
        "dipole_magnitude": p.dipole_magnitude,
        "dipole_origin": p.dipole_origin,
    }
    if p.esp is not None:
        d.update(esp_points=p.esp_points, esp=p.esp, esp_kcal=p.esp_kcal)
    if p.esp_rmse is not None:
        d.update(esp_reference=p.esp_reference, esp_rmse=p.esp_rmse)
    if p.dipole_reference is not None:
        d.update(dipole_reference=p.dipole_reference)
    return d


def write_extxyz(predictions: Sequence[MoleculePrediction], path: str | Path) -> Path:
    """Writes one extended-XYZ frame per molecule: its atoms, then its charge sites as element
    X (see `MoleculePrediction.to_atoms`), atomically. ASE, OVITO and VMD read it; ASE returns
    the per-entry `charge` column as `atoms.get_charges()`."""
    import ase.io

    text = io.StringIO()
    ase.io.write(text, [p.to_atoms() for p in predictions], format="extxyz")
    return _io.write_text(path, text.getvalue())
