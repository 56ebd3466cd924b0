"""dcmtune: train and hyper-parameter-sweep DCMNet models (JAX/e3x, Ray Tune + Optuna).

The public API is small; names load lazily, so `import dcmtune` is cheap and the sweep driver
can use the numpy-only parts (configs, data) without importing JAX.
"""

import importlib

__version__ = "0.1.0"

_API = {
    "ExperimentConfig": "dcmtune.config",
    "ModelConfig": "dcmtune.config",
    "DataConfig": "dcmtune.config",
    "TrainingConfig": "dcmtune.config",
    "ConfigError": "dcmtune.config",
    "ESPData": "dcmtune.data",
    "DataError": "dcmtune.data",
    "load_dataset": "dcmtune.data",
    "make_synthetic": "dcmtune.synthetic",
    "DCMNet": "dcmtune.model",
    "fit": "dcmtune.train",
    "run_training": "dcmtune.train",
    "FitResult": "dcmtune.train",
    "CheckpointError": "dcmtune.checkpoint",
    "load_checkpoint": "dcmtune.analysis",
    "analyze_checkpoint": "dcmtune.analysis",
    "compare_checkpoints": "dcmtune.analysis",
    "analyze_training_history": "dcmtune.analysis",
    "load_spec": "dcmtune.search_space",
    "SweepSpec": "dcmtune.search_space",
    "SpecError": "dcmtune.search_space",
    "run_sweep": "dcmtune.sweep",
    "rank_experiment": "dcmtune.rank",
    "load_model": "dcmtune.predict",
    "Predictor": "dcmtune.predict",
    "PredictError": "dcmtune.predict",
}

__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'dcmtune' has no attribute {name!r}")


def __dir__():
    return __all__ + ["__version__"]
