"""Import alias (docs/architecture.md): Tune state written before the subpackages refers to
this module path (the trial directory names); it lives in `dcmtune.sweep.trainable`."""

from dcmtune.sweep.trainable import trial_dirname

__all__ = ["trial_dirname"]
