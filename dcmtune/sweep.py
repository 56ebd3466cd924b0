"""`python -m dcmtune.sweep SPEC.yaml`: a hyper-parameter sweep of DCMNet with Ray Tune.

Optuna's TPE proposes trials, ASHA stops poor ones early (told to Optuna as PRUNED), every
trial trains with `dcmtune.train.fit` in its own trial directory, and the best trials are
ranked at the end. Local Ray by default; an existing cluster with --address.

  python -m dcmtune.sweep quick                               # the demo sweep (2 CPU cores)
  python -m dcmtune.sweep my.yaml --debug                     # one trial, here, no Ray
  python -m dcmtune.sweep my.yaml --resume                    # finish an interrupted sweep
  python -m dcmtune.sweep my.yaml --address auto --dashboard  # on a running cluster

A local Ray listens on 127.0.0.1 only, unless --dashboard-host names another address. Every
trial writes its TensorBoard event stream into its directory; the Optuna study is a journal
file in the experiment directory (watch them with `tensorboard --logdir` and
`optuna-dashboard`); a spec's `tracking:` adds MLflow / W&B.

Bad input (spec, data, resources) exits with status 2 and one line naming the key, before Ray
starts and before anything is written. The library entry points are `prepare`, `run_sweep` and
`run_debug`; `main` only parses flags and prints.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from dcmtune import local_ray, metrics, study
from dcmtune.cli import OneLineParser, TableReporter, one_line, run_cli
from dcmtune.config import ConfigError
from dcmtune.data import DataError, ESPData, load_dataset, split_dataset
from dcmtune.experiment_store import (LOCK_FILE, SPEC_RECORD, check_experiment_dir,  # noqa: F401
                                      set_aside_orphans, sync_study)
from dcmtune.experiment_store import driver_lock as _driver_lock
from dcmtune.experiment_store import write_spec_record as _write_spec_record
from dcmtune.search_space import SpecError, SweepSpec, load_spec
from dcmtune.tracking import run_reporters
from dcmtune.xla_env import apply_defaults, compilation_cache_env

__all__ = ["main", "prepare", "run_sweep", "run_debug", "debug_run_dir", "SweepOutcome",
           "BestTrial", "find_spec"]

log = logging.getLogger(__name__)

_SHIPPED_SPECS = Path(__file__).resolve().parent / "search_spaces"  # package data


# --------------------------------------------------------------------------- driver-side prep


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """A validated spec and its data, ready for Ray (nothing here imported Ray or JAX)."""

    spec: SweepSpec
    data: ESPData
    num_train: int


def find_spec(name: str | Path) -> Path:
    """The spec file `name`: a path, else a spec shipped with the package (dcmtune/search_spaces/;
    `quick`, `quick.yaml` or `search_spaces/quick.yaml` work from any working directory)."""
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name if path.suffix in (".yaml", ".yml") else path.name + ".yaml"
    shipped = _SHIPPED_SPECS / stem
    if (len(path.parts) == 1 or path.parent.name == "search_spaces") and shipped.is_file():
        log.info("using the shipped spec %s", shipped)
        return shipped
    known = sorted(p.stem for p in _SHIPPED_SPECS.glob("*.yaml"))
    raise SpecError(f"{name}: spec file not found (shipped specs: {', '.join(known) or 'none'})")


def prepare(spec: SweepSpec, data: Optional[ESPData] = None) -> _Prepared:
    """Loads the data with numpy and checks what depends on it: batch sizes against the
    training split, and that the sweep metric exists for this data.

    Raises:
      SpecError / DataError: one line naming the key.
    """
    base = spec.base
    if data is None:
        data = load_dataset(base.data.data_files, base.model.max_atomic_number,
                            base.data.dipole_units)
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

    (b, b_key), (k, k_key) = (largest("training.batch_size"),
                              largest("training.gradient_accumulation_steps"))
    if b * k > n_train:
        key = b_key if b_key.startswith("search.") or not k_key.startswith("search.") else k_key
        raise SpecError(f"{key}: batch_size x gradient_accumulation_steps can reach {b} x {k} = "
                        f"{b * k}, more than the {n_train} training conformers")
    metric = spec.run.metric
    if "_mono_" in metric and data.mono is None:
        raise SpecError(f"run.metric: {metric} needs reference charges, but the data has no "
                        "'mono'")
    if metric.endswith("_dipole_mae") and data.dipole is None:
        raise SpecError(f"run.metric: {metric} needs reference dipoles, but the data has no "
                        "'Dxyz'")
    return _Prepared(spec, data, n_train)


def _local_resources() -> dict[str, float]:
    """What a local Ray started here would have (Ray's own rule for CPUs and GPUs)."""
    from dcmtune.xla_env import detect_local_gpus

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(detect_local_gpus())}


def _check_local_resources(spec: SweepSpec) -> None:
    """Refuses resources a local Ray could not give, before starting it."""
    from dcmtune.xla_env import resolve_resources

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
    checkpoint: Optional[str]


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
    best: Optional[BestTrial]
    resources: Any
    ranking: Any = None


def _best_trial(results, metric: str, mode: str) -> Optional[BestTrial]:
    """The best trial by `metric` at its best epoch, among trials that neither diverged nor
    errored (the same trials the ranking lets compete)."""
    sign = 1.0 if mode == "min" else -1.0
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
        row = ok.loc[ok[metric].idxmin() if mode == "min" else ok[metric].idxmax()]
        if best is None or sign * float(row[metric]) < sign * float(best[1][metric]):
            best = (res, row, ok)
    if best is None:
        return None
    res, row, df = best
    try:
        ckpt = res.get_best_checkpoint(metric, mode)
    except RuntimeError:
        ckpt = None
    keep = [c for c in df.columns if c.startswith(("train_", "valid_")) or
            c in ("epoch", "lr", "best_epoch")]
    return BestTrial(trial_id=str(row.get("trial_id", Path(res.path).name)), path=str(res.path),
                     config=dict(res.config or {}), epoch=int(row["epoch"]),
                     metrics={c: _py(row[c]) for c in keep},
                     checkpoint=ckpt.path if ckpt is not None else None)


def _py(v):
    return v.item() if hasattr(v, "item") else v


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
    from dcmtune.rank import RankError, rank_experiment

    where = spec.experiment_uri if spec.remote else experiment_dir
    try:
        return rank_experiment(where, top_k=spec.rank.top_k, split=spec.rank.split,
                               data=data, metric=spec.run.metric, mode=spec.run.mode,
                               local_copy=experiment_dir if spec.remote else None)
    except RankError as e:
        log.warning("ranking skipped: %s", e)
        return None


# --------------------------------------------------------------------------- Ray


def _trial_dirname(trial) -> str:
    from dcmtune.trainable import trial_dirname

    return trial_dirname(trial.trial_id)


def _connect(address: Optional[str], dashboard: bool, dashboard_host: str,
             env: Optional[dict], echo: Callable[[str], None],
             dashboard_port: Optional[int] = None) -> bool:
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
        ctx = ray.init(include_dashboard=dashboard, dashboard_host=dashboard_host,
                       runtime_env={"env_vars": env or {}}, logging_level=logging.WARNING,
                       **ports)
        if dashboard_host in local_ray.LOOPBACK_HOSTS and not local_ray.on_loopback():
            log.warning("local Ray listens on all network interfaces (it was imported before "
                        "dcmtune could ask for 127.0.0.1; see dcmtune.local_ray)")
    url = getattr(ctx, "dashboard_url", None)
    if dashboard and url:
        echo(f"Ray dashboard: http://{url}")
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled":
            echo("  it asks for Ray's auth token: print it with `ray get-auth-token` (stored in "
                 "~/.ray/auth_token)")
        if dashboard_host not in ("127.0.0.1", "localhost"):
            echo(f"  warning: the dashboard listens on {dashboard_host}, reachable from the "
                 "network")
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
    with _driver_lock(spec.experiment_dir):
        return _run_sweep(spec, resume=resume, data=prep.data, **kwargs)


def _run_sweep(spec: SweepSpec, *, resume: bool = False, address: Optional[str] = None,
               dashboard: bool = False, dashboard_host: str = "127.0.0.1",
               dashboard_port: Optional[int] = None,
               data: Optional[ESPData] = None, callbacks: Sequence[Any] = (),
               verbose: int = 1, echo: Callable[[str], None] = log.info) -> SweepOutcome:
    """Runs (or with `resume`, finishes) the sweep `spec`.

    Args:
      spec: A validated spec (`load_spec`).
      resume: Restore <storage_path>/<name> (searcher, scheduler and trials) and finish it.
      address: An existing Ray cluster ("auto" or host:port); None starts local Ray (or uses a
        Ray session already initialised in this process).
      dashboard, dashboard_host, dashboard_port: Start the Ray dashboard on this host and port
        (local Ray only). A local Ray listens on 127.0.0.1 only unless dashboard_host is
        another address (`dcmtune.local_ray`).
      data: The dataset; loaded from the spec when None.
      callbacks: Extra Tune callbacks (a resumed experiment keeps its original ones).
      verbose: Tune's console verbosity (0 silent, 1 status tables, 2 also results).
      echo: Where one-line progress messages go (the CLI prints them).

    Raises:
      SpecError / DataError: bad input, before anything is written.
    """
    if address is None:
        local_ray.prefer_loopback(dashboard_host)  # before Ray is imported
    import ray
    from ray import tune

    from dcmtune.trainable import TrialSettings, make_trainable
    from dcmtune.xla_env import resolve_resources, trial_env_vars

    prep = _Prepared(spec, data, 0) if data is not None else prepare(spec)
    run = spec.run

    # 1. Resources: decided before Ray starts where we can (local), checked on the cluster.
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
    share = env.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    echo(f"cluster: {cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs; per trial: "
         f"{resources.cpu:g} CPU, {resources.gpu:g} GPU"
         + (f" (XLA memory fraction {share})" if share else " (CPU trial)")
         + f"; at most {run.max_concurrent_trials or 'as many as fit'} at once")

    # 2. The trainable: data through the object store, settings shared by all trials.
    # Trials write in place on POSIX storage (every node mounts it); with object storage
    # they write node-locally and Tune uploads checkpoints and the trial directory.
    settings = TrialSettings(base=spec.base.to_dict(), metric=run.metric, mode=run.mode,
                             checkpoint_every=run.checkpoint_every, env=env,
                             experiment_dir="" if spec.remote else str(spec.experiment_dir))
    trainable = make_trainable(prep.data, settings, resources)

    # 3. Searcher, scheduler, Tuner.
    if resume:
        echo(f"resuming {spec.experiment_uri}")
        sync_study(spec, up=False)
        tuner = tune.Tuner.restore(spec.experiment_uri, trainable=trainable,
                                   resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
    else:
        tuner = _new_tuner(spec, trainable, callbacks, verbose)
        _write_spec_record(spec)
    echo(f"experiment: {spec.experiment_uri} ({run.num_samples} trials, metric {run.metric} "
         f"{run.mode}, {spec.num_epochs} epochs max)")
    if spec.remote:
        echo(f"local copy (lock, Optuna journal, ranking): {spec.experiment_dir}")
    echo(f"watch: tensorboard --logdir {spec.experiment_uri}"
         + (f"  |  optuna-dashboard {_dashboard_arg(spec.study_storage)}"
            if spec.study_storage else ""))
    with _sigterm_as_interrupt():  # after ray.init, which installs its own SIGTERM handler
        try:
            results = _fit(tuner, spec, resume)
        finally:
            sync_study(spec, up=True)

        # 4. Outcome.
        finished = results.num_terminated + results.num_errors
        complete = finished == len(results) and (len(results) >= run.num_samples
                                                 or run.time_budget_s is not None)
        best = _best_trial(results, run.metric, run.mode)
        outcome = SweepOutcome(status="completed" if complete else "interrupted",
                               experiment_dir=spec.experiment_dir, results=results, best=best,
                               resources=resources)
        if complete:
            outcome.ranking = _rank(spec.experiment_dir, spec, results, prep.data)
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
        raise SpecError(f"--resume: Ray Tune cannot restore {experiment_dir} ({e}); refusing "
                        "to start a new experiment in its place") from None
    finally:
        tc_log.removeHandler(guard)
    set_aside_orphans(spec, {Path(r.path).name for r in results})
    return results


def _dashboard_arg(storage: str) -> str:
    """How optuna-dashboard is pointed at a resolved storage (a journal file by its path)."""
    return storage if study.is_journal(storage) else f"'{storage}'"


def _new_tuner(spec: SweepSpec, trainable, callbacks: Sequence[Any], verbose: int):
    """The Tuner: seeded Optuna search (PRUNED-aware) under a concurrency limit, ASHA on the
    `epoch` attribute with max_t = num_epochs, checkpoints scored on the sweep metric."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    from dcmtune._tune_ext import AshaStateCallback, PruningAwareOptunaSearch
    from dcmtune._tune_loggers import tune_callbacks

    run, s = spec.run, spec.searcher
    if s.sampler == "tpe":
        sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials)
    else:
        sampler = optuna.samplers.RandomSampler(seed=s.seed)
    storage = study.open_storage(spec.study_storage) if spec.study_storage else None
    searcher = PruningAwareOptunaSearch(
        metric=run.metric, mode=run.mode, sampler=sampler, study_name=spec.name, storage=storage,
        points_to_evaluate=[dict(p) for p in s.points_to_evaluate] or None,
        time_attr="epoch", max_t=spec.num_epochs)
    search_alg = (ConcurrencyLimiter(searcher, max_concurrent=run.max_concurrent_trials)
                  if run.max_concurrent_trials else searcher)
    scheduler, cbs = None, list(callbacks) + tune_callbacks(spec.tracking, spec.name,
                                                             str(spec.experiment_dir))
    if spec.scheduler.name == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=spec.num_epochs,
                                  grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor,
                                  brackets=spec.scheduler.brackets)
        cbs.insert(0, AshaStateCallback(scheduler))
    return tune.Tuner(
        trainable,
        param_space=spec.param_space(),
        tune_config=tune.TuneConfig(
            metric=run.metric, mode=run.mode, search_alg=search_alg, scheduler=scheduler,
            num_samples=run.num_samples, reuse_actors=True, time_budget_s=run.time_budget_s,
            trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=run.storage_path, callbacks=cbs, verbose=verbose,
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=run.num_to_keep, checkpoint_score_attribute=run.metric,
                checkpoint_score_order=run.mode),
            failure_config=tune.FailureConfig(max_failures=run.max_failures),
            # POSIX storage: trials write straight into their directory in the experiment.
            # Object storage: they write into Tune's node-local trial directory, which Tune
            # uploads with every checkpoint and when the trial ends (dcmtune.trainable).
            sync_config=tune.SyncConfig(sync_artifacts=True)))


# --------------------------------------------------------------------------- debug


def debug_run_dir(spec: SweepSpec) -> Path:
    """A fresh directory for one debug trial: <storage_path>/<name>-debug/<timestamp> (with
    object storage, under run.local_dir)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    root = spec.run.local_dir if spec.remote else spec.run.storage_path
    return Path(root) / f"{spec.name}-debug" / stamp


def run_debug(spec: SweepSpec, reporter=None, data: Optional[ESPData] = None,
              run_dir: Optional[Path] = None):
    """One trial in this process, without Ray: the spec's fixed values plus one point of the
    space (`spec.debug_point()`: each distribution's centre, then the `debug:` overrides).
    Writes the run's TensorBoard events (no MLflow / W&B). Errors propagate with their
    traceback.

    Returns:
      The trainer's FitResult.
    """
    from dcmtune.train import fit

    prep = prepare(spec, data)
    run_dir = Path(run_dir) if run_dir is not None else debug_run_dir(spec)
    config = spec.config_for(spec.debug_point(), name=run_dir.name,
                             output_dir=str(run_dir.parent))
    with run_reporters(run_dir, reporter, hparams=spec.debug_point()) as both:
        return fit(config, prep.data, reporter=both, run_dir=run_dir)


def _fmt_point(point: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in point.items())


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m dcmtune.sweep",
                description="Hyper-parameter sweep of DCMNet with Ray Tune (Optuna TPE + ASHA).")
    p.add_argument("spec", help="sweep spec YAML (or the name of a shipped one, e.g. quick)")
    p.add_argument("--debug", action="store_true",
                   help="one trial in this process, no Ray, full epoch table, fail fast")
    p.add_argument("--resume", action="store_true",
                   help="finish the interrupted experiment <storage_path>/<name>")
    p.add_argument("--address", help="an existing Ray cluster (auto or host:port); default: "
                                     "start a local Ray")
    p.add_argument("--dashboard", action="store_true", help="start the Ray dashboard (needs "
                                                            "the dashboard extra)")
    p.add_argument("--dashboard-host", default="127.0.0.1",
                   help="dashboard address (default 127.0.0.1; 0.0.0.0 exposes it, and then "
                        "Ray's other ports listen on all interfaces too)")
    p.add_argument("--dashboard-port", type=int, help="dashboard port (default 8265)")
    p.add_argument("--storage-path", help="directory of experiments (default: the spec's "
                                          "run.storage_path, else ./ray_results)")
    p.add_argument("--num-samples", type=int, help="override run.num_samples")
    p.add_argument("--name", help="override the experiment name")
    p.add_argument("-q", "--quiet", action="store_true", help="no Tune status tables")
    return p


def _load(args) -> SweepSpec:
    spec = load_spec(find_spec(args.spec), storage_path=args.storage_path)
    if args.name is not None:
        spec = spec.renamed(args.name)
    if args.num_samples is not None:
        if args.num_samples < 1:
            raise SpecError(f"--num-samples: expected at least 1, got {args.num_samples}")
        spec = spec.replace_run(num_samples=args.num_samples)
    return spec


def _main(args: argparse.Namespace) -> int:
    spec = _load(args)
    if args.debug and (args.resume or args.address):
        raise SpecError("--debug: runs one trial in this process; drop --resume/--address")
    if args.dashboard_port is not None and not 0 < args.dashboard_port < 65536:
        raise SpecError(f"--dashboard-port: expected a port number 1-65535, got "
                        f"{args.dashboard_port}")
    if args.address is None and not args.debug:
        local_ray.prefer_loopback(args.dashboard_host)  # before Ray is imported
        if args.dashboard:
            local_ray.check_dashboard_extra()
    prep = prepare(spec)  # bad input -> exit 2 before any training
    if args.debug:
        run_dir = debug_run_dir(spec)
        print(f"debug trial of {spec.name}: {_fmt_point(spec.debug_point()) or '(no search)'}")
        print(f"run directory: {run_dir}", flush=True)
        num_epochs = spec.config_for(spec.debug_point()).training.num_epochs
        result = run_debug(spec, TableReporter(num_epochs, metrics.table_rows()),
                           data=prep.data, run_dir=run_dir)
        print(f"{result.status}: best valid_loss {result.best_valid_loss:.6g} at epoch "
              f"{result.best_epoch}; run directory {result.run_dir}")
        return 0 if result.status == "completed" else 3
    check_experiment_dir(spec, args.resume)
    if args.address is None:
        _check_local_resources(spec)
    outcome = run_sweep(spec, resume=args.resume, address=args.address,
                        dashboard=args.dashboard, dashboard_host=args.dashboard_host,
                        dashboard_port=args.dashboard_port, data=prep.data, verbose=0 if args.quiet else 1, echo=print)
    _print_outcome(spec, outcome, args)
    return 0 if outcome.status == "completed" else 130


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The CLI: 0 done, 2 bad input, 3 the debug trial diverged, 130 interrupted."""
    return run_cli(_main, build_parser(), argv, bad_input=(SpecError, DataError, ConfigError))


def _print_outcome(spec: SweepSpec, outcome: SweepOutcome, args) -> None:
    res = outcome.results
    print(f"\n{outcome.status}: {len(res)} trials ({res.num_errors} errors) in "
          f"{spec.experiment_uri}")
    if outcome.status != "completed":
        print(f"continue with: python -m dcmtune.sweep {args.spec} --resume"
              + (f" --storage-path {spec.run.storage_path}" if args.storage_path else "")
              + (f" --name {spec.name}" if args.name else ""))
    best = outcome.best
    if best is None:
        print(f"no trial reported a finite {spec.run.metric}")
        return
    print(f"best trial: {best.trial_id} at epoch {best.epoch} "
          f"({spec.run.metric} = {best.metrics.get(spec.run.metric):.5g})")
    print(f"  searched: {_fmt_point(best.config) or '(nothing)'}")
    for name in dict.fromkeys((spec.run.metric,) + tuple(f"valid_{n}" for n in metrics.TABLE_ROWS)
                              + ("train_esp_rmse",)):
        v = best.metrics.get(name)
        if v is not None and math.isfinite(v):
            print(f"  {name:<18} {v:.5g}")
    print(f"  checkpoint: {best.checkpoint}")
    print(f"  trial directory: {best.path}")
    ranking = outcome.ranking
    if ranking is not None and len(ranking):
        from dcmtune.report import format_ranking

        print()
        print(format_ranking(ranking))


if __name__ == "__main__":
    raise SystemExit(main())
