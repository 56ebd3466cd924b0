"""dcmtune: train and hyper-parameter-sweep DCMNet models (JAX/e3x, Ray Tune + Optuna).

The path of the data, with the module of each stage:

  data      .npz files -> validated, compact `ESPData`, grouped splits  data.py (layout.py,
                                                                         molgraph.py, grids.py,
                                                                         synthetic.py, qm.py)
  batch     masked batches in size buckets; device-resident or streamed data.py (make_batch,
                                                                         group_by_bucket),
                                                                         batching.py
  model     DCMNet: n_dcm charges and their positions per atom          model.py
  loss      ESP/dipole of the charges, per-molecule terms, metric sums  physics.py, loss.py,
                                                                         metrics.py (the registry)
  step      pure jitted train_step / predict_step on one TrainState     train.py, schedules.py,
                                                                         programs.py (traces kept
                                                                         across processes)
  epoch     fit(): epochs, EMA evaluation, checkpoints, a Reporter      train.py, checkpoint.py,
                                                                         _io.py, train_cli.py
  trial     one Ray Tune trial around fit()                              trainable.py, xla_env.py
  sweep     Tuner: Optuna TPE + ASHA over a YAML search space           search_space.py, sweep.py,
                                                                         experiment_store.py
  storage   local, shared or object storage (s3://, gs://) of sweeps    storage.py
  rank      re-evaluate the best checkpoints on held-out molecules     rank.py, analysis.py,
                                                                         baselines.py, report.py

Commands: `python -m dcmtune.{train,data,sweep,rank,analysis}`; each is a thin front end on the
kit in cli.py. The public API is small; names load lazily, so `import dcmtune` is cheap and the
sweep driver can use the numpy-only parts (configs, data) without importing JAX.
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
