"""The Tuner of a new sweep: the spec's seeded Optuna sampler in a searcher that tells Optuna
which trials the scheduler stopped (`tune_ext.PruningAwareOptunaSearch`), the spec's scheduler
on the `epoch` attribute (ASHA's rungs saved with the experiment; HyperBand's and median
stopping's start afresh on --resume), the logger callbacks, checkpoints scored on the sweep
metric. With several objectives (`run.objectives`) the searcher optimises all of them while the
scheduler and checkpoint scoring use the first (Tune's schedulers take one metric). Ray is
imported when a Tuner is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dcmtune.sweep import study
from dcmtune.sweep.spec import SweepSpec

__all__ = ["new_tuner", "sampler", "scheduler"]


def sampler(spec: SweepSpec):
    """The spec's Optuna sampler, seeded (`SearcherSpec.sampler`)."""
    import optuna

    s = spec.searcher
    if s.sampler == "tpe":
        return optuna.samplers.TPESampler(
            seed=s.seed, n_startup_trials=s.n_startup_trials, multivariate=s.multivariate
        )
    if s.sampler == "qmc":
        # Scrambled: an unscrambled Sobol sequence is the same for every seed.
        return optuna.samplers.QMCSampler(seed=s.seed, scramble=True)
    if s.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(
            seed=s.seed, n_startup_trials=s.n_startup_trials, with_margin=True
        )
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed, population_size=s.population_size)
    if s.sampler == "grid":
        from dcmtune.sweep.tune_ext import TuneGridSampler

        grid = {k: list(d.args) for k, d in spec.search.items()}
        return TuneGridSampler(grid, seed=s.seed)
    return optuna.samplers.RandomSampler(seed=s.seed)


def _searcher(spec: SweepSpec):
    """The Optuna search (its study in the spec's storage) under the spec's concurrency
    limit; with several objectives, one direction per objective."""
    from ray.tune.search import ConcurrencyLimiter

    from dcmtune.sweep.tune_ext import PruningAwareOptunaSearch

    run, s = spec.run, spec.searcher
    storage = study.open_storage(spec.study_storage) if spec.study_storage else None
    names = list(run.objective_metrics)
    searcher = PruningAwareOptunaSearch(
        metric=names if run.objectives else run.metric,
        mode=[o.mode for o in run.objectives] if run.objectives else run.mode,
        sampler=sampler(spec),
        study_name=spec.name,
        storage=storage,
        points_to_evaluate=[dict(p) for p in s.points_to_evaluate] or None,
        time_attr="epoch",
        max_t=spec.num_epochs,
    )
    if run.max_concurrent_trials:
        return ConcurrencyLimiter(searcher, max_concurrent=run.max_concurrent_trials)
    return searcher


def scheduler(spec: SweepSpec):
    """The spec's Tune scheduler on the `epoch` attribute (None: FIFO)."""
    from ray.tune.schedulers import ASHAScheduler, HyperBandScheduler, MedianStoppingRule

    s, max_t = spec.scheduler, spec.num_epochs
    if s.name == "asha":
        return ASHAScheduler(
            time_attr="epoch",
            max_t=max_t,
            grace_period=s.grace_period,
            reduction_factor=s.reduction_factor,
            brackets=s.brackets,
        )
    if s.name == "hyperband":
        return HyperBandScheduler(
            time_attr="epoch", max_t=max_t, reduction_factor=s.reduction_factor
        )
    if s.name == "median":
        return MedianStoppingRule(
            time_attr="epoch",
            grace_period=s.grace_period,
            min_samples_required=s.min_samples_required,
        )
    return None


def _scheduler(spec: SweepSpec, callbacks: Sequence[Any]) -> tuple[Any, list]:
    """(the scheduler; the callbacks: ASHA's state callback first, then `callbacks`, then the
    logger callbacks)."""
    from dcmtune.sweep.tune_ext import AshaStateCallback
    from dcmtune.sweep.tune_loggers import tune_callbacks

    cbs = list(callbacks) + tune_callbacks(spec.tracking, spec.name, str(spec.experiment_dir))
    chosen = scheduler(spec)
    if spec.scheduler.name == "asha":
        cbs.insert(0, AshaStateCallback(chosen))
    return chosen, cbs


def _stopper(spec: SweepSpec):
    """The trial-epoch budget (`run.max_trial_epochs`) as a Tune stopper, or None."""
    if spec.run.max_trial_epochs is None:
        return None
    from dcmtune.sweep.tune_ext import TrialEpochBudget

    return TrialEpochBudget(spec.run.max_trial_epochs)


def new_tuner(spec: SweepSpec, trainable, callbacks: Sequence[Any], verbose: int):
    """The Tuner of `spec` for `trainable`: searcher, scheduler, callbacks, checkpoints scored
    on the sweep metric, `max_failures` retries, trial directories trial_<id>."""
    from ray import tune

    from dcmtune.sweep.trainable import trial_dirname_creator

    run = spec.run
    scheduler, cbs = _scheduler(spec, callbacks)
    return tune.Tuner(
        trainable,
        param_space=spec.param_space(),
        tune_config=tune.TuneConfig(
            metric=run.metric,
            mode=run.mode,
            search_alg=_searcher(spec),
            scheduler=scheduler,
            num_samples=run.num_samples,
            reuse_actors=True,
            time_budget_s=run.time_budget_s,
            trial_dirname_creator=trial_dirname_creator,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=run.storage_path,
            callbacks=cbs,
            verbose=verbose,
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=run.num_to_keep,
                checkpoint_score_attribute=run.metric,
                checkpoint_score_order=run.mode,
            ),
            failure_config=tune.FailureConfig(max_failures=run.max_failures),
            stop=_stopper(spec),
            # POSIX storage: trials write straight into their directory in the experiment.
            # Object storage: they write into Tune's node-local trial directory, which Tune
            # uploads with every checkpoint and when the trial ends (dcmtune.sweep.trainable).
            sync_config=tune.SyncConfig(sync_artifacts=True),
        ),
    )
