"""Prediction with a trained DCMNet: the predictor, its output files and its picture.

The face hands on the wing's public names; `python -m dcmtune.predict` is
`dcmtune.predict.commands`.
"""

from dcmtune.predict.domain import PredictWarning, TrainingDomain
from dcmtune.predict.ensemble import Ensemble, EnsemblePrediction, load_ensemble
from dcmtune.predict.frames import to_global, to_local
from dcmtune.predict.inputs import Molecule, smiles_molecules
from dcmtune.predict.outputs import (
    ENSEMBLE_FORMAT,
    FORMAT,
    UNITS,
    write_ensemble_predictions,
    write_extxyz,
    write_pqr,
    write_predictions,
    write_sites,
)
from dcmtune.predict.plot import plot_prediction
from dcmtune.predict.predictor import (
    SHELL,
    MoleculePrediction,
    PredictError,
    Predictor,
    default_batch_size,
    load_model,
)

__all__ = [
    "ENSEMBLE_FORMAT",
    "Ensemble",
    "EnsemblePrediction",
    "FORMAT",
    "Molecule",
    "MoleculePrediction",
    "PredictError",
    "PredictWarning",
    "Predictor",
    "SHELL",
    "TrainingDomain",
    "UNITS",
    "default_batch_size",
    "load_ensemble",
    "load_model",
    "plot_prediction",
    "smiles_molecules",
    "to_global",
    "to_local",
    "write_ensemble_predictions",
    "write_extxyz",
    "write_pqr",
    "write_predictions",
    "write_sites",
]
