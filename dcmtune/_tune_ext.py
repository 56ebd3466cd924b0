"""Import alias (docs/architecture.md): Tune state written before the subpackages pickled
these classes under this module path; they live in `dcmtune.sweep.tune_ext`."""

from dcmtune.sweep.tune_ext import AshaStateCallback, PruningAwareOptunaSearch

__all__ = ["AshaStateCallback", "PruningAwareOptunaSearch"]
