"""The fit loop: epochs of updates, evaluation with the EMA weights, checkpoints, a Reporter.

An epoch uses every training conformer once, in batches of molecules of similar size (size
buckets, `dcmtune.data.batches`), the order drawn from fold_in(rng, epoch), fed to the pure
steps of `dcmtune.train.step` by `dcmtune.train.feed`. Data stays on the device unless it
exceeds `data.device_data_budget_mb` (then it is streamed); the host reads metrics once per
epoch. `fit` goes: prepare (data, split, buckets) -> state (fresh, or restored exactly,
`dcmtune.train.restart`) -> run directory -> epochs (train, validate, save, report).

The trainer never knows who listens: a `Reporter` gets (epoch, metrics, checkpoint_dir) after
every epoch (the CLI prints a table; the Tune trainable calls `tune.report`).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import time
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np

from dcmtune import _io
from dcmtune.config import ConfigError, ExperimentConfig, TrainingConfig, config_from_flat
from dcmtune.data import batches
from dcmtune.data.dataset import ESPData
from dcmtune.data.load import load_dataset
from dcmtune.data.splits import split_dataset, split_record
from dcmtune.model.loss import finalize_metrics, zero_sums
from dcmtune.train import checkpoints as ckpt
from dcmtune.train import feed, finetune
from dcmtune.train.restart import check_resume_config, check_writable, set_aside_stale
from dcmtune.train.schedules import learning_rate_at
from dcmtune.train.step import StepConfig, _update, add_sums, evaluate_sums, hparams_of, init_state

__all__ = ["Reporter", "FitResult", "fit", "run_training", "TIMING_KEYS"]

log = logging.getLogger(__name__)

TIMING_KEYS = ("epoch_time", "batch_time")


class Reporter(Protocol):
    def __call__(
        self, epoch: int, metrics: dict[str, float], checkpoint_dir: Path | None
    ) -> None: ...


@dataclasses.dataclass
class FitResult:
    params: Any
    ema_params: Any
    best_valid_loss: float
    best_epoch: int
    run_dir: Path
    history: list[dict]
    status: str  # "completed" or "diverged"


def _updates_per_epoch(n_train: int, cfg: TrainingConfig) -> int:
    per_update = cfg.batch_size * cfg.gradient_accumulation_steps
    upe = n_train // per_update
    if upe < 1:
        raise ConfigError(
            f"training.batch_size: batch_size x gradient_accumulation_steps = "
            f"{per_update} exceeds the {n_train} training conformers"
        )
    return upe


def _train_buckets(
    train: ESPData, config: ExperimentConfig, resume_from: Path | None = None
) -> tuple[list, int]:
    """The training buckets and updates per epoch (`dcmtune.data.batches`). A resumed run
    keeps the atom bounds its checkpoint recorded (the plan depends on num_epochs, which a
    restart may change under a constant learning rate)."""
    t, d, cutoff = config.training, config.data, config.model.cutoff
    upe = _updates_per_epoch(train.num_conformers, t)
    if d.batching == "padded":
        return batches.padded_bucket(train, cutoff), upe
    saved = None
    if resume_from is not None and (Path(resume_from) / ckpt.META_FILE).is_file():
        saved = ckpt.read_meta(Path(resume_from)).get("bucket_bounds")
    if saved and int(train.N.max()) <= saved[-1]:
        buckets = batches.plan_from_bounds(train, saved, cutoff)
    else:
        buckets = batches.plan_buckets(
            train,
            t.batch_size,
            t.gradient_accumulation_steps,
            d.max_buckets,
            config.model.n_dcm,
            t.num_epochs,
            cutoff,
        )
    slots = t.batch_size * t.gradient_accumulation_steps
    return buckets, batches.num_updates(buckets, slots)


def _split(config: ExperimentConfig, data: ESPData) -> dict[str, np.ndarray]:
    try:
        return split_dataset(data, config.data)
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None


def _given_splits(splits: dict[str, np.ndarray], data: ESPData) -> dict[str, np.ndarray]:
    """Explicit conformer indices per split, checked: train and valid non-empty, every index
    in range, no conformer in two splits."""
    out = {k: np.asarray(splits.get(k, []), dtype=np.int64) for k in ("train", "valid", "test")}
    if not len(out["train"]) or not len(out["valid"]):
        raise ConfigError("data: explicit splits need training and validation conformers")
    every = np.concatenate(list(out.values()))
    if every.min() < 0 or every.max() >= len(data.mol_id) or len(set(every)) != len(every):
        raise ConfigError(
            f"data: explicit splits must be distinct conformer indices in [0, {len(data.mol_id)})"
        )
    return out


@dataclasses.dataclass(frozen=True)
class _Run:
    """What a fit works on, prepared before anything is written (step 1 of `fit`)."""

    config: ExperimentConfig
    run_dir: Path
    data: ESPData
    splits: dict[str, np.ndarray]
    train: ESPData
    valid: ESPData
    buckets: list
    updates_per_epoch: int
    static: StepConfig
    hparams: Any
    source: finetune.Source | None  # the weights a fresh run starts from (training.init_from)

    @property
    def bucketed(self) -> bool:
        return self.config.data.batching == "bucketed"


@dataclasses.dataclass
class _Progress:
    """What the epochs change: the state, the history, the best epoch (step 2 of `fit`)."""

    state: Any
    history: list[dict] = dataclasses.field(default_factory=list)
    restarts: list[dict] = dataclasses.field(default_factory=list)
    best_loss: float = math.inf
    best_epoch: int = 0
    start: int = 1
    created_at: str | None = None
    init_from: dict | None = None  # where the weights started from (`finetune.record`)


def _prepare(
    config: ExperimentConfig,
    data: ESPData | None,
    run_dir: Path | None,
    resume_from: Path | None,
    splits: dict[str, np.ndarray] | None = None,
) -> _Run:
    """The fine-tuning source, data, split, buckets and traced hyper-parameters (errors leave
    no trace on disk)."""
    t = config.training
    source = None
    if t.init_from is not None and resume_from is None:  # checked first: reads one meta.json
        source = finetune.open_source(t.init_from, config.model)
    if data is None:
        data = load_dataset(
            config.data.data_files, config.model.max_atomic_number, config.data.dipole_units
        )
    splits = _split(config, data) if splits is None else _given_splits(splits, data)
    train, valid = data.subset(splits["train"]), data.subset(splits["valid"])
    buckets, upe = _train_buckets(train, config, resume_from)
    return _Run(
        config=config,
        run_dir=Path(run_dir) if run_dir is not None else config.run_dir,
        data=data,
        splits=splits,
        train=train,
        valid=valid,
        buckets=buckets,
        updates_per_epoch=upe,
        static=StepConfig(config.model, t.use_grad_clip, t.use_ema, tuple(sorted(t.freeze))),
        hparams=hparams_of(t, upe),
        source=source,
    )


def _restore(run: _Run, resume_from: Path | None, allow_config_change: bool) -> _Progress:
    """A fresh state (random, or a source model's weights for fine-tuning), or the
    checkpoint's restored exactly (its config checked before anything compiles)."""
    ckpt_root = run.run_dir / "checkpoints"
    if resume_from is None:
        if ckpt_root.exists() and any(ckpt_root.iterdir()):
            raise ckpt.CheckpointError(
                f"{run.run_dir}: already holds checkpoints; resume from {ckpt_root}/latest or "
                "choose another name/output_dir"
            )
        check_writable(run.run_dir)
        state, t = init_state(run.config), run.config.training
        if run.source is None:
            return _Progress(state=state)
        return _Progress(
            state=finetune.start_from(state, run.source, t.use_ema),
            init_from=finetune.record(run.source, t.freeze),
        )
    where = Path(resume_from)
    meta = ckpt.verify_checkpoint(where)
    changes = check_resume_config(
        meta,
        run.config,
        where,
        data_checksum=run.data.checksum(),
        splits=run.splits,
        allow_change=allow_config_change,
    )
    check_writable(run.run_dir)
    state, meta = ckpt.load_checkpoint(where, template=init_state(run.config))
    restarts = [dict(r) for r in meta.get("restarts", [])]
    if changes:
        restarts.append(
            {
                "from_epoch": int(meta["epoch"]),
                "checkpoint": str(resume_from),
                "at": datetime.datetime.now().isoformat(timespec="seconds"),
                "allow_config_change": bool(allow_config_change),
                "changes": changes,
            }
        )
    best = meta.get("best_valid_loss", math.inf)
    set_aside_stale(ckpt_root, meta)
    log.info("resuming from %s at epoch %d", resume_from, int(meta["epoch"]) + 1)
    return _Progress(
        state=state,
        history=[dict(r) for r in meta.get("history", [])],
        restarts=restarts,
        best_loss=math.inf if best is None else float(best),
        best_epoch=int(meta.get("best_epoch", 0)),
        start=int(meta["epoch"]) + 1,
        created_at=(meta.get("config") or {}).get("created_at"),
        init_from=meta.get("init_from"),
    )


def _write_run_files(run: _Run, progress: _Progress) -> tuple[ExperimentConfig, dict]:
    """The run directory's resolved config.json, split.json and restarts.json, written once.
    Returns the config as written (with its creation date) and the split record."""
    (run.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    config = run.config
    if not config.created_at:  # a resumed run keeps the date it was created
        config = config.replace(
            created_at=progress.created_at or datetime.datetime.now().isoformat(timespec="seconds")
        )
    _io.write_json(run.run_dir / "config.json", config.to_dict())
    d = config.data
    record = split_record(
        run.data,
        run.splits,
        split_by=d.split_by,
        split_seed=d.split_seed,
        train_molecules=d.train_molecules,
        data_files=list(d.data_files),
    )
    _io.write_json(run.run_dir / "split.json", record)
    if progress.restarts:
        _io.write_json(run.run_dir / "restarts.json", progress.restarts)
    return config, record


class _Feeds(NamedTuple):
    """The data an epoch reads: the training feed and the evaluation batches (test only with
    training.report_test_metrics)."""

    train: feed.TrainFeed
    valid: Any
    test: Any = None


def _feeds(run: _Run) -> _Feeds:
    """The training feed and the evaluation batches: on the device, or streamed from host
    memory above data.device_data_budget_mb."""
    d, t = run.config.data, run.config.training
    held_out = {"valid": run.valid}
    if t.report_test_metrics:
        held_out["test"] = run.data.subset(run.splits["test"])
    cutoff = run.config.model.cutoff
    assign = (
        batches.assign_buckets if run.bucketed else (lambda x, _: batches.padded_bucket(x, cutoff))
    )
    buckets = {name: assign(data, run.buckets) for name, data in held_out.items()}
    held = sum(batches.batch_bytes(held_out[n], buckets[n]) for n in held_out)
    mb = (batches.batch_bytes(run.train, run.buckets) + held) / 2**20
    budget = feed.data_budget_mb(d.device_data_budget_mb)
    resident = mb <= budget
    where = "device-resident" if resident else "streamed from host memory"
    log.info(
        "data: %s batches, train buckets (atoms x grid points x pair slots (conformers)) %s; "
        "%.1f MB %s the device-data budget %g MB (data.device_data_budget_mb): %s",
        *(d.batching, batches.describe(run.buckets), mb, "<=" if resident else ">"),
        *(budget, where),
    )
    per_update, model = t.batch_size * t.gradient_accumulation_steps, run.config.model
    evals = {
        name: feed.eval_batches(
            held_out[name],
            buckets[name],
            [feed.step_molecules(b, per_update, model) for b in buckets[name]],
            resident,
        )
        for name in held_out
    }
    steps = [feed.step_molecules(b, t.batch_size, model) for b in run.buckets]
    return _Feeds(feed.TrainFeed(run.train, run.buckets, resident, steps), **evals)


def _train_epoch(
    run: _Run, progress: _Progress, train_feed: feed.TrainFeed, epoch: int
) -> dict[str, float]:
    """One epoch of updates, dispatched asynchronously (progress.state is updated); returns
    the training metrics (of the batches before each update)."""
    t, hp = run.config.training, run.hparams
    k, b = t.gradient_accumulation_steps, t.batch_size
    key = jax.random.fold_in(progress.state.rng, epoch)
    updates = (
        feed.epoch_plan(run.buckets, b, k, key)
        if run.bucketed
        else feed.padded_updates(run.train.num_conformers, b, k, key)
    )
    sums, state = zero_sums(), progress.state
    for inputs, idx in train_feed.inputs(updates):
        state, s = _update(state, inputs, idx, hp, run.static)
        sums = add_sums(sums, s)
    progress.state = state
    return finalize_metrics(jax.device_get(sums), run.hparams)


def _evaluate(run: _Run, params, eval_batches) -> dict[str, float]:
    """Metrics of `params` on evaluation batches (one host sync)."""
    sums = evaluate_sums(params, eval_batches(), run.hparams, run.config.model)
    return finalize_metrics(jax.device_get(sums), run.hparams)


def _epoch(run: _Run, progress: _Progress, feeds: _Feeds, epoch: int) -> dict[str, Any]:
    """One epoch of updates, then validation (and test, when asked) with the EMA weights;
    returns the epoch's metrics (progress.state and its best epoch are updated)."""
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {"epoch": epoch}
    train_metrics = _train_epoch(run, progress, feeds.train, epoch)
    t_train = time.perf_counter() - t0
    state = progress.state
    eval_params = state.ema_params if run.config.training.use_ema else state.params
    step = int(state.step)
    metrics.update(step=step, lr=learning_rate_at(run.hparams, step - 1))
    metrics.update({f"train_{name}": v for name, v in train_metrics.items()})
    for split in ("valid", "test"):
        if getattr(feeds, split) is not None:
            values = _evaluate(run, eval_params, getattr(feeds, split))
            metrics.update({f"{split}_{name}": v for name, v in values.items()})
    diverged = not (math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["valid_loss"]))
    if not diverged and metrics["valid_loss"] < progress.best_loss:
        progress.best_loss, progress.best_epoch = metrics["valid_loss"], epoch
    metrics.update(
        best_valid_loss=progress.best_loss,
        best_epoch=progress.best_epoch,
        diverged=int(diverged),
        epoch_time=time.perf_counter() - t0,
        batch_time=t_train / run.updates_per_epoch,
    )
    return metrics


def _save(
    run: _Run, progress: _Progress, config: ExperimentConfig, record: dict, metrics: dict
) -> Path | None:
    """The epoch's checkpoints (latest; best when it improved; every N epochs, pruned to
    top-k), never of a diverged state; returns `latest` (None when diverged)."""
    epoch, t = int(metrics["epoch"]), config.training
    if metrics["diverged"]:
        log.warning(
            "epoch %d: non-finite loss (train %s, valid %s); stopping",
            epoch,
            metrics["train_loss"],
            metrics["valid_loss"],
        )
        return None
    root = run.run_dir / "checkpoints"
    meta = {
        "epoch": epoch,
        "step": metrics["step"],
        "metrics": metrics,
        "history": progress.history,
        "best_valid_loss": progress.best_loss,
        "best_epoch": progress.best_epoch,
        "config": config.to_dict(),
        "data_checksum": record["checksum"],
        "split": record,
        "restarts": progress.restarts,
        "bucket_bounds": [bk.num_atoms for bk in run.buckets],
        "training_domain": run.train.domain(),  # what prediction checks new molecules against
    }
    if progress.init_from is not None:
        meta["init_from"] = progress.init_from
    latest = ckpt.save_checkpoint(root / "latest", progress.state, meta)
    if progress.best_epoch == epoch:
        ckpt.save_checkpoint(root / "best", progress.state, meta)
    if t.save_every_n_epochs and epoch % t.save_every_n_epochs == 0:
        ckpt.save_checkpoint(root / f"epoch_{epoch}", progress.state, meta)
        ckpt.prune_periodic(root, t.keep_top_k_checkpoints)
    return latest


def fit(
    config: ExperimentConfig,
    data: ESPData | None = None,
    *,
    reporter: Reporter | None = None,
    run_dir: Path | None = None,
    resume_from: Path | None = None,
    allow_config_change: bool = False,
    splits: dict[str, np.ndarray] | None = None,
) -> FitResult:
    """Trains a DCMNet as `config` says and writes the run directory.

    Args:
      config: The experiment.
      data: The full dataset (split here by config.data); loaded from config.data.data_files
        (or the bundled demo set) when None.
      reporter: Called after every epoch with (epoch, metrics, latest checkpoint dir).
      run_dir: Output directory; defaults to config.run_dir.
      resume_from: A checkpoint directory to continue from exactly (params, optimizer state,
        EMA, step, RNG, best metric and history). Its config, data checksum and split must be
        this run's (see `dcmtune.train.restart.check_resume_config`).
      allow_config_change: Accept a restart whose config differs from the checkpoint's; the
        differences are recorded in the checkpoints' meta (`restarts`) and in restarts.json.
      splits: Explicit conformer indices of `data` per split ("train", "valid", "test")
        instead of config.data's split (benchmarks that choose molecules themselves); recorded
        in split.json and the checkpoints like any split.

    Returns:
      A FitResult. status "diverged" when a loss became non-finite (the run stops there).

    Raises:
      ConfigError / DataError / CheckpointError before anything is written.
    """
    run = _prepare(config, data, run_dir, resume_from, splits)  # 1. data, split, buckets
    progress = _restore(run, resume_from, allow_config_change)  # 2. the state
    config, record = _write_run_files(run, progress)  # 3. the run directory
    feeds = _feeds(run)  # 4. data on the device, or streamed
    status = "completed"
    for epoch in range(progress.start, config.training.num_epochs + 1):
        metrics = _epoch(run, progress, feeds, epoch)  # 5. train, validate
        progress.history.append(metrics)
        latest = _save(run, progress, config, record, metrics)  # 6. checkpoints, history
        _io.write_csv(run.run_dir / "history.csv", progress.history)
        log.info("epoch %d/%d %s", epoch, config.training.num_epochs, _summary(metrics))
        if reporter is not None:  # 7. report
            reporter(epoch, metrics, latest)
        if metrics["diverged"]:
            status = "diverged"
            break
    state = progress.state
    return FitResult(
        params=state.params,
        ema_params=state.ema_params,
        best_valid_loss=progress.best_loss,
        best_epoch=progress.best_epoch,
        run_dir=run.run_dir,
        history=progress.history,
        status=status,
    )


def _summary(metrics: dict) -> str:
    """train_loss, valid_loss and valid_esp_rmse of an epoch, for the log."""
    keys = ("train_loss", "valid_loss", "valid_esp_rmse")
    return " ".join(f"{k} {metrics[k]:.5g}" for k in keys)


def run_training(
    data: ESPData | None = None,
    reporter: Reporter | None = None,
    restart_checkpoint: str | None = None,
    **kwargs,
):
    """Trains from flat keyword arguments (any config field name).

    Returns:
      (params used for evaluation (EMA when use_ema), best valid loss, run directory).
    """
    config = config_from_flat(**kwargs)
    resume = Path(restart_checkpoint) if restart_checkpoint is not None else None
    res = fit(config, data, reporter=reporter, resume_from=resume)
    params = res.ema_params if config.training.use_ema else res.params
    return params, res.best_valid_loss, res.run_dir
