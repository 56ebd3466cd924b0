"""Prediction with a trained DCMNet: the predictor, its output files and its picture.

The face hands on the wing's public names; `python -m dcmtune.predict` is
`dcmtune.predict.commands`.
"""

from dcmtune.predict.outputs import FORMAT, UNITS, write_extxyz, write_predictions
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
    "FORMAT",
    "MoleculePrediction",
    "PredictError",
    "Predictor",
    "SHELL",
    "UNITS",
    "default_batch_size",
    "load_model",
    "plot_prediction",
    "write_extxyz",
    "write_predictions",
]
