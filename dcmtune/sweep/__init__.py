"""Sweeps with Ray Tune: the spec (`spec`, `space`, `sections`), the driver (`driver`: Tuner with
Optuna + ASHA, resume, debug), the trainable (`trainable`), trial resources (`resources`), the
experiment on its storage (`experiment_store`), the Optuna study (`study`), local Ray
(`local_ray`), the Tuner (`tuner`) and Tune extensions (`tune_ext`, `tune_loggers`);
`python -m dcmtune.sweep` (`commands`). Also the Ray tasks of `python -m dcmtune.data generate
--address` (`ray_generate`): the only wing that imports Ray. docs/architecture.md.

Import from the modules: this face stays empty so that no import of a light module (the spec)
loads Ray before `local_ray.prefer_loopback` has run.
"""


def __getattr__(name):
    # Compatibility for experiments written before the subpackages (docs/architecture.md):
    # their Tune state may name `dcmtune.sweep._trial_dirname`.
    if name == "_trial_dirname":
        from dcmtune.sweep.trainable import trial_dirname_creator

        return trial_dirname_creator
    raise AttributeError(f"module 'dcmtune.sweep' has no attribute {name!r}")
