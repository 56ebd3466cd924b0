"""Writing predictions: a self-describing .npz or .json, extended XYZ with the charge sites
(ASE, OVITO and VMD read it), PQR (atoms and charge sites, for Poisson-Boltzmann solvers and
MD set-ups) and the charge sites in local frames (`dcmtune.predict.frames`, as virtual sites
need). Every file is written atomically (`dcmtune._io`)."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dcmtune import _io
from dcmtune.predict.domain import TrainingDomain
from dcmtune.predict.ensemble import EnsemblePrediction
from dcmtune.predict.frames import CONVENTION, local_sites
from dcmtune.predict.predictor import MoleculePrediction, PredictError
from dcmtune.units import HARTREE_TO_KCAL

__all__ = [
    "write_predictions",
    "write_ensemble_predictions",
    "write_extxyz",
    "write_pqr",
    "write_sites",
    "FORMAT",
    "ENSEMBLE_FORMAT",
    "SITES_FORMAT",
    "UNITS",
]

FORMAT = "dcmtune-predictions-1"
SITES_FORMAT = "dcmtune-sites-1"
# PQR: the residue name of a molecule's atoms and sites, and the radius of an element missing
# from both radius tables (Angstrom).
PQR_RESIDUE = "MOL"
_DEFAULT_RADIUS = 2.0
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
    predictions: Sequence[MoleculePrediction],
    path: str | Path,
    model: str | Path | None = None,
    domain: TrainingDomain | None = None,
) -> Path:
    """Writes predictions to a self-describing `.npz` or `.json` (by the suffix), atomically.

    `.npz`: arrays padded like a dcmtune data file (real atoms first) - Z (M, A), R (M, A, 3),
    N (M,), Q (M,), charges (M, A, K), charge_positions (M, A, K, 3), mono (M, A), Dxyz (M, 3),
    com (M, 3), source (M,); with ESP also vdw_surface (M, G, 3), esp and esp_kcal (M, G),
    n_grid (M,) (0 = none); from a data file also esp_reference (M, G), esp_rmse (M,) and
    Dxyz_reference (M, 3) (NaN = no reference); `warnings` (M,) each molecule's warnings joined
    by "; " ("" = none); from SMILES also `smiles` and `geometry` (M,) ("" = not from SMILES);
    plus `format`, `model`, `units` (a JSON object: key -> unit) and `training_domain` (JSON:
    the model's `domain`; null = not known, the out-of-domain checks were skipped). When
    every molecule has ESP the file is also a valid dcmtune data file (the model's ESP and
    monopoles as the reference).
    `.json`: {"format", "model", "units", "training_domain", "molecules": [one object per
    molecule]}.
    """
    path = Path(path)
    if path.suffix not in (".npz", ".json"):
        raise PredictError(f"{path}: expected an output name ending in .npz or .json")
    preds = list(predictions)
    if not preds:
        raise PredictError(f"{path}: no predictions to write")
    meta = {
        "format": FORMAT,
        "model": str(model) if model is not None else "",
        "units": UNITS,
        "training_domain": None if domain is None else domain.to_json(),
    }
    if path.suffix == ".json":
        return _io.write_json(path, {**meta, "molecules": [_as_json(p) for p in preds]})
    arrays = {**_atom_arrays(preds), **_esp_arrays(preds), **_text_arrays(preds)}
    arrays.update(
        format=np.array(FORMAT),
        model=np.array(meta["model"]),
        units=np.array(json.dumps(UNITS, sort_keys=True)),
        training_domain=np.array(json.dumps(meta["training_domain"], sort_keys=True)),
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


def _text_arrays(preds: Sequence[MoleculePrediction]) -> dict[str, np.ndarray]:
    """Each molecule's warnings, and its SMILES and geometry method when any came from one."""
    arrays = {"warnings": np.array(["; ".join(p.warnings) for p in preds])}
    if any(p.smiles is not None for p in preds):
        arrays["smiles"] = np.array([p.smiles or "" for p in preds])
        arrays["geometry"] = np.array([p.geometry or "" for p in preds])
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


def _molecule_json(p: MoleculePrediction | EnsemblePrediction) -> dict:
    """The keys every JSON record of a molecule starts with: what it is and where from."""
    return {
        "source": p.source,
        "formula": p.formula,
        "numbers": p.numbers,
        "positions": p.positions,
        "total_charge": p.total_charge,
    }


def _as_json(p: MoleculePrediction) -> dict:
    d = {
        **_molecule_json(p),
        "charges": p.charges,
        "charge_positions": p.charge_positions,
        "monopoles": p.monopoles,
        "dipole": p.dipole,
        "dipole_magnitude": p.dipole_magnitude,
        "dipole_origin": p.dipole_origin,
        "warnings": list(p.warnings),
    }
    if p.smiles is not None:
        d.update(smiles=p.smiles, geometry=p.geometry)
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


def _radius(z: int) -> float:
    """A vdW radius for PQR, Angstrom: the ESP grid's Bondi table, else ASE's, else 2.0."""
    from ase.data.vdw import vdw_radii

    from dcmtune.data.grids import VDW_RADII

    if z in VDW_RADII:
        return float(VDW_RADII[z])
    r = vdw_radii[z] if z < len(vdw_radii) else np.nan
    return float(r) if np.isfinite(r) else _DEFAULT_RADIUS


def _pqr_line(serial: int, name: str, xyz, charge: float, radius: float) -> str:
    x, y, z = (float(v) for v in xyz)
    return (
        f"ATOM  {serial:>5d} {name:<4s} {PQR_RESIDUE:<3s}     1 "
        f"{x:10.5f} {y:10.5f} {z:10.5f} {charge:11.7f} {radius:7.4f}"
    )


def _pqr_model(k: int, p: MoleculePrediction) -> list[str]:
    from ase.data import chemical_symbols

    n, K = p.charges.shape
    lines = [
        f"MODEL     {k + 1:>4d}",
        f"REMARK   6 {p.source}: {p.formula}, total charge "
        f"{p.total_charge:g} e, {n} atoms then {n * K} charge sites",
    ]
    lines += [f"REMARK   6 warning: {w}" for w in p.warnings]
    for a in range(n):
        name = f"{chemical_symbols[p.numbers[a]]}{a + 1}"
        lines.append(_pqr_line(a + 1, name, p.positions[a], 0.0, _radius(int(p.numbers[a]))))
    sites = p.charge_positions.reshape(n * K, 3)
    for j, (xyz, q) in enumerate(zip(sites, p.charges.reshape(-1), strict=True)):
        lines.append(_pqr_line(n + j + 1, f"X{j + 1}", xyz, float(q), 0.0))
    return lines + ["TER", "ENDMDL"]


def write_pqr(predictions: Sequence[MoleculePrediction], path: str | Path) -> Path:
    """Writes a PQR file, atomically: one MODEL per molecule, its atoms (charge 0, Bondi vdW
    radius, named element + index) then its charge sites (named X1, X2, ... in the order of
    `charge_positions` (atom-major), the model's charge, radius 0), all in residue MOL 1; so a
    model's charges sum to its total charge. Fields are separated by spaces (APBS, PDB2PQR,
    MDAnalysis and ParmEd read it); REMARK 6 lines give the source and any warnings."""
    lines = [
        "REMARK   1 dcmtune predictions: atoms carry charge 0 and their vdW radius; the "
        "charge sites (X) carry the charges and radius 0"
    ]
    for k, p in enumerate(predictions):
        lines += _pqr_model(k, p)
    return _io.write_text(path, "\n".join(lines + ["END"]) + "\n")


def write_sites(
    predictions: Sequence[MoleculePrediction], path: str | Path, model: str | Path | None = None
) -> Path:
    """Writes every molecule's charge sites in local frames as JSON, atomically:
    {"format", "model", "units", "convention", "molecules": `frames.local_sites`}; conformers of
    one molecule are grouped, each site given as its mean and spread over them."""
    doc = {
        "format": SITES_FORMAT,
        "model": str(model) if model is not None else "",
        "units": {"local": "Angstrom", "local_std": "Angstrom", "charge": "e", "charge_std": "e"},
        "convention": CONVENTION,
        "molecules": local_sites(list(predictions)),
    }
    return _io.write_json(path, doc)


ENSEMBLE_FORMAT = "dcmtune-ensemble-predictions-1"
ENSEMBLE_UNITS = {
    **{k: UNITS[k] for k in ("R", "Q", "com", "vdw_surface", "esp", "esp_kcal", "esp_reference")},
    **{k: UNITS[k] for k in ("esp_rmse", "Dxyz", "mono")},
    "mono_std": "e",
    "Dxyz_std": "Debye",
    "esp_std": "Hartree/e",
    "member_esp": "Hartree/e",
    "member_esp_rmse": "kcal/mol/e",
    "spread": "kcal/mol/e",
    "distrust_threshold": "kcal/mol/e",
}


def write_ensemble_predictions(
    predictions: Sequence[EnsemblePrediction],
    path: str | Path,
    members: Sequence[str],
    threshold: float | None = None,
    calibration: dict | None = None,
) -> Path:
    """Writes an ensemble's predictions to a self-describing `.npz` or `.json`, atomically.

    `.npz`: padded like a dcmtune data file - Z (M, A), R (M, A, 3), N, Q (M,), com (M, 3),
    source (M,); the members' means mono (M, A) e, Dxyz (M, 3) Debye, esp and esp_kcal (M, G)
    on vdw_surface (M, G, 3) with n_grid (M,), and their standard deviations over the members
    mono_std, Dxyz_std, esp_std; each member's ESP member_esp (M, m, G); spread (M,)
    kcal/mol/e (the uncertainty: RMS over the grid of esp_std) and distrust (M,) int8 (1
    distrust, 0 trust, -1 no threshold); from a data file also esp_reference (M, G), esp_rmse
    (M,) (the mean's) and member_esp_rmse (M, m); warnings (M,) joined by "; "; plus `format`,
    `members` (M model paths, in order), `distrust_threshold` (NaN = none), `calibration`
    (JSON: how the threshold was chosen; null = none) and `units` (JSON). No charges: members
    with different n_dcm have no site-by-site mean.
    `.json`: {"format", "members", "distrust_threshold", "calibration", "units", "molecules":
    [one object per molecule]}.
    """
    path = Path(path)
    if path.suffix not in (".npz", ".json"):
        raise PredictError(f"{path}: expected an output name ending in .npz or .json")
    preds = list(predictions)
    if not preds:
        raise PredictError(f"{path}: no predictions to write")
    meta: dict = {
        "format": ENSEMBLE_FORMAT,
        "members": [str(m) for m in members],
        "distrust_threshold": threshold,
        "calibration": calibration,
        "units": ENSEMBLE_UNITS,
    }
    if path.suffix == ".json":
        return _io.write_json(path, {**meta, "molecules": [_ensemble_json(p) for p in preds]})
    arrays = _ensemble_arrays(preds, meta)
    return _io.atomic_write(path, lambda f: np.savez(f, **arrays))


def _ensemble_arrays(preds: Sequence[EnsemblePrediction], meta: dict) -> dict[str, np.ndarray]:
    """The arrays of `write_ensemble_predictions`' .npz (see there)."""
    n = len(preds[0].members)
    ref = any(p.esp_reference is not None for p in preds)
    arrays = {
        "source": np.array([p.source for p in preds]),
        "Z": _padded([p.numbers for p in preds], (), np.int32),
        "R": _padded([p.positions for p in preds], (3,), np.float64),
        "N": np.array([len(p.numbers) for p in preds], np.int32),
        "Q": np.array([p.total_charge for p in preds], np.float64),
        "com": np.array([p.dipole_origin for p in preds], np.float64),
        "mono": _padded([p.monopoles for p in preds], (), np.float64),
        "mono_std": _padded([p.monopoles_std for p in preds], (), np.float64),
        "Dxyz": np.array([p.dipole for p in preds], np.float64),
        "Dxyz_std": np.array([p.dipole_std for p in preds], np.float64),
        "vdw_surface": _padded([p.esp_points for p in preds], (3,), np.float64),
        "esp": _padded([p.esp for p in preds], (), np.float64),
        "esp_std": _padded([p.esp_std for p in preds], (), np.float64),
        "n_grid": np.array([len(p.esp) for p in preds], np.int32),
        "member_esp": _padded(
            [np.stack([np.asarray(m.esp) for m in p.members], axis=1) for p in preds],
            (n,),
            np.float32,
        ).transpose(0, 2, 1),
        "spread": np.array([p.spread for p in preds], np.float64),
        "distrust": np.array([-1 if p.distrust is None else p.distrust for p in preds], np.int8),
        "warnings": np.array(["; ".join(p.warnings) for p in preds]),
        "format": np.array(ENSEMBLE_FORMAT),
        "members": np.array(meta["members"]),
        "distrust_threshold": np.array(
            np.nan if meta["distrust_threshold"] is None else meta["distrust_threshold"]
        ),
        "calibration": np.array(json.dumps(meta["calibration"], sort_keys=True)),
        "units": np.array(json.dumps(ENSEMBLE_UNITS, sort_keys=True)),
    }
    arrays["esp_kcal"] = arrays["esp"] * HARTREE_TO_KCAL
    if ref:
        refs = [np.zeros(len(p.esp)) if p.esp_reference is None else p.esp_reference for p in preds]
        arrays["esp_reference"] = _padded(refs, (), np.float64)
        arrays["esp_rmse"] = np.array([np.nan if p.esp_rmse is None else p.esp_rmse for p in preds])
        arrays["member_esp_rmse"] = np.array(
            [[np.nan if m.esp_rmse is None else m.esp_rmse for m in p.members] for p in preds]
        )
    return arrays


def _ensemble_json(p: EnsemblePrediction) -> dict:
    d = {
        **_molecule_json(p),
        "monopoles": p.monopoles,
        "monopoles_std": p.monopoles_std,
        "dipole": p.dipole,
        "dipole_std": p.dipole_std,
        "dipole_magnitude": p.dipole_magnitude,
        "dipole_origin": p.dipole_origin,
        "esp_points": p.esp_points,
        "esp": p.esp,
        "esp_kcal": p.esp_kcal,
        "esp_std": p.esp_std,
        "member_esp": [m.esp for m in p.members],
        "spread": p.spread,
        "distrust": p.distrust,
        "warnings": list(p.warnings),
    }
    if p.esp_rmse is not None:
        d.update(
            esp_reference=p.esp_reference,
            esp_rmse=p.esp_rmse,
            member_esp_rmse=[m.esp_rmse for m in p.members],
        )
    return d
