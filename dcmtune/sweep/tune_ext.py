"""Small extensions of Ray Tune: truthful early stopping for Optuna, a budget in trial-epochs,
resumable ASHA.

1. `PruningAwareOptunaSearch`. Ray's `OptunaSearch` tells every finished trial to Optuna as
COMPLETE with its last value, so a trial that ASHA stopped after 2 of 100 epochs looks like a
finished trial with a poor value, and TPE models the truncated value as if it were final. Here:

- every epoch's metric is reported to the Optuna trial as an intermediate value, at step =
  the `epoch` the trial reported (not Ray's training_iteration, which restarts differently
  after a resume);
- a trial that ends before `max_t` epochs because the scheduler stopped it is told as
  PRUNED; Optuna then takes its last intermediate value as its value, and TPE ranks pruned
  trials behind complete ones by how far they got;
- a trial that diverged (a non-finite loss) is FAIL, like a crash: its last finite value says
  nothing about the point, and TPE must not model it as a good-but-unfinished one;
- a trial that ran all `max_t` epochs is COMPLETE with its *best* epoch's metric (the epoch
  whose checkpoint is kept and ranked), not the last one;
- a trial that crashed is FAIL.

With several objectives (`metric` and `mode` lists; the first is the validation error the
scheduler uses) Optuna takes no intermediate values, so none are reported; a complete trial is
told every objective's value at its best epoch by the first objective (its checkpoint's epoch),
a scheduler-stopped one PRUNED without values (the samplers then rank it behind every complete
trial). Tune's own `metric` (the first objective, for the scheduler) does not replace the list.

With an Optuna storage (sqlite, ...), `--resume` keeps "every trial exactly once":

- `points_to_evaluate` are enqueued only where the study holds no live or finished trial with
  those values (Ray calls `set_search_properties` again on restore, which would enqueue them a
  second time into the persistent study);
- after the restore, study trials asked after the last experiment snapshot (RUNNING, unknown to
  the restored searcher, so no Tune trial will ever report to them) are marked FAIL, and a
  point whose only trial was such an orphan is enqueued again;
- trials told to Optuna after the snapshot (Tune re-runs them from their checkpoint) are not
  reported to or told again (Optuna refuses to update a finished trial).

2. `TrialEpochBudget`, a Tune stopper: ends the sweep once its trials have run a budget of
epochs in total (`run.max_trial_epochs`).

3. `AshaStateCallback`. Ray saves the searcher with the experiment but not the scheduler: after
`Tuner.restore` ASHA would start with empty rungs and let every resumed trial through its next
rung. This callback stores the rungs with the experiment state (Tune checkpoints callback
state) and puts them back into the scheduler on restore.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import optuna
from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import Stopper

__all__ = ["PruningAwareOptunaSearch", "AshaStateCallback", "TuneGridSampler", "TrialEpochBudget"]

log = logging.getLogger(__name__)


class PruningAwareOptunaSearch(OptunaSearch):
    """`OptunaSearch` that records scheduler-stopped trials as PRUNED.

    Args:
      time_attr: The result key counting epochs (ASHA's time attribute).
      max_t: Epochs of a complete trial (training.num_epochs).
      **kwargs: As for `ray.tune.search.optuna.OptunaSearch`; `metric` and `mode` may be
        lists (several objectives, the first one's best epoch chooses the values told).
    """

    def __init__(self, *args: Any, time_attr: str = "epoch", max_t: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._time_attr = time_attr
        self._max_t = int(max_t)
        self._best: dict[str, float] = {}
        self._best_values: dict[str, list[float]] = {}
        self._steps: dict[str, set[int]] = {}

    @property
    def _objectives(self) -> list[str]:
        return list(self._metric) if isinstance(self._metric, list) else [self._metric]

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        if isinstance(self._metric, list):  # Tune passes the scheduler's (first) metric only
            metric, mode = None, None
        return super().set_search_properties(metric, mode, config, **spec)

    # ----------------------------------------------------------------- exactly once on resume

    def _setup_study(self, mode):
        points, self._points_to_evaluate = self._points_to_evaluate, []
        try:
            super()._setup_study(mode)  # creates (or loads) the study, enqueues nothing
        finally:
            self._points_to_evaluate = points
        self._enqueue_missing_points()

    def _enqueue_missing_points(self) -> None:
        """Enqueues each point to evaluate unless a trial with its values is waiting, running
        or finished (FAIL does not count: such a point has not been evaluated)."""
        if not self._points_to_evaluate or self._ot_study is None:
            return
        trials = [
            t
            for t in self._ot_study.get_trials(deepcopy=False)
            if t.state != optuna.trial.TrialState.FAIL
        ]
        for point in self._points_to_evaluate:
            if not any(
                _same_params(t.system_attrs.get("fixed_params", t.params), point) for t in trials
            ):
                self._ot_study.enqueue_trial(dict(point))

    def __setstate__(self, state: dict) -> None:
        state.setdefault("_best_values", {})  # searchers pickled before several objectives
        self.__dict__.update(state)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self.__dict__.setdefault("_best_values", {})
        self._reconcile_with_study()

    def _reconcile_with_study(self) -> None:
        """Makes the restored searcher and the persistent study agree (see the module doc)."""
        if self._ot_study is None:
            return
        states = optuna.trial.TrialState
        tracked = {t._trial_id: tid for tid, t in self._ot_trials.items()}
        orphans = 0
        for t in self._ot_study.get_trials(deepcopy=False):
            if t._trial_id in tracked:
                if t.state.is_finished() and tracked[t._trial_id] not in self._completed_trials:
                    self._completed_trials.add(tracked[t._trial_id])
                    log.info(
                        "trial %s was told to Optuna after the last snapshot (%s)",
                        tracked[t._trial_id],
                        t.state.name,
                    )
            elif t.state == states.RUNNING:
                self._ot_study.tell(t.number, state=states.FAIL)
                orphans += 1
        if orphans:
            log.warning(
                "marked %d Optuna trial(s) FAIL: asked after the last experiment "
                "snapshot, so no Tune trial will report to them",
                orphans,
            )
        self._enqueue_missing_points()

    def unfinished_trial_ids(self) -> set[str]:
        """Tune trial ids suggested by this searcher and not yet told to Optuna."""
        return set(self._ot_trials) - set(self._completed_trials)

    # ----------------------------------------------------------------- results

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials:
            return
        self._record(trial_id, result)

    def _record(self, trial_id: str, result: dict | None) -> None:
        """Reports the result's (first) metric as an intermediate value at its epoch (one
        objective), and keeps the trial's best epoch's values."""
        names = self._objectives
        if not result or names[0] not in result or self._time_attr not in result:
            return
        value, step = result[names[0]], int(result[self._time_attr])
        if value is None or not math.isfinite(float(value)):
            return
        steps = self._steps.setdefault(trial_id, set())
        if step in steps:
            return  # an epoch already reported (e.g. replayed after a resume)
        if len(names) == 1:
            try:
                self._ot_trials[trial_id].report(float(value), step)
            except (RuntimeError, ValueError) as e:  # finished meanwhile (e.g. before a resume)
                log.info("trial %s: not reported to Optuna (%s)", trial_id, e)
                return
        elif not all(_finite(result.get(m)) for m in names):
            return
        steps.add(step)
        best = self._best.get(trial_id)
        mode = self.mode[0] if isinstance(self.mode, list) else self.mode
        if best is None or (float(value) < best if mode == "min" else float(value) > best):
            self._best[trial_id] = float(value)
            self._best_values[trial_id] = [float(result[m]) for m in names]

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if trial_id in self._completed_trials:
            return
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:  # never suggested by this searcher
            return
        self._record(trial_id, result)  # a STOP decision skips on_trial_result for the last one
        epochs = int(result.get(self._time_attr, 0)) if result else 0
        diverged = bool(result.get("diverged")) if result else False
        if error or diverged:
            state, value = optuna.trial.TrialState.FAIL, None
        elif epochs < self._max_t or trial_id not in self._best:
            state, value = optuna.trial.TrialState.PRUNED, None
        elif len(self._objectives) > 1:
            state, value = optuna.trial.TrialState.COMPLETE, self._best_values[trial_id]
        else:
            state, value = optuna.trial.TrialState.COMPLETE, self._best[trial_id]
        try:
            self._ot_study.tell(ot_trial, value, state=state)
        except (ValueError, RuntimeError) as e:  # e.g. the trial was already told
            log.warning("could not tell Optuna trial %s as %s: %s", trial_id, state.name, e)
        log.debug(
            "optuna trial %s -> %s (%s epochs, value %s)", trial_id, state.name, epochs, value
        )
        self._completed_trials.add(trial_id)
        self._best.pop(trial_id, None)
        self._best_values.pop(trial_id, None)
        self._steps.pop(trial_id, None)


def _finite(v: Any) -> bool:
    return v is not None and math.isfinite(float(v))


def _same_params(a: dict, b: dict) -> bool:
    """Whether two parameter dicts hold the same values (floats compared to 1e-12)."""
    if set(a) != set(b):
        return False
    for k, v in b.items():
        w = a[k]
        if (
            isinstance(v, (int, float))
            and isinstance(w, (int, float))
            and not (isinstance(v, bool) or isinstance(w, bool))
        ):
            if not math.isclose(float(v), float(w), rel_tol=1e-12, abs_tol=0.0):
                return False
        elif v != w:
            return False
    return True


class TuneGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler for a Tune sweep. Optuna's stops its study (`Study.stop`) once
    every grid point has been told, which only works inside `Study.optimize`; under Tune it
    would fail the last trial's tell. Tune ends the sweep itself (run.num_samples is the grid's
    size), so this sampler never stops the study."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


class TrialEpochBudget(Stopper):
    """Ends the sweep once its trials have run `budget` epochs in total.

    Each trial counts the highest epoch it reported, so an epoch reported again after a trial
    resumed from a checkpoint counts once. The stopper is saved with the experiment (Tune
    pickles the run config), so `--resume` continues the count from the last snapshot. Trials
    running when the budget is reached are stopped, as with `run.time_budget_s`.
    """

    def __init__(self, budget: int, time_attr: str = "epoch"):
        self._budget = int(budget)
        self._time_attr = time_attr
        self._epochs: dict[str, int] = {}

    @property
    def used(self) -> int:
        return sum(self._epochs.values())

    def __call__(self, trial_id: str, result: dict) -> bool:
        epoch = result.get(self._time_attr)
        if epoch is not None:
            self._epochs[trial_id] = max(self._epochs.get(trial_id, 0), int(epoch))
        return False

    def stop_all(self) -> bool:
        return self.used >= self._budget


class AshaStateCallback(Callback):
    """Saves and restores the rungs of an ASHA scheduler with the experiment state.

    Pass the same scheduler object that goes into `TuneConfig(scheduler=...)`: both are
    pickled together into the experiment, so after `Tuner.restore` this callback still points at
    the restored scheduler.
    """

    def __init__(self, scheduler: AsyncHyperBandScheduler):
        self._scheduler = scheduler

    def get_state(self) -> dict | None:
        # ASHA keeps, per bracket, rungs of (milestone, {trial_id: signed metric}).
        brackets = [
            [(float(m), dict(rec)) for m, rec in b._rungs] for b in self._scheduler._brackets
        ]
        return {"brackets": brackets, "num_stopped": self._scheduler._num_stopped}

    def set_state(self, state: dict) -> None:
        saved = state.get("brackets", [])
        if len(saved) != len(self._scheduler._brackets):
            log.warning(
                "ASHA state has %d brackets, the scheduler %d; not restored",
                len(saved),
                len(self._scheduler._brackets),
            )
            return
        for bracket, rungs in zip(self._scheduler._brackets, saved, strict=True):
            by_milestone = {m: rec for m, rec in rungs}
            for milestone, recorded in bracket._rungs:
                recorded.update(by_milestone.get(float(milestone), {}))
        self._scheduler._num_stopped = state.get("num_stopped", 0)
        log.info("restored ASHA rungs: %s", [[len(r) for _, r in b] for b in saved])
