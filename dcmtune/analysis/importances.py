"""Which searched hyper-parameters mattered: Optuna's importances over a sweep's trials.

`param_importances` rebuilds a study from the ranked trials (each at its best epoch, as the
ranking sees them) and asks Optuna's default evaluator (PED-ANOVA) how much of the spread of the
metric each searched hyper-parameter explains. Optuna is imported when it is needed.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["distributions", "param_importances"]

log = logging.getLogger(__name__)


def distributions(search: Mapping[str, Mapping[str, Sequence]]) -> dict:
    """Optuna distributions of a spec's search space as recorded ({key: {kind: args}})."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, d in search.items():
        ((kind, args),) = d.items()
        if kind == "choice":
            out[key] = CategoricalDistribution(list(args))
        elif kind == "randint":
            out[key] = IntDistribution(int(args[0]), int(args[1]))
        elif kind == "quniform" and all(isinstance(a, int) for a in args):
            out[key] = IntDistribution(args[0], args[1], step=args[2])
        elif kind == "quniform":
            out[key] = FloatDistribution(args[0], args[1], step=args[2])
        else:
            out[key] = FloatDistribution(args[0], args[1], log=kind == "loguniform")
    return out


def param_importances(
    points: Sequence[Mapping[str, Any]],
    values: Sequence[float],
    search: Mapping[str, Mapping[str, Sequence]],
) -> dict[str, float]:
    """How much each searched hyper-parameter explains of the metric, summing to 1.

    Args:
      points: Each trial's searched point (dotted key -> value).
      values: Each trial's metric (its best epoch's, as ranked); non-finite ones are skipped.
      search: The spec's search space as recorded ({key: {kind: args}}).

    Returns:
      {key: importance}, most important first (Optuna's default evaluator, PED-ANOVA); empty
      with fewer than 3 usable trials or nothing searched.
    """
    import optuna

    dists = distributions(search)
    trials = []
    for point, value in zip(points, values, strict=True):
        if value is None or not math.isfinite(float(value)) or not set(dists) <= set(point):
            continue
        params = {k: point[k] for k in dists}
        try:
            trials.append(
                optuna.trial.create_trial(params=params, distributions=dists, value=float(value))
            )
        except ValueError as e:  # a value outside the recorded space (an edited spec)
            log.info("importances: trial point %s skipped (%s)", params, e)
    if not dists or len(trials) < 3:
        return {}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" line
    try:
        study = optuna.create_study(direction="minimize")  # every metric is lower-is-better
        study.add_trials(trials)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-feature and few-trials warnings
            result = optuna.importance.get_param_importances(study)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return {k: float(v) for k, v in result.items()}
