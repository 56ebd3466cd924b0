"""Use a trained DCMNet: load it, then predict charges, ESP and dipoles for new molecules.

    predictor = dcmtune.load_model("ray_results/quick/best_model")
    [p] = predictor.predict(ase.io.read("mol.xyz"), esp_points="shell")
    p.charges, p.charge_positions, p.monopoles, p.dipole, p.esp_kcal

`load_model` accepts a checkpoint directory, a run or trial directory (its `checkpoints/best`),
a sweep's `best_model/`, or the sweep's experiment directory (its `best_model/`). It keeps the
config and the evaluation parameters (the EMA when `training.use_ema`, as the trainer evaluates)
and nothing of the training state.

`Predictor.predict` takes an `ase.Atoms`, a list of them, a file (xyz/extxyz: all frames; SDF
and mol2: all records, with their total charges; `.smi`: SMILES; pdb and what else ASE reads),
a dcmtune `.npz` data file or an `ESPData`, `(Z, R)` arrays ((n,) and (n, 3) for one molecule;
(M, A) and (M, A, 3), zero-padded, for several) or `Molecule`s (`smiles_molecules`); see
`dcmtune.predict.inputs`. Each prediction carries its warnings: out of the training domain the
checkpoint records (`dcmtune.predict.domain`) or a doubtful input.

The model runs through `dcmtune.train.step.predict_batch`, the one jitted evaluation step the
trainer and `dcmtune.analysis` use, on batches made by `dcmtune.data.batches.make_batch` from
an `ESPData` built with `dcmtune.data.load.validate_arrays` (so inputs are refused exactly as
data files are: Z above the model's `max_atomic_number`, non-finite positions, ...).

Batching: molecules are grouped by padded atom count (`dcmtune.data.batches.group_by_bucket`:
powers of two, at least 8), each group streams through batches of `batch_size` molecules (a
group smaller than that gets the power of two that holds it), and the last batch is padded
with masked dummy molecules. So a mixed list compiles one program per size bucket and a
trajectory of any length one more. Grid points are padded to a power of two per batch. Each
group's batches carry its neighbour pairs within the model's cutoff in one number of slots
(`dcmtune.data.neighbors.pair_capacity`), and on a CPU hold no more molecules than a training
step would (`dcmtune.train.feed.step_molecules`).

Units: positions Angstrom, charges e, dipoles Debye, ESP Hartree/e (`esp`) and kcal/mol/e
(`esp_kcal`). Dipoles are taken about the centre of mass (ASE's standard atomic masses), except
for `.npz`/`ESPData` input, where they are about the data's `com` (the origin of its reference
`Dxyz`, the centre of mass in files made by `python -m dcmtune.data`). For a neutral molecule the
dipole does not depend on the origin.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from dcmtune.data.batches import Bucket, group_by_bucket, make_batch, size_bucket
from dcmtune.data.dataset import ESPData
from dcmtune.data.file_format import DataError
from dcmtune.data.grids import shell_grid
from dcmtune.data.load import validate_arrays
from dcmtune.data.neighbors import pair_capacity, pair_counts
from dcmtune.predict.domain import NO_DOMAIN, PredictWarning, TrainingDomain, domain_warnings
from dcmtune.predict.domain import summarize as summarize_warnings
from dcmtune.predict.inputs import Molecule, PredictError, gather, total_charges
from dcmtune.qm.specs import center_of_mass
from dcmtune.units import HARTREE_TO_KCAL

__all__ = [
    "PredictError",
    "Predictor",
    "MoleculePrediction",
    "load_model",
    "default_batch_size",
    "SHELL",
]

log = logging.getLogger(__name__)

SHELL = "shell"  # esp_points: the vdW-shell grid of dcmtune.data.grids (the generator's settings)
# Default molecules per batch. On CPU the e3x message passing slows down per molecule once a
# batch's edge tensors outgrow the caches (bench/predict.py, demo set: batch 8 runs 2.6x faster
# per conformer than batch 1, batch 256 2x slower); accelerators want big batches.
CPU_BATCH_SIZE = 8
ACCELERATOR_BATCH_SIZE = 256
# The generator's grid draws its subsample (only molecules with > max_grid points need one) from
# a seeded stream; prediction uses one fixed seed per molecule, so a molecule's grid does not
# depend on what else is in the call.
_GRID_SEED = 0
# A molecule without ESP points still needs one (masked-in) grid point in its batch: it sits
# this far from the first atom (inside the range the Bohr-units check expects).
_PLACEHOLDER_OFFSET = np.array([1.5, 0.0, 0.0])


# --------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class MoleculePrediction:
    """The model's charges and observables for one molecule (n atoms, K = n_dcm, g points).

    Attributes:
      source: Where the molecule came from: "mol.xyz:3" (frame 3), "data.npz:3:H2O" (conformer
        3 of a data file, its mol_id), "molecules[2]" (the third of a list).
      numbers: (n,) atomic numbers.
      positions: (n, 3) atom positions as given, Angstrom.
      total_charge: The total charge asked for (the model's Q), e.
      charges: (n, K) the distributed charges of each atom, e; they sum to total_charge.
      charge_positions: (n, K, 3) where they sit, Angstrom.
      monopoles: (n,) atomic monopoles (each atom's charges summed), e.
      dipole: (3,) dipole of the charges about dipole_origin, Debye.
      dipole_origin: (3,) Angstrom: the centre of mass, or a data file's `com`.
      esp_points: (g, 3) Angstrom, or None when no ESP was asked for.
      esp: (g,) the charges' ESP at esp_points, Hartree/e, or None.
      esp_reference: (g,) the data file's reference ESP at the same points, Hartree/e, or None.
      dipole_reference: (3,) the data file's reference dipole (`Dxyz`) about the same origin,
        Debye, or None.
      warnings: Why the prediction may not be trusted: out of the model's training domain
        (`dcmtune.predict.domain`: an element never seen, larger than any training molecule,
        a total charge never trained on) or a doubtful input (non-integral mol2 charges).
      bonds: (b, 2) bonded atom pairs when the input gave a graph (SDF, mol2, SMILES), else
        None (local frames then perceive bonds from covalent radii).
      smiles: The SMILES the molecule was built from, or None.
      geometry: How its geometry was made from the SMILES (RDKit ETKDG + MMFF), or None.
    """

    source: str
    numbers: np.ndarray
    positions: np.ndarray
    total_charge: float
    charges: np.ndarray
    charge_positions: np.ndarray
    monopoles: np.ndarray
    dipole: np.ndarray
    dipole_origin: np.ndarray
    esp_points: np.ndarray | None = None
    esp: np.ndarray | None = None
    esp_reference: np.ndarray | None = None
    dipole_reference: np.ndarray | None = None
    warnings: tuple[str, ...] = ()
    bonds: np.ndarray | None = None
    smiles: str | None = None
    geometry: str | None = None

    @property
    def formula(self) -> str:
        from ase.symbols import Symbols

        return Symbols(self.numbers).get_chemical_formula()

    @property
    def esp_kcal(self) -> np.ndarray | None:
        """(g,) the ESP in kcal/mol/e, or None."""
        return None if self.esp is None else self.esp.astype(np.float64) * HARTREE_TO_KCAL

    @property
    def esp_rmse(self) -> float | None:
        """RMSE of the ESP against the reference, kcal/mol/e (float64), or None."""
        if self.esp is None or self.esp_reference is None:
            return None
        err = self.esp.astype(np.float64) - self.esp_reference.astype(np.float64)
        return float(np.sqrt(np.mean(err * err)) * HARTREE_TO_KCAL)

    @property
    def dipole_magnitude(self) -> float:
        """|dipole|, Debye."""
        return float(np.linalg.norm(self.dipole.astype(np.float64)))

    def to_atoms(self):
        """The atoms followed by the n*K charge sites (element X, atomic number 0), as one
        `ase.Atoms`. Per-entry arrays: `charge` (e; the sites carry the model's charges, atoms
        0, so the frame's charges sum to total_charge), `monopole` (e; atoms only) and `site_of`
        (the atom a site belongs to; -1 on atoms). `info`: total_charge (e), dipole_debye,
        dipole_origin (Angstrom), n_dcm, source; and smiles, geometry and warnings (joined by
        "; ") when there are any."""
        from ase import Atoms

        n, k = self.charges.shape
        sites = self.charge_positions.reshape(n * k, 3)
        atoms = Atoms(
            numbers=np.concatenate([self.numbers, np.zeros(n * k, int)]),
            positions=np.concatenate([self.positions, sites]),
        )
        atoms.new_array(
            "charge", np.concatenate([np.zeros(n), self.charges.reshape(-1)]).astype(np.float64)
        )
        atoms.new_array(
            "monopole", np.concatenate([self.monopoles, np.zeros(n * k)]).astype(np.float64)
        )
        atoms.new_array("site_of", np.concatenate([np.full(n, -1), np.repeat(np.arange(n), k)]))
        atoms.info.update(
            total_charge=float(self.total_charge),
            n_dcm=int(k),
            dipole_debye=self.dipole.astype(np.float64),
            dipole_origin=self.dipole_origin.astype(np.float64),
            source=self.source,
        )
        extra = {"smiles": self.smiles, "geometry": self.geometry}
        atoms.info.update({k: v for k, v in extra.items() if v is not None})
        if self.warnings:
            atoms.info["warnings"] = "; ".join(self.warnings)
        return atoms


# --------------------------------------------------------------------------- the predictor


@dataclasses.dataclass(frozen=True, eq=False)
class Predictor:
    """A trained DCMNet ready to predict: config and evaluation parameters, nothing else.

    Attributes:
      path: The checkpoint directory it was loaded from (None when built in memory).
      config: The run's resolved ExperimentConfig (the model is `config.model`).
      params: The evaluation parameters on the device (EMA when `training.use_ema`).
      epoch: The checkpoint's epoch.
      domain: What the model saw in training (elements, largest molecule, total charges), or
        None for a checkpoint written before dcmtune recorded it (checks skipped).
    """

    path: Path | None
    config: Any  # ExperimentConfig
    params: Any
    epoch: int = 0
    domain: TrainingDomain | None = None

    @property
    def n_dcm(self) -> int:
        return self.config.model.n_dcm

    @property
    def max_atomic_number(self) -> int:
        return self.config.model.max_atomic_number

    def predict(
        self, molecules, charge=None, esp_points=None, batch_size: int | None = None
    ) -> list[MoleculePrediction]:
        """Charges, charge positions, monopoles, dipole and (optionally) ESP per molecule.

        Args:
          molecules: An ase.Atoms, a file (xyz/extxyz, SDF, mol2, .smi, pdb, ...: every
            record), a dcmtune `.npz` file or ESPData, (Z, R) arrays, Molecules
            (`smiles_molecules`), or a list mixing these.
          charge: Total charge (e) of every molecule, or a sequence with one per molecule.
            None: what the input states (a data file's `Q`, SDF/SMILES formal charges, the
            rounded sum of mol2 partial charges), else 0.
          esp_points: None (no ESP; a data file's own grid for `.npz`/ESPData input, with its
            reference ESP), "shell" (the vdW-shell grid of `dcmtune.grids.shell_grid` with the
            generator's settings), a (G, 3) array in Angstrom for every molecule, or one (g, 3)
            array per molecule (a list, or an (M, G, 3) array).
          batch_size: Molecules per compiled call (default: `default_batch_size()`).

        Returns:
          One MoleculePrediction per molecule, in input order (file frames in file order),
          each with its out-of-domain and input `warnings`. Every distinct warning is also
          issued once as a `PredictWarning` naming the first molecule and how many more; a
          checkpoint without a training domain warns once that the checks are skipped.

        Raises:
          PredictError: an input that cannot be read or used (one line naming it).
        """
        batch_size = default_batch_size() if batch_size is None else batch_size
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, (int, np.integer))
            or batch_size < 1
        ):
            raise PredictError(f"batch_size: expected a positive integer, got {batch_size!r}")
        mols = gather(molecules, self.max_atomic_number, "molecules")
        if not mols:
            raise PredictError("molecules: no molecules given")
        totals = total_charges(charge, mols)
        points = _point_specs(esp_points, len(mols))
        preds = _run(self, mols, totals, points, int(batch_size))
        return self._checked(preds)

    def _checked(self, preds: list[MoleculePrediction]) -> list[MoleculePrediction]:
        """The predictions with their domain warnings added, each distinct one warned once."""
        if self.domain is None:
            warnings.warn(NO_DOMAIN, PredictWarning, stacklevel=3)
        else:
            preds = [
                dataclasses.replace(
                    p, warnings=p.warnings + domain_warnings(self.domain, p.numbers, p.total_charge)
                )
                for p in preds
            ]
        for line in summarize_warnings([p.source for p in preds], [p.warnings for p in preds]):
            warnings.warn(line, PredictWarning, stacklevel=3)
        return preds


def default_batch_size() -> int:
    """Molecules per batch when none is given: 8 on CPU, 256 on a GPU or TPU."""
    import jax

    return CPU_BATCH_SIZE if jax.default_backend() == "cpu" else ACCELERATOR_BATCH_SIZE


def load_model(path: str | os.PathLike, which: str = "best") -> Predictor:
    """A Predictor from a checkpoint, run/trial directory, `best_model/` or sweep directory,
    or a shipped model's name (`dcmtune.models.list_models()`) when no such path exists.

    Args:
      path: See the module docstring.
      which: "best" or "latest" checkpoint of a run directory.

    Raises:
      PredictError: missing path, not a dcmtune checkpoint, unknown format version, altered
        state file, invalid config (one line naming the path).
    """
    import jax

    from dcmtune.analysis.checkpoints import AnalysisError, open_checkpoint
    from dcmtune.train.checkpoints import META_FILE, CheckpointError

    p = Path(path)
    if not p.exists() and p.name == str(path):  # a bare name: a shipped model
        from dcmtune.models import UnknownModel, model_dir

        try:
            p = model_dir(str(path))
        except UnknownModel as e:
            raise PredictError(str(e)) from None
    if not (p / META_FILE).is_file() and (p / "best_model" / META_FILE).is_file():
        p = p / "best_model"  # a sweep's experiment directory: its winner
    try:
        c = open_checkpoint(p, which)
    except (AnalysisError, CheckpointError) as e:
        raise PredictError(str(e)) from None
    log.info("loaded %s (epoch %d, n_dcm %d)", c.path, c.epoch, c.config.model.n_dcm)
    return Predictor(
        path=c.path,
        config=c.config,
        params=jax.device_put(c.params),
        epoch=c.epoch,
        domain=TrainingDomain.from_meta(c.meta),
    )


def _point_specs(esp_points, num: int) -> list:
    """One entry per molecule: None (default), SHELL, or a (g, 3) array."""
    if esp_points is None or (isinstance(esp_points, str) and esp_points == SHELL):
        return [esp_points] * num
    if isinstance(esp_points, str):
        raise PredictError(
            f"esp_points: expected None, {SHELL!r} or arrays of points, got {esp_points!r}"
        )
    if isinstance(esp_points, (list, tuple)):
        per = [np.asarray(p, dtype=np.float64) for p in esp_points]
    else:
        arr = np.asarray(esp_points, dtype=np.float64)
        per = [arr] * num if arr.ndim == 2 else list(arr) if arr.ndim == 3 else [arr]
    if len(per) != num:
        raise PredictError(
            f"esp_points: expected one point array per molecule ({num}), got {len(per)}"
        )
    for k, p in enumerate(per):
        if p.ndim != 2 or p.shape[1] != 3 or len(p) == 0 or not np.all(np.isfinite(p)):
            raise PredictError(
                f"esp_points[{k}]: expected a (g, 3) array of finite points in "
                f"Angstrom with g >= 1, got shape {p.shape}"
            )
    return per


def _resolve_points(m: Molecule, spec) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(points (g, 3), reference (g,) or None) of one molecule, or (None, None)."""
    if spec is None:
        return m.points, m.reference
    if isinstance(spec, str):
        try:
            return shell_grid(m.positions, m.numbers, np.random.default_rng(_GRID_SEED)), None
        except ValueError as e:
            raise PredictError(f"{m.source}: esp_points='shell': {e}") from None
    return spec, None


# --------------------------------------------------------------------------- batches


def _center_of_mass(mol: Molecule) -> np.ndarray:
    """(3,) centre of mass (Angstrom) with ASE's standard atomic masses; unknown elements
    (refused later by validation) weigh 1."""
    from ase.data import atomic_masses

    z = np.asarray(mol.numbers)
    m = np.where(
        (z > 0) & (z < len(atomic_masses)),
        atomic_masses[np.clip(z, 0, len(atomic_masses) - 1)],
        1.0,
    )
    return center_of_mass(mol.positions, m)


def _chunk_data(mols, chunk, totals, points, num_atoms: int, max_atomic_number: int):
    """An ESPData of the molecules `chunk`, validated like a data file (trimmed to the chunk's
    real maxima); each molecule's (points, reference); and the grid points to pad to (a power of
    two: the compiled call wants the bucket's shapes, one program per bucket, not per chunk)."""
    resolved = [_resolve_points(mols[i], points[i]) for i in chunk]
    sizes = [len(p) for p, _ in resolved if p is not None]
    G = size_bucket(max(sizes)) if sizes else 1
    m = len(chunk)
    raw = {
        "R": np.zeros((m, num_atoms, 3)),
        "Z": np.zeros((m, num_atoms), np.int32),
        "N": np.zeros(m, np.int32),
        "esp": np.zeros((m, G)),
        "vdw_surface": np.zeros((m, G, 3)),
        "n_grid": np.ones(m, np.int32),
        "com": np.zeros((m, 3)),
        "Q": totals[chunk].astype(np.float64),
        "mol_id": np.array([mols[i].source for i in chunk]),
    }
    for j, i in enumerate(chunk):
        mol, (pts, ref) = mols[i], resolved[j]
        n = len(mol.numbers)
        raw["R"][j, :n], raw["Z"][j, :n], raw["N"][j] = mol.positions, mol.numbers, n
        raw["com"][j] = mol.com if mol.com is not None else _center_of_mass(mol)
        if pts is None:
            raw["vdw_surface"][j, 0] = mol.positions[0] + _PLACEHOLDER_OFFSET
        else:
            raw["vdw_surface"][j, : len(pts)], raw["n_grid"][j] = pts, len(pts)
            if ref is not None:
                raw["esp"][j, : len(ref)] = ref
    try:
        data = validate_arrays(
            raw,
            source=mols[chunk[0]].source if m == 1 else "molecules",
            max_atomic_number=max_atomic_number,
        )
    except DataError as e:
        if m == 1:
            raise PredictError(str(e)) from None
        for i in chunk:  # name the molecule that fails
            _chunk_data(mols, [i], totals, points, num_atoms, max_atomic_number)
        raise PredictError(str(e)) from None
    return data, resolved, G


def _collect(out: dict, chunk, data: ESPData, resolved, totals, mols, results: list) -> None:
    """Per-molecule results of one batch (host numpy) into `results`."""
    for j, i in enumerate(chunk):
        n = int(data.N[j])
        pts, ref = resolved[j]
        results[i] = MoleculePrediction(  # copies: no view keeps a whole batch alive
            source=mols[i].source,
            numbers=mols[i].numbers,
            positions=mols[i].positions,
            total_charge=float(totals[i]),
            charges=out["charges"][j, :n].copy(),
            charge_positions=out["positions"][j, :n].copy(),
            monopoles=out["mono"][j, :n].copy(),
            dipole=out["dipole"][j].copy(),
            dipole_origin=data.com[j].astype(np.float64),
            esp_points=pts,
            esp=None if pts is None else out["esp"][j, : len(pts)].copy(),
            esp_reference=ref,
            dipole_reference=mols[i].dipole,
            warnings=mols[i].warnings,
            bonds=mols[i].bonds,
            smiles=mols[i].smiles,
            geometry=mols[i].geometry,
        )


def _pair_slots(mols, idx, num_atoms: int, cutoff: float) -> int:
    """Pair slots of a size group: its largest neighbour-pair count, rounded up."""
    R, real = np.zeros((len(idx), num_atoms, 3)), np.zeros((len(idx), num_atoms), bool)
    for j, i in enumerate(idx):
        n = len(mols[i].numbers)
        R[j, :n], real[j, :n] = mols[i].positions, True
    return pair_capacity(int(pair_counts(R, real, cutoff).max(initial=0)))


def _run(predictor: Predictor, mols, totals, points, batch_size: int) -> list[MoleculePrediction]:
    """All molecules through `predict_batch`, grouped by size bucket, in fixed-size batches.
    The next batch is prepared on the host while the device computes the previous one."""

    from dcmtune.train.feed import step_molecules
    from dcmtune.train.hparams import Hparams
    from dcmtune.train.step import predict_batch

    hp = Hparams.of(predictor.config.training)
    model_config, max_z = predictor.config.model, predictor.max_atomic_number
    cutoff = model_config.cutoff
    results: list = [None] * len(mols)
    pending = None
    for num_atoms, idx in group_by_bucket([len(m.numbers) for m in mols]).items():
        K = _pair_slots(mols, idx, num_atoms, cutoff)
        B = min(batch_size, size_bucket(len(idx), minimum=1))
        B = step_molecules(Bucket(num_atoms, 1, idx, K, cutoff), B, model_config)
        for start in range(0, len(idx), B):
            chunk = idx[start : start + B]
            data, resolved, G = _chunk_data(mols, chunk, totals, points, num_atoms, max_z)
            batch = make_batch(data, np.arange(len(chunk)), B, num_atoms, G, cutoff, K)
            out = predict_batch(predictor.params, batch, hp, model_config)  # async
            if pending is not None:
                _collect(_fetch(pending[0]), *pending[1:], totals, mols, results)
            pending = (out, chunk, data, resolved)
    _collect(_fetch(pending[0]), *pending[1:], totals, mols, results)
    return results


# What `_collect` reads of `predict_batch`'s outputs (the rest are loss metrics).
_RESULT_KEYS = ("charges", "positions", "mono", "dipole", "esp")


def _fetch(out: dict) -> dict:
    """The outputs a prediction keeps, as host numpy (one transfer each, nothing else)."""
    import jax

    return jax.device_get({k: out[k] for k in _RESULT_KEYS})
