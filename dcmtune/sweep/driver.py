"""The sweep driver: a hyper-parameter sweep of DCMNet with Ray Tune, and its debug trial.

Optuna's TPE proposes trials, ASHA stops poor ones early (told to Optuna as PRUNED), every
trial trains with `dcmtune.train.loop.fit` in its own trial directory (`dcmtune.sweep.trainable`),
and the best trials are ranked at the end (`dcmtune.analysis.rank`). Local Ray by default; an
existing cluster with `address`. A local Ray listens on 127.0.0.1 only, unless the dashboard
host is another address (`dcmtune.sweep.local_ray`).

The library entry points are `prepare` (the spec's data, checked with numpy only), `run_sweep`
and `run_debug` (one trial in this process, no Ray); the command is `dcmtune.sweep.commands`.
Bad input (spec, data, resources) raises SpecError/DataError before Ray starts and before
anything is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dcmtune import metrics as metrics_mod
from dcmtune._io import plain
from dcmtune.cli import one_line
from dcmtune.data.dataset import ESPData
from dcmtune.data.load import load_dataset
from dcmtune.data.splits import split_dataset
from dcmtune.sweep import local_ray, study
from dcmtune.sweep.experiment_store import (
    check_experiment_dir,
    driver_lock,
    set_aside_orphans,
    sync_study,
    write_spec_record,
)
from dcmtune.sweep.resources import (
    TrialResources,
    detect_local_gpus,
    resolve_resources,
    trial_env_vars,
)
from dcmtune.sweep.spec import SpecError, SweepSpec, objective_keys
from dcmtune.sweep.tuner import new_tuner
from dcmtune.train.environment import MEM_FRACTION_VAR, apply_defaults, compilation_cache_env
from dcmtune.train.tracking import run_reporters

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """A validated spec and its data, ready for Ray (nothing here imported Ray or JAX)."""

    spec: SweepSpec
    data: ESPData
    num_train: int
    split_sizes: dict[str, tuple[int, int]]  # split -> (molecules, conformers)


def prepare(spec: SweepSpec, data: ESPData | None = None) -> _Prepared:
    """Loads the data with numpy and checks what depends on it: batch sizes against the
    training split, and that the sweep metric exists for this data.

    Raises:
      SpecError / DataError: one line naming the key.
    """
    base = spec.base
    if data is None:
        data = load_dataset(
            base.data.data_files, base.model.max_atomic_number, base.data.dipole_units
        )
    d = base.data
    try:
        splits = split_dataset(data, d)
    except ValueError as e:
        raise SpecError(f"data: {e}") from None
    n_train = len(splits["train"])

    def largest(key: str) -> tuple[int, str]:
        dist = spec.search.get(key)
        if dist is None:
            section, field = key.split(".")
            return getattr(getattr(base, section), field), f"training.{field}"
        hi = max(dist.args) if dist.kind == "choice" else dist.args[1]
        return int(hi), f"search.{key}"

    (b, b_key), (k, k_key) = (
        largest("training.batch_size"),
        largest("training.gradient_accumulation_steps"),
    )
    if b * k > n_train:
        key = b_key if b_key.startswith("search.") or not k_key.startswith("search.") else k_key
        raise SpecError(
            f"{key}: batch_size x gradient_accumulation_steps can reach {b} x {k} = "
            f"{b * k}, more than the {n_train} training conformers"
        )
    for key, metric in objective_keys(spec.run):
        if "_mono_" in metric and data.mono is None:
            raise SpecError(f"{key}: {metric} needs reference charges, but the data has no 'mono'")
        if metric.endswith("_dipole_mae") and data.dipole is None:
            raise SpecError(f"{key}: {metric} needs reference dipoles, but the data has no 'Dxyz'")
    sizes = {k: (len(set(data.mol_id[idx].tolist())), len(idx)) for k, idx in splits.items()}
    return _Prepared(spec, data, n_train, sizes)


def _local_resources() -> dict[str, float]:
    """What a local Ray started here would have (Ray's own rule for CPUs and GPUs)."""
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(detect_local_gpus())}


def _check_local_resources(spec: SweepSpec) -> None:
    """Refuses resources a local Ray could not give, before starting it."""
    resolve_resources(spec.run.resources, _local_resources())


# --------------------------------------------------------------------------- outcome


@dataclasses.dataclass
class BestTrial:
    """The best trial by the sweep metric at its best epoch."""

    trial_id: str
    path: str
    config: dict
    epoch: int
    metrics: dict
    checkpoint: str | None


@dataclasses.dataclass
class SweepOutcome:
    """What `run_sweep` hands back.

    Attributes:
      status: "completed", or "interrupted" (resume with --resume).
      experiment_dir: <storage_path>/<name>.
      results: The Ray Tune ResultGrid.
      best: The best trial (None if no trial reported the metric).
      resources: The resources of one trial.
      ranking: Whatever `_rank` returned (None until ranking exists).
    """

    status: str
    experiment_dir: Path
    results: Any
    best: BestTrial | None
    resources: Any
    ranking: Any = None


def _best_trial(results, metric: str) -> BestTrial | None:
    """The best trial by `metric` (lower is better) at its best epoch, among trials that neither
    diverged nor errored (the same trials the ranking lets compete)."""
    best = None
    for res in results:
        df = res.metrics_dataframe
        if res.error is not None or df is None or metric not in df or "epoch" not in df:
            continue
        if "diverged" in df and (df["diverged"].fillna(0).astype(float) > 0).any():
            continue
        ok = df[df[metric].apply(lambda v: v is not None and math.isfinite(float(v)))]
        if ok.empty:
            continue
        row = ok.loc[ok[metric].idxmin()]
        if best is None or float(row[metric]) < float(best[1][metric]):
            best = (res, row, ok)
    if best is None:
        return None
    res, row, df = best
    try:
        ckpt = res.get_best_checkpoint(metric, "min")
    except RuntimeError:
        ckpt = None
    keep = [
        c
        for c in df.columns
        if c.startswith(("train_", "valid_"))
        or c in ("epoch", "lr", "best_epoch")
        or c in metrics_mod.COST_METRICS
    ]
    return BestTrial(
        trial_id=str(row.get("trial_id", Path(res.path).name)),
        path=str(res.path),
        config=dict(res.config or {}),
        epoch=int(row["epoch"]),
        metrics={c: plain(row[c]) for c in keep},
        checkpoint=ckpt.path if ckpt is not None else None,
    )


def _rank(experiment_dir: Path, spec: SweepSpec, results, data: ESPData) -> Any:
    """Ranks the best `spec.rank.top_k` trials, re-evaluated on `spec.rank.split` of `data`
    (the sweep's dataset), and writes the report into `experiment_dir`.

    The re-evaluation runs here, in the driver, after all trials have ended. If JAX is not
    loaded yet it is loaded on the CPU (the driver never starts a GPU backend; ranking a few
    checkpoints on a test split is cheap), sharing the trials' compilation cache.

    Returns:
      The ranking DataFrame, or None when ranking was not possible (logged, one line).
    """
    if "jax" not in sys.modules:
        apply_defaults({"JAX_PLATFORMS": "cpu", **compilation_cache_env(spec.run.jax_cache_dir)})
    from dcmtune.analysis.rank import rank_experiment
    from dcmtune.analysis.ranking import RankError

    where = spec.experiment_uri if spec.remote else experiment_dir
    try:
        return rank_experiment(
            where,
            top_k=spec.rank.top_k,
            split=spec.rank.split,
            data=data,
            metric=spec.run.metric,
            mode=spec.run.mode,
            objectives=spec.run.objective_metrics if spec.run.objectives else None,
            select=spec.rank.select,
            local_copy=experiment_dir if spec.remote else None,
        )
    except RankError as e:
        log.warning("ranking skipped: %s", e)
        return None


# --------------------------------------------------------------------------- Ray


def _connect(
    address: str | None,
    dashboard: bool,
    dashboard_host: str,
    env: dict | None,
    echo: Callable[[str], None],
    dashboard_port: int | None = None,
) -> bool:
    """Starts local Ray or connects to `address`. Returns whether this call started it."""
    import ray

    if ray.is_initialized():
        log.info("using the Ray session already running in this process")
        return False
    if address:
        ctx = ray.init(address=address, logging_level=logging.WARNING)
        if dashboard:
            echo("--dashboard: the cluster's own dashboard settings apply")
    else:
        ports = {"dashboard_port": dashboard_port} if dashboard_port else {}
        ctx = ray.init(
            include_dashboard=dashboard,
            dashboard_host=dashboard_host,
            runtime_env={"env_vars": env or {}},
            logging_level=logging.WARNING,
            **ports,
        )
        if dashboard_host in local_ray.LOOPBACK_HOSTS and not local_ray.on_loopback():
            log.warning(
                "local Ray listens on all network interfaces (it was imported before "
                "dcmtune could ask for 127.0.0.1; see dcmtune.local_ray)"
            )
    url = getattr(ctx, "dashboard_url", None)
    if dashboard and url:
        echo(f"Ray dashboard: http://{url}")
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled":
            echo(
                "  it asks for Ray's auth token: print it with `ray get-auth-token` (stored in "
                "~/.ray/auth_token)"
            )
        if dashboard_host not in ("127.0.0.1", "localhost"):
            echo(
                f"  warning: the dashboard listens on {dashboard_host}, reachable from the network"
            )
    return True


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (SLURM, Kubernetes) stops the sweep like Ctrl-C: Tune saves the experiment and
    returns, and `--resume` continues it. Only in the main thread (where signals arrive)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame):
        log.warning("SIGTERM: stopping the sweep gracefully (resume with --resume)")
        signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _RestoreFailed(Exception):
    """Ray Tune could not restore the experiment (it would start a new one in its place)."""


class _RefuseSilentRestart(logging.Handler):
    """Ray Tune logs "Failed to restore the run state." and then starts num_samples *new*
    trials in the old experiment. This handler turns that log record into an exception that
    leaves `Tuner.fit` before any new trial starts."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Failed to restore the run state"):
            cause = record.exc_info[1] if record.exc_info else None
            raise _RestoreFailed(one_line(cause) if cause is not None else "unknown cause")


def run_sweep(spec: SweepSpec, *, resume: bool = False, **kwargs) -> SweepOutcome:
    """Runs (or with `resume`, finishes) the sweep `spec`; see `_run_sweep` for the arguments.

    One driver per experiment (a lock file), and SIGTERM stops it gracefully like Ctrl-C
    (Tune saves the experiment; `--resume` continues it).

    Raises:
      SpecError / DataError: bad input, before anything is written; SpecError also when
        another driver holds the experiment or Ray Tune cannot restore it.
    """
    prep = prepare(spec, kwargs.pop("data", None))
    check_experiment_dir(spec, resume)
    with driver_lock(spec.experiment_dir):
        return _run_sweep(spec, resume=resume, data=prep.data, **kwargs)


def _run_sweep(
    spec: SweepSpec,
    *,
    resume: bool = False,
    address: str | None = None,
    dashboard: bool = False,
    dashboard_host: str = "127.0.0.1",
    dashboard_port: int | None = None,
    data: ESPData | None = None,
    callbacks: Sequence[Any] = (),
    verbose: int = 1,
    echo: Callable[[str], None] = log.info,
) -> SweepOutcome:
    """Runs (or with `resume`, finishes) the sweep `spec`.

    Args:
      spec: A validated spec (`load_spec`).
      resume: Restore <storage_path>/<name> (searcher, scheduler and trials) and finish it.
      address: An existing Ray cluster ("auto" or host:port); None starts local Ray (or uses a
        Ray session already initialised in this process).
      dashboard, dashboard_host, dashboard_port: Start the Ray dashboard on this host and port
        (local Ray only). A local Ray listens on 127.0.0.1 only unless dashboard_host is
        another address (`dcmtune.sweep.local_ray`).
      data: The dataset; loaded from the spec when None.
      callbacks: Extra Tune callbacks (a resumed experiment keeps its original ones).
      verbose: Tune's console verbosity (0 silent, 1 status tables, 2 also results).
      echo: Where one-line progress messages go (the CLI prints them).

    Raises:
      SpecError / DataError: bad input, before anything is written.
    """
    if address is None:
        local_ray.prefer_loopback(dashboard_host)  # before Ray is imported
    from dcmtune.sweep.trainable import TrialSettings, make_trainable

    prep = _Prepared(spec, data, 0, {}) if data is not None else prepare(spec)
    run = spec.run
    # 1. Ray, and the resources of one trial (decided before Ray starts where we can).
    resources, env = _start_ray(spec, address, dashboard, dashboard_host, dashboard_port, echo)
    # 2. The trainable: data through the object store, settings shared by all trials. Trials
    # write in place on POSIX storage; on object storage node-locally, uploaded by Tune.
    settings = TrialSettings(
        base=spec.base.to_dict(),
        metric=run.metric,
        mode=run.mode,
        checkpoint_every=run.checkpoint_every,
        env=env,
        experiment_dir="" if spec.remote else str(spec.experiment_dir),
        costs=run.costs,
    )
    trainable = make_trainable(prep.data, settings, resources)
    # 3. The Tuner: restored, or new with its searcher and scheduler.
    tuner = _tuner(spec, trainable, resume, callbacks, verbose, echo)
    with _sigterm_as_interrupt():  # after ray.init, which installs its own SIGTERM handler
        try:
            results = _fit(tuner, spec, resume)
        finally:
            sync_study(spec, up=True)
        # 4. Outcome, and the ranking of a complete sweep.
        return _outcome(spec, results, resources, prep.data)


def _start_ray(
    spec: SweepSpec,
    address: str | None,
    dashboard: bool,
    dashboard_host: str,
    dashboard_port: int | None,
    echo: Callable[[str], None],
) -> tuple[TrialResources, dict[str, str]]:
    """Starts local Ray (or connects to `address`) and resolves one trial's resources and
    environment on the cluster it finds; refuses resources the cluster cannot give."""
    import ray

    run = spec.run
    if address is None and not ray.is_initialized():
        resources = resolve_resources(run.resources, _local_resources())
        env = trial_env_vars(resources, run.jax_cache_dir)
        started = _connect(None, dashboard, dashboard_host, env, echo, dashboard_port)
    else:
        started = _connect(address, dashboard, dashboard_host, None, echo)
    try:
        cluster = ray.cluster_resources()
        resources = resolve_resources(run.resources, cluster)
    except SpecError:
        if started:
            ray.shutdown()
        raise
    env = trial_env_vars(resources, run.jax_cache_dir)
    Path(run.jax_cache_dir).mkdir(parents=True, exist_ok=True)
    share = env.get(MEM_FRACTION_VAR)
    echo(
        f"cluster: {cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs; per trial: "
        f"{resources.cpu:g} CPU, {resources.gpu:g} GPU"
        + (f" (XLA memory fraction {share})" if share else " (CPU trial)")
        + f"; at most {run.max_concurrent_trials or 'as many as fit'} at once"
    )
    return resources, env


def _tuner(
    spec: SweepSpec,
    trainable,
    resume: bool,
    callbacks: Sequence[Any],
    verbose: int,
    echo: Callable[[str], None],
):
    """The Tuner restored from the experiment (`resume`), or a new one (its spec recorded)."""
    from ray import tune

    run = spec.run
    if resume:
        echo(f"resuming {spec.experiment_uri}")
        sync_study(spec, up=False)
        tuner = tune.Tuner.restore(
            spec.experiment_uri,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
        )
    else:
        tuner = new_tuner(spec, trainable, callbacks, verbose)
        write_spec_record(spec)
    echo(
        f"experiment: {spec.experiment_uri} ({run.num_samples} trials, {_objectives_text(spec)}, "
        f"{spec.num_epochs} epochs max)"
    )
    if spec.remote:
        echo(f"local copy (lock, Optuna journal, ranking): {spec.experiment_dir}")
    echo(
        f"watch: tensorboard --logdir {spec.experiment_uri}"
        + (
            f"  |  optuna-dashboard {_dashboard_arg(spec.study_storage)}"
            if spec.study_storage
            else ""
        )
    )
    return tuner


def _outcome(spec: SweepSpec, results, resources: TrialResources, data: ESPData) -> SweepOutcome:
    """Completed (every trial ended; ranked) or interrupted (resume with --resume)."""
    run = spec.run
    finished = results.num_terminated + results.num_errors
    complete = finished == len(results) and (
        len(results) >= run.num_samples
        or run.time_budget_s is not None
        or run.max_trial_epochs is not None
    )
    outcome = SweepOutcome(
        status="completed" if complete else "interrupted",
        experiment_dir=spec.experiment_dir,
        results=results,
        best=_best_trial(results, run.metric),
        resources=resources,
    )
    if complete:
        outcome.ranking = _rank(spec.experiment_dir, spec, results, data)
    return outcome


def _fit(tuner, spec: SweepSpec, resume: bool):
    """`tuner.fit()`, refusing a restore that failed; then sets aside the directories of
    trials the restored experiment does not know (started after its last snapshot)."""
    experiment_dir = spec.experiment_uri
    guard = _RefuseSilentRestart()
    tc_log = logging.getLogger("ray.tune.execution.tune_controller")
    if resume:
        tc_log.addHandler(guard)
    try:
        results = tuner.fit()
    except _RestoreFailed as e:
        raise SpecError(
            f"--resume: Ray Tune cannot restore {experiment_dir} ({e}); refusing "
            "to start a new experiment in its place"
        ) from None
    finally:
        tc_log.removeHandler(guard)
    set_aside_orphans(spec, {Path(r.path).name for r in results})
    return results


def _objectives_text(spec: SweepSpec) -> str:
    """`metric valid_esp_rmse min`, or the objectives and which one the scheduler uses."""
    run = spec.run
    if not run.objectives:
        return f"metric {run.metric} {run.mode}"
    listed = ", ".join(f"{o.metric} {o.mode}" for o in run.objectives)
    return f"objectives {listed}; the scheduler uses {run.metric}"


def _dashboard_arg(storage: str) -> str:
    """How optuna-dashboard is pointed at a resolved storage (a journal file by its path)."""
    return storage if study.is_journal(storage) else f"'{storage}'"


# --------------------------------------------------------------------------- debug


def debug_run_dir(spec: SweepSpec) -> Path:
    """A fresh directory for one debug trial: <storage_path>/<name>-debug/<timestamp> (with
    object storage, under run.local_dir)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    root = spec.run.local_dir if spec.remote else spec.run.storage_path
    return Path(root) / f"{spec.name}-debug" / stamp


def run_debug(
    spec: SweepSpec, reporter=None, data: ESPData | None = None, run_dir: Path | None = None
):
    """One trial in this process, without Ray: the spec's fixed values plus one point of the
    space (`spec.debug_point()`: each distribution's centre, then the `debug:` overrides).
    Writes the run's TensorBoard events (no MLflow / W&B). Errors propagate with their
    traceback.

    Returns:
      The trainer's FitResult.
    """
    from dcmtune.train.loop import fit

    prep = prepare(spec, data)
    run_dir = Path(run_dir) if run_dir is not None else debug_run_dir(spec)
    config = spec.config_for(spec.debug_point(), name=run_dir.name, output_dir=str(run_dir.parent))
    with run_reporters(run_dir, reporter, hparams=spec.debug_point()) as both:
        return fit(config, prep.data, reporter=both, run_dir=run_dir)


def _fmt_point(point: dict) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items()
    )
