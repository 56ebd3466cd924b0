"""Import alias (docs/architecture.md): Tune state written before the subpackages pickled
these callbacks under this module path; they live in `dcmtune.sweep.tune_loggers`."""

from dcmtune.sweep.tune_loggers import NoTuneEvents, WandbCallback

__all__ = ["NoTuneEvents", "WandbCallback"]
