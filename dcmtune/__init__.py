"""dcmtune: train and hyper-parameter-sweep DCMNet models (JAX/e3x, Ray Tune + Optuna).

The package is a small kit and seven wings in the order the data flows (docs/architecture.md):

  kit        cli, config, metrics, units, storage, provenance, _io, _yaml   (imports no wing)
  data/      .npz -> validated `ESPData` (load), splits, batches and size buckets, grids,
             molecular graphs, synthetic sets, classical baselines     python -m dcmtune.data
  qm/        molecule specs, SMILES conformers, the PySCF generator, verify
  model/     DCMNet (e3x), physics (ESP, dipole), loss terms and metric sums
  train/     Hparams, step (TrainState, pure jitted steps), feed, loop (fit), checkpoints,
             restarts, kept programs, environment, TensorBoard/tracking  python -m dcmtune.train
  analysis/  checkpoints re-evaluated, history, ranking of a sweep, report
                                         python -m dcmtune.analysis, python -m dcmtune.rank
  sweep/     spec (space, sections), driver (Tuner: Optuna + ASHA), trainable, resources,
             experiment store, Optuna study, local Ray, Tune extensions   python -m dcmtune.sweep
  predict/   the predictor, ensembles, outputs, plot                      python -m dcmtune.predict

The public API is small; names load lazily, so `import dcmtune` is cheap and the sweep driver
can use the numpy-only parts (configs, data) without importing JAX.
"""

import importlib

__version__ = "0.1.0"

# Public name -> "module" (the same name there) or "module:name".
_API = {
    "ExperimentConfig": "dcmtune.config",
    "ModelConfig": "dcmtune.config",
    "DataConfig": "dcmtune.config",
    "TrainingConfig": "dcmtune.config",
    "ConfigError": "dcmtune.config",
    "ESPData": "dcmtune.data.dataset",
    "DataError": "dcmtune.data.file_format",
    "load_dataset": "dcmtune.data.load",
    "make_synthetic": "dcmtune.data.synthetic",
    "DCMNet": "dcmtune.model.dcmnet",
    "Hparams": "dcmtune.train.hparams",
    "fit": "dcmtune.train.loop",
    "run_training": "dcmtune.train.loop",
    "FitResult": "dcmtune.train.loop",
    "CheckpointError": "dcmtune.train.checkpoints",
    "load_checkpoint": "dcmtune.analysis.checkpoints:open_checkpoint",
    "analyze_checkpoint": "dcmtune.analysis.evaluate",
    "compare_checkpoints": "dcmtune.analysis.evaluate",
    "analyze_training_history": "dcmtune.analysis.history",
    "load_spec": "dcmtune.sweep.spec",
    "SweepSpec": "dcmtune.sweep.spec",
    "SpecError": "dcmtune.sweep.space",
    "run_sweep": "dcmtune.sweep.driver",
    "rank_experiment": "dcmtune.analysis.rank",
    "load_model": "dcmtune.predict.predictor",
    "load_ensemble": "dcmtune.predict.ensemble",
    "list_models": "dcmtune.models",
    "Predictor": "dcmtune.predict.predictor",
    "PredictError": "dcmtune.predict.predictor",
}

__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        module, _, attr = _API[name].partition(":")
        return getattr(importlib.import_module(module), attr or name)
    raise AttributeError(f"module 'dcmtune' has no attribute {name!r}")


def __dir__():
    return __all__ + ["__version__"]
