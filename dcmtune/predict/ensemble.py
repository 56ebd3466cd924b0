"""Ensembles of trained DCMNets: the members' mean prediction, and their spread as an uncertainty.

    ensemble = load_ensemble(["experiments/sweep"], top_k=3)      # its 3 best trials
    ensemble = load_ensemble(["run_seed0", "run_seed1", "organic-v2"])
    [p] = ensemble.predict(ase.io.read("mol.xyz"))
    p.esp_kcal, p.spread, p.distrust, p.monopoles, p.dipole

A sweep leaves many good models. Their disagreement on a molecule measures how far the molecule
lies from what they learned, at no cost beyond running them.

What is averaged. Members may differ in `n_dcm` (charges per atom), so their charges cannot be
averaged site by site. The ensemble mean is taken only where every member predicts the same
quantity: the ESP at each grid point, each atom's monopole (its charges summed) and the dipole
(about the same origin for every member). Their standard deviations over the members (population,
ddof 0) come with them. Members must share the element domain: the same `max_atomic_number` and,
where their checkpoints record one, the same training elements.

The uncertainty. `spread` = the RMS over the molecule's grid points of the members' standard
deviation of the ESP, kcal/mol/e. The grid is the input's (a dcmtune `.npz` data file) or, for
geometry-only input (xyz, SDF, SMILES, ...), the vdW-shell grid of the data generator
(`dcmtune.data.grids.shell_grid`, as `esp_points="shell"`).

Which molecules to distrust. `distrust` is True when `spread` exceeds a threshold: by default
the `quantile` (0.9) of the spread over the validation conformers of the members (the conformers
in every member's validation split, of the data the members were trained on; nothing of the test
split), recorded in `Ensemble.calibration`. So about one molecule in ten like the validation
molecules is flagged, and more of those unlike them. A threshold may also be given. Without one
(no split record, the data cannot be found), `distrust` is None and a log line says why.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dcmtune.predict.domain import PredictWarning
from dcmtune.predict.domain import summarize as summarize_warnings
from dcmtune.predict.inputs import Molecule, PredictError, gather
from dcmtune.predict.predictor import (
    SHELL,
    MoleculePrediction,
    Predictor,
    _resolve_points,
    load_model,
)
from dcmtune.units import HARTREE_TO_KCAL

__all__ = [
    "DEFAULT_QUANTILE",
    "Ensemble",
    "EnsemblePrediction",
    "calibration",
    "combine",
    "distrust_warning",
    "load_ensemble",
    "spread_of",
]

log = logging.getLogger(__name__)

# The quantile of the members' validation spreads above which a molecule is distrusted.
DEFAULT_QUANTILE = 0.9


def distrust_warning(threshold: float) -> str:
    """The warning a distrusted molecule carries (one text for all, so they summarize)."""
    return (
        f"the ensemble's members disagree: ESP spread above the distrust threshold "
        f"{threshold:.3g} kcal/mol/e; do not trust this prediction"
    )


def spread_of(member_esp: np.ndarray) -> float:
    """The spread of one molecule: RMS over its grid points of the members' standard deviation
    (ddof 0) of the ESP.

    Args:
      member_esp: (members, g) ESP in Hartree/e.

    Returns:
      kcal/mol/e.
    """
    std = np.std(np.asarray(member_esp, np.float64), axis=0)
    return float(np.sqrt(np.mean(std * std)) * HARTREE_TO_KCAL)


@dataclasses.dataclass(frozen=True)
class EnsemblePrediction:
    """The ensemble's prediction for one molecule (n atoms, g grid points, m members).

    Attributes:
      source: Where the molecule came from (as `MoleculePrediction.source`).
      numbers: (n,) atomic numbers.
      positions: (n, 3) Angstrom.
      total_charge: e.
      monopoles: (n,) the members' mean atomic monopoles, e.
      monopoles_std: (n,) their standard deviation over the members, e.
      dipole: (3,) the members' mean dipole about dipole_origin, Debye.
      dipole_std: (3,) its standard deviation over the members, Debye.
      dipole_origin: (3,) Angstrom (the same for every member).
      esp_points: (g, 3) Angstrom.
      esp: (g,) the members' mean ESP, Hartree/e.
      esp_std: (g,) its standard deviation over the members, Hartree/e.
      spread: RMS of esp_std over the points, kcal/mol/e: the uncertainty.
      distrust: spread above the ensemble's threshold; None without a threshold.
      members: The m members' own predictions, in member order.
      esp_reference: (g,) a data file's reference ESP, Hartree/e, or None.
      warnings: The members' warnings (each once), and the distrust warning.
    """

    source: str
    numbers: np.ndarray
    positions: np.ndarray
    total_charge: float
    monopoles: np.ndarray
    monopoles_std: np.ndarray
    dipole: np.ndarray
    dipole_std: np.ndarray
    dipole_origin: np.ndarray
    esp_points: np.ndarray
    esp: np.ndarray
    esp_std: np.ndarray
    spread: float
    distrust: bool | None
    members: tuple[MoleculePrediction, ...]
    esp_reference: np.ndarray | None = None
    warnings: tuple[str, ...] = ()

    @property
    def formula(self) -> str:
        return self.members[0].formula

    @property
    def esp_kcal(self) -> np.ndarray:
        """(g,) the mean ESP in kcal/mol/e."""
        return self.esp * HARTREE_TO_KCAL

    @property
    def esp_rmse(self) -> float | None:
        """RMSE of the mean ESP against the reference, kcal/mol/e, or None."""
        if self.esp_reference is None:
            return None
        err = self.esp - self.esp_reference.astype(np.float64)
        return float(np.sqrt(np.mean(err * err)) * HARTREE_TO_KCAL)

    @property
    def dipole_magnitude(self) -> float:
        """|mean dipole|, Debye."""
        return float(np.linalg.norm(self.dipole))


def combine(
    members: Sequence[MoleculePrediction], threshold: float | None, extra: tuple[str, ...] = ()
) -> EnsemblePrediction:
    """One molecule's EnsemblePrediction from its members' predictions (all with ESP on the same
    points); `extra`: warnings of the members beyond the first's."""
    first = members[0]
    if first.esp is None or first.esp_points is None:
        raise PredictError(f"{first.source}: the ensemble needs every member's ESP")
    esp = np.stack([np.asarray(m.esp, np.float64) for m in members])  # Shape (m, g).
    mono = np.stack([np.asarray(m.monopoles, np.float64) for m in members])  # Shape (m, n).
    dip = np.stack([np.asarray(m.dipole, np.float64) for m in members])  # Shape (m, 3).
    spread = spread_of(esp)
    distrust = None if threshold is None else bool(spread > threshold)
    notes = tuple(dict.fromkeys(first.warnings + extra))
    if distrust and threshold is not None:
        notes += (distrust_warning(threshold),)
    return EnsemblePrediction(
        source=first.source,
        numbers=first.numbers,
        positions=first.positions,
        total_charge=first.total_charge,
        monopoles=mono.mean(0),
        monopoles_std=mono.std(0),
        dipole=dip.mean(0),
        dipole_std=dip.std(0),
        dipole_origin=np.asarray(first.dipole_origin, np.float64),
        esp_points=first.esp_points,
        esp=esp.mean(0),
        esp_std=esp.std(0),
        spread=spread,
        distrust=distrust,
        members=tuple(members),
        esp_reference=first.esp_reference,
        warnings=notes,
    )


@dataclasses.dataclass(frozen=True, eq=False)
class Ensemble:
    """Several trained DCMNets predicting together.

    Attributes:
      members: The loaded members (at least two), in order (best first for an experiment's
        top-k).
      threshold: The spread above which a molecule is distrusted, kcal/mol/e, or None.
      calibration: How the threshold was chosen (JSON-able: `rule`, `quantile`, `conformers`,
        `molecules`, `threshold`), or None.
    """

    members: tuple[Predictor, ...]
    threshold: float | None = None
    calibration: dict | None = None

    @property
    def paths(self) -> list[str]:
        return [str(m.path) for m in self.members]

    def predict(
        self, molecules, charge=None, esp_points=None, batch_size: int | None = None
    ) -> list[EnsemblePrediction]:
        """The ensemble's mean ESP, monopoles and dipole, and spread and distrust, per molecule.

        Args:
          molecules, charge, batch_size: As `Predictor.predict`.
          esp_points: None: a data file's own grid, else the vdW-shell grid ("shell"); or
            "shell" or arrays of points, as `Predictor.predict`.

        Returns:
          One EnsemblePrediction per molecule, in input order. Every distinct warning (the
          members', and the distrust warning) is issued once as a `PredictWarning`.

        Raises:
          PredictError: an input that cannot be read or used (one line naming it).
        """
        mols = gather(molecules, self.members[0].max_atomic_number, "molecules")
        if not mols:
            raise PredictError("molecules: no molecules given")
        if esp_points is None:
            mols, esp_points = [_with_grid(m) for m in mols], None
        per_member = []
        with warnings.catch_warnings():  # the members' warnings are gathered per molecule
            warnings.simplefilter("ignore", PredictWarning)
            for member in self.members:
                per_member.append(member.predict(mols, charge, esp_points, batch_size))
        preds = []
        for k in range(len(mols)):
            ms = [p[k] for p in per_member]
            extra = tuple(w for m in ms[1:] for w in m.warnings)
            preds.append(combine(ms, self.threshold, extra))
        for line in summarize_warnings([p.source for p in preds], [p.warnings for p in preds]):
            warnings.warn(line, PredictWarning, stacklevel=2)
        return preds


def _with_grid(m: Molecule) -> Molecule:
    """The molecule with a grid: its own (a data file's), else the vdW-shell grid."""
    if m.points is not None:
        return m
    points, _ = _resolve_points(m, SHELL)
    return dataclasses.replace(m, points=points, reference=None)


def _check_members(members: Sequence[Predictor]) -> None:
    """PredictError unless the members share the element domain."""
    first = members[0]
    for m in members[1:]:
        if m.max_atomic_number != first.max_atomic_number:
            raise PredictError(
                f"{m.path}: max_atomic_number {m.max_atomic_number} differs from {first.path}'s "
                f"{first.max_atomic_number}; ensemble members must share the element domain"
            )
        if (
            m.domain is not None
            and first.domain is not None
            and m.domain.elements != first.domain.elements
        ):
            raise PredictError(
                f"{m.path}: trained on elements {list(m.domain.elements)}, {first.path} on "
                f"{list(first.domain.elements)}; ensemble members must share the element domain"
            )


def _members(models: Sequence[str | os.PathLike], top_k: int | None, which: str) -> list[Predictor]:
    if top_k is None:
        return [load_model(m, which) for m in models]
    from dcmtune.analysis.rank import top_checkpoints
    from dcmtune.analysis.ranking import RankError

    if len(models) != 1:
        raise PredictError(f"top_k: expected one experiment directory, got {len(models)} models")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 2:
        raise PredictError(f"top_k: expected an integer of at least 2, got {top_k!r}")
    try:
        paths = top_checkpoints(Path(models[0]), int(top_k))
    except RankError as e:
        raise PredictError(str(e)) from None
    return [load_model(p) for p in paths]


def load_ensemble(
    models: Sequence[str | os.PathLike],
    top_k: int | None = None,
    which: str = "best",
    quantile: float = DEFAULT_QUANTILE,
    threshold: float | None = None,
    calibrate: bool = True,
    data: Any = None,
) -> Ensemble:
    """An Ensemble of several models, or of an experiment's top-k ranked checkpoints.

    Args:
      models: Paths or names `load_model` accepts (a checkpoint, run or trial directory,
        `best_model/`, a sweep directory's winner, a shipped model's name); or, with `top_k`,
        one experiment directory (a sweep, or a directory of training runs such as the training
        seeds of one configuration).
      top_k: Use the experiment's top_k trials by the validation metric, as
        `dcmtune.analysis.rank` ranks them (each at its best checkpoint), best first.
      which: "best" or "latest" checkpoint of a run directory.
      quantile: The distrust threshold is this quantile of the spread on the members'
        validation conformers (see the module docstring).
      threshold: A distrust threshold in kcal/mol/e instead (then nothing is calibrated).
      calibrate: False: no threshold unless given (distrust is None).
      data: The members' full dataset (an ESPData), if in memory or moved (default: the files
        the members were trained on); checked against their split records' checksum.

    Raises:
      PredictError: fewer than two members, members that do not share the element domain, a
        bad path (one line naming it).
    """
    if isinstance(models, (str, os.PathLike)):
        models = [models]
    if not 0.0 < quantile < 1.0:
        raise PredictError(f"quantile: expected a number between 0 and 1, got {quantile!r}")
    if threshold is not None and not (np.isfinite(threshold) and threshold >= 0):
        raise PredictError(f"threshold: expected a non-negative number, got {threshold!r}")
    members = _members(list(models), top_k, which)
    if len(members) < 2:
        raise PredictError(
            f"an ensemble needs at least two models, got {len(members)}"
            + (f" ({members[0].path})" if members else "")
        )
    _check_members(members)
    ensemble = Ensemble(tuple(members))
    if threshold is not None:
        given = {"rule": "given", "threshold": float(threshold)}
        return dataclasses.replace(ensemble, threshold=float(threshold), calibration=given)
    record = calibration(ensemble, quantile, data) if calibrate else None
    if record is None:
        return ensemble
    return dataclasses.replace(ensemble, threshold=float(record["threshold"]), calibration=record)


def _validation_conformers(
    members: Sequence[Predictor], data: Any = None
) -> tuple[Any, np.ndarray] | None:
    """(the members' full dataset, the indices in every member's validation split), or None
    (logged) when they have no split record, different data, or no validation conformer in
    common."""
    from dcmtune.analysis.checkpoints import AnalysisError, DataCache, open_checkpoint
    from dcmtune.data.file_format import DataError
    from dcmtune.train.checkpoints import CheckpointError

    try:
        loaded = [open_checkpoint(m.path) for m in members if m.path is not None]
        if len(loaded) != len(members) or any(c.split_record is None for c in loaded):
            log.warning("ensemble: a member records no split; no distrust threshold")
            return None
        sums = {(c.split_record or {}).get("checksum") for c in loaded}
        if len(sums) > 1:
            log.warning("ensemble: the members were trained on different data; no threshold")
            return None
        data = DataCache(data).full(loaded[0].config)
    except (AnalysisError, CheckpointError, DataError, OSError) as e:
        log.warning("ensemble: the members' validation data cannot be read (%s); no threshold", e)
        return None
    if data.checksum() not in sums:
        log.warning("ensemble: the members' data has changed (checksum); no distrust threshold")
        return None
    valid = [set((c.split_record or {}).get("indices", {}).get("valid", [])) for c in loaded]
    common = set.intersection(*valid)
    if not common:
        log.warning("ensemble: no validation conformer common to all members; no threshold")
        return None
    return data, np.array(sorted(common), np.int64)


def calibration(
    ensemble: Ensemble, quantile: float = DEFAULT_QUANTILE, data: Any = None
) -> dict | None:
    """The distrust threshold: the `quantile` of the spread over the validation conformers
    common to all members, on their own grids; None (logged) when they cannot be found.
    `data`: the members' full dataset, if in memory (default: their files).

    Returns:
      {"rule", "quantile", "conformers", "molecules", "threshold" (kcal/mol/e)}.
    """
    found = _validation_conformers(ensemble.members, data)
    if found is None:
        return None
    data, idx = found
    valid = data.subset(idx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PredictWarning)
        preds = ensemble.predict(valid)
    spreads = np.array([p.spread for p in preds])
    record = {
        "rule": f"quantile {quantile:g} of the spread on the members' validation conformers",
        "quantile": float(quantile),
        "conformers": len(idx),
        "molecules": len(set(np.asarray(valid.mol_id).tolist())),
        "threshold": float(np.quantile(spreads, quantile)),
    }
    log.info("ensemble distrust threshold: %s", record)
    return record
