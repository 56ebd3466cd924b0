"""The trainer: TrainState, pure jitted train/eval steps, and the fit loop.

One optimizer update consumes k = gradient_accumulation_steps micro-batches inside one jit (a
`lax.scan`), so it equals one update on a batch of batch_size * k molecules. An epoch uses every
training conformer once, in batches of molecules of similar size (size buckets, each padded only
to its own atoms and grid points; one compiled step per bucket shape), the order drawn from
fold_in(rng, epoch); see `dcmtune.batching` (also for the padded path, `data.batching:
padded`). Every number is a traced input (learning rate and all schedule settings, loss
weights, EMA decay, clip norm): runs that differ only in them reuse one compiled program per
(model, batch shape, accumulation steps, use_grad_clip, use_ema). Data stays on the device unless it exceeds
`data.device_data_budget_mb` (then it is streamed); the host reads metrics once per epoch.

Cold start: the state is made by one compiled program, and the host side runs no eager jnp
work it can avoid (each eager op is a compile of its own).

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
from typing import Any, Optional, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcmtune import _io
from dcmtune import batching
from dcmtune import checkpoint as ckpt
from dcmtune.config import (ConfigError, DataConfig, ExperimentConfig, ModelConfig,
                            TrainingConfig, config_from_flat, flat_dict)
from dcmtune.data import ESPData, load_dataset, split_dataset, split_record
from dcmtune.loss import (LossWeights, finalize_metrics, loss_and_sums, per_molecule_terms,
                          predict_observables, term_counts, terms_loss_and_sums, zero_sums)
from dcmtune.programs import cached_jit
from dcmtune.schedules import learning_rate_at, make_optimizer, schedule_spec

__all__ = ["TrainState", "StepConfig", "Reporter", "FitResult", "hparams_of", "train_step",
           "eval_step", "predict_step", "predict_batch", "accumulated_grads", "fit",
           "run_training", "evaluate_params", "evaluate_sums", "TIMING_KEYS"]

log = logging.getLogger(__name__)

TIMING_KEYS = ("epoch_time", "batch_time")


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly.

    Attributes:
      step: Optimizer updates done.
      params: Model parameters.
      opt_state: optax state (Adam moments, schedule count).
      ema_params: Exponential moving average of params (used for evaluation when use_ema).
      rng: PRNG key for the per-epoch permutations (fold_in with the epoch).
    """

    step: jnp.ndarray
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static (compile-time) part of a training step: the model, and which parts the
    optimizer state has. Every number (learning rate and schedule, loss weights, EMA decay,
    clip norm) is traced (`hparams_of`)."""

    model: ModelConfig
    use_grad_clip: bool = True
    use_ema: bool = True


class Reporter(Protocol):
    def __call__(self, epoch: int, metrics: dict[str, float],
                 checkpoint_dir: Optional[Path]) -> None: ...


@dataclasses.dataclass
class FitResult:
    params: Any
    ema_params: Any
    best_valid_loss: float
    best_epoch: int
    run_dir: Path
    history: list[dict]
    status: str  # "completed" or "diverged"


def hparams_of(cfg: TrainingConfig, updates_per_epoch: int) -> dict[str, Any]:
    """The traced hyper-parameters of a step, on the device: float32 scalars, and "schedule"
    (`ScheduleSpec`, the schedule in optimizer updates). Their values never shape a program."""
    hp: dict[str, Any] = {k: np.float32(getattr(cfg, k)) for k in
                          ("learning_rate", "grad_clip_norm", "ema_decay", "esp_w", "chg_w",
                           "dip_w")}
    hp["schedule"] = schedule_spec(cfg, updates_per_epoch)
    return jax.device_put(hp)


def _weights(hparams) -> LossWeights:
    return LossWeights(hparams["esp_w"], hparams["chg_w"], hparams["dip_w"])


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _model(model_config: ModelConfig):
    """The DCMNet of `model_config`. dcmtune.model (e3x, and sympy through it) is imported
    here, when a program is traced: a process that reads its programs back
    (`dcmtune.programs`) never loads it."""
    from dcmtune.model import build_model

    return build_model(model_config)


def accumulated_grads(params, batch, hparams, model_config: ModelConfig):
    """Gradient of the loss of all micro-batches together, accumulated with a scan.

    Args:
      batch: Micro-batches stacked on a leading axis: R (k, b, A, 3), ... .

    Returns:
      (grads, sums): grads equal those of one batch holding all k*b molecules (each term is
      normalised by the molecule counts of the whole stack); sums are the metric sums.
    """
    model = _model(model_config)
    weights = _weights(hparams)
    counts = term_counts(batch)

    def micro(carry, mb):
        def loss_fn(p):
            q, pos = model.apply({"params": p}, mb["Z"], mb["R"], mb["atom_mask"], mb["Q"])
            return loss_and_sums(q, pos, mb, weights, counts)

        (_, sums), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grads, acc = carry
        return (_tree_add(grads, g), _tree_add(acc, sums)), None

    init = (jax.tree.map(jnp.zeros_like, params), zero_sums(batch["esp"].dtype))
    (grads, sums), _ = jax.lax.scan(micro, init, batch)
    return grads, sums


def ema_decay_at(hparams, step):
    """EMA decay of update `step` (0-based): min(ema_decay, (1 + step) / (10 + step)).

    The warm-up term (as in tf.train.ExponentialMovingAverage with num_updates) keeps the
    average from clinging to the random initial weights during short runs.
    """
    return jnp.minimum(hparams["ema_decay"], (1.0 + step) / (10.0 + step))


def train_step(state: TrainState, batch, hparams, static: StepConfig):
    """One optimizer update from k stacked micro-batches. Pure.

    Returns:
      (new state, metric sums of the batch evaluated with the pre-update params).
    """
    grads, sums = accumulated_grads(state.params, batch, hparams, static.model)
    tx = make_optimizer(hparams, static.use_grad_clip)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if static.use_ema:
        d = ema_decay_at(hparams, state.step.astype(jnp.float32))
        ema = optax.incremental_update(params, state.ema_params, step_size=1.0 - d)
    else:
        ema = params
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
    return new, sums


def predict_step(params, batch, weights: LossWeights, model_config: ModelConfig) -> dict:
    """The model on one batch: outputs, observables, per-molecule errors and metric sums. Pure.

    The one evaluation path: validation during training, analysis and prediction all use it
    (jitted once as `predict_batch`).

    Returns:
      charges (B, A, n_dcm) e, positions (B, A, n_dcm, 3) A, esp (B, G) Hartree/e, mono (B, A)
      e, dipole (B, 3) D, per-molecule esp_mse/esp_mae/mono_mae/dip_mae (B,), and `sums` (the
      batch's metric sums, see `dcmtune.loss.SUM_KEYS`).
    """
    model = _model(model_config)
    charges, positions = model.apply({"params": params}, batch["Z"], batch["R"],
                                     batch["atom_mask"], batch["Q"])
    esp, mono, dipole = predict_observables(charges, positions, batch)
    terms = per_molecule_terms(esp, mono, dipole, batch)
    _, sums = terms_loss_and_sums(terms, mono, batch, weights)
    return {"charges": charges, "positions": positions, "esp": esp, "mono": mono,
            "dipole": dipole, "esp_mse": terms["esp_mse"], "esp_mae": terms["esp_mae"],
            "mono_mae": terms["mono_mae"], "dip_mae": terms["dip_mae"], "sums": sums}


def eval_step(params, batch, weights: LossWeights, model_config: ModelConfig):
    """Metric sums of one batch. Pure."""
    return predict_step(params, batch, weights, model_config)["sums"]


predict_batch = cached_jit(predict_step, static_argnames=("model_config",))


@cached_jit(static_argnames=("static",))
def _update(state, data, idx, hparams, static: StepConfig):
    """Gathers micro-batches `idx` (k, b) from device-resident `data` and applies one update."""
    batch = jax.tree.map(lambda x: x[idx], data)
    return train_step(state, batch, hparams, static)


_add_sums = jax.jit(_tree_add)


@cached_jit(static_argnames=("model_config",))
def _eval_sums(params, batches, weights: LossWeights, model_config: ModelConfig):
    """Sums over stacked batches (nb, B, ...) as one program: a scan of `eval_step`."""
    def body(acc, batch):
        return _tree_add(acc, eval_step(params, batch, weights, model_config)), None

    sums, _ = jax.lax.scan(body, zero_sums(batches["esp"].dtype), batches)
    return sums


def evaluate_sums(params, batches, weights: LossWeights, model_config: ModelConfig):
    """Metric sums of `params` over device batches, summed on the device in batch order (no
    host sync): stacked batches (nb, B, ...) in one dispatch of one scan program (`_eval_sums`),
    an iterable of batches (e.g. of several bucket shapes) one `predict_batch` per batch."""
    if isinstance(batches, dict):
        return _eval_sums(params, batches, weights, model_config)
    sums = zero_sums()
    for batch in batches:
        sums = _add_sums(sums, predict_batch(params, batch, weights, model_config)["sums"])
    return sums


@cached_jit(static_argnames=("model_config", "use_grad_clip"))
def _init_state(seed, hparams, model_config: ModelConfig, use_grad_clip: bool) -> "TrainState":
    """`init_state` as one program (keys, parameters, optimizer state): nothing compiled eagerly.

    `seed` is an int32 scalar: jax.random.PRNGKey(int) makes the same key from it.
    """
    k_init, k_data = jax.random.split(jax.random.PRNGKey(seed))
    from dcmtune.model import init_params

    params = init_params(_model(model_config), k_init)
    opt_state = make_optimizer(hparams, use_grad_clip).init(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      ema_params=params, rng=k_data)


def evaluate_params(params, data: ESPData, model_config: ModelConfig,
                    weights: LossWeights = LossWeights(), batch_size: int = 16
                    ) -> dict[str, float]:
    """Metrics of `params` on all of `data` (loss, esp_rmse, ...), in size-bucketed batches."""
    buckets = batching.plan_buckets(data, batch_size, 1, DataConfig.max_buckets,
                                    model_config.n_dcm)
    batches = batching.eval_batches(data, buckets, batch_size, resident=False)()
    w = LossWeights(*(jnp.asarray(x, jnp.float32) for x in weights))
    return finalize_metrics(jax.device_get(evaluate_sums(params, batches, w, model_config)),
                            weights)


def init_state(config: ExperimentConfig) -> TrainState:
    """A fresh TrainState from the config's seed: one root key split per purpose. Its
    structure depends on the model and use_grad_clip only (not on any hyper-parameter value)."""
    return _init_state(np.int32(config.random_seed), hparams_of(config.training, 1),
                       model_config=config.model, use_grad_clip=config.training.use_grad_clip)


def _updates_per_epoch(n_train: int, cfg: TrainingConfig) -> int:
    per_update = cfg.batch_size * cfg.gradient_accumulation_steps
    upe = n_train // per_update
    if upe < 1:
        raise ConfigError(f"training.batch_size: batch_size x gradient_accumulation_steps = "
                          f"{per_update} exceeds the {n_train} training conformers")
    return upe


def _train_buckets(train: ESPData, config: ExperimentConfig,
                   resume_from: Optional[Path] = None) -> tuple[list, int]:
    """The training buckets and updates per epoch (`dcmtune.batching`). A resumed run keeps
    the atom bounds its checkpoint recorded (the plan depends on num_epochs, which a restart
    may change under a constant learning rate)."""
    t, d = config.training, config.data
    upe = _updates_per_epoch(train.num_conformers, t)
    if d.batching == "padded":
        return batching.padded_bucket(train), upe
    saved = None
    if resume_from is not None and (Path(resume_from) / ckpt.META_FILE).is_file():
        saved = ckpt.read_meta(Path(resume_from)).get("bucket_bounds")
    if saved and int(train.N.max()) <= saved[-1]:
        buckets = batching.plan_from_bounds(train, saved)
    else:
        buckets = batching.plan_buckets(train, t.batch_size, t.gradient_accumulation_steps,
                                        d.max_buckets, config.model.n_dcm, t.num_epochs)
    slots = t.batch_size * t.gradient_accumulation_steps
    return buckets, batching.num_updates(buckets, slots)


def _split(config: ExperimentConfig, data: ESPData) -> dict[str, np.ndarray]:
    d = config.data
    try:
        return split_dataset(data, d)
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None


# What a restart may change without --allow-config-change: bookkeeping (where the run writes,
# its notes), the checkpoint cadence, and the data file paths (the data itself is checked by
# checksum). num_epochs may change only under a constant learning rate, where it shapes nothing.
# Where the data lives (device or streamed) gives the same results, so its budget is free too.
_RESTART_FREE = frozenset({"name", "output_dir", "description", "notes", "created_at",
                           "git_commit", "data.data_files", "data.device_data_budget_mb",
                           "training.save_every_n_epochs", "training.keep_top_k_checkpoints"})
# Keys added after checkpoints were written, with the value that applied before them: a
# checkpoint without data.batching was trained on padded batches.
_LEGACY_VALUES = {"data.batching": "padded", "data.max_buckets": DataConfig.max_buckets,
                  "data.device_data_budget_mb": DataConfig.device_data_budget_mb}


def _check_resume_config(meta: dict, config: ExperimentConfig, where: Path, *,
                         data_checksum: Optional[str] = None,
                         splits: Optional[dict] = None,
                         allow_change: bool = False) -> dict:
    """Refuses a restart that would silently continue another run.

    The checkpoint's config, data checksum and split must equal this run's, except for the
    fields in `_RESTART_FREE` (and num_epochs under a constant learning rate). With
    `allow_change` every difference is accepted; either way the differences are returned as
    {dotted key: [checkpoint's value, this run's value]} so the run can record them.

    Raises:
      CheckpointError: one line naming the first differing field.
    """
    saved_raw = meta.get("config")
    if not isinstance(saved_raw, dict):
        raise ckpt.CheckpointError(f"{where}: meta.json holds no run config; cannot restart")
    saved = {**_LEGACY_VALUES, **flat_dict(saved_raw)}
    now = flat_dict(config.to_dict())
    changes = {k: [saved.get(k), now.get(k)] for k in sorted(set(saved) | set(now))
               if saved.get(k) != now.get(k)}
    if data_checksum is not None and meta.get("data_checksum") not in (None, data_checksum):
        changes["data.checksum"] = [meta.get("data_checksum"), data_checksum]
    saved_split = (meta.get("split") or {}).get("indices")
    if splits is not None and saved_split is not None:
        now_split = {k: [int(i) for i in v] for k, v in splits.items()}
        if saved_split != now_split:
            changes["data.split"] = ["as recorded in the checkpoint", "another assignment"]
    constant_lr = not config.training.use_lr_schedule and not saved_raw.get(
        "training", {}).get("use_lr_schedule", True)
    refused = [k for k in changes if k not in _RESTART_FREE
               and not (k == "training.num_epochs" and constant_lr)]
    if refused and not allow_change:
        key = refused[0]
        was, is_ = changes[key]
        what = ("checkpoint is of another architecture: " if key.startswith("model.") else "")
        raise ckpt.CheckpointError(
            f"{where}: {what}{key} = {is_!r} differs from the checkpoint's {was!r}; a restart "
            "continues the checkpoint's run (pass --allow-config-change to accept and record "
            "the change)")
    return {k: v for k, v in changes.items()
            if k not in ("name", "output_dir", "created_at", "git_commit")}


def _set_aside_stale(ckpt_root: Path, meta: dict) -> None:
    """A restart from an older checkpoint: `best/` and `epoch_N/` written after it by the
    abandoned attempt are moved aside, so they can never be reported for this run."""
    start = int(meta["epoch"])
    stale = []
    best = ckpt_root / "best"
    if best.is_dir():
        try:
            best_epoch = int(ckpt.read_meta(best).get("epoch", -1))
        except ckpt.CheckpointError:
            best_epoch = -1
        if best_epoch != int(meta.get("best_epoch", 0)) or best_epoch > start:
            stale.append(best)
    for d in ckpt_root.glob("epoch_*"):
        tail = d.name.split("_", 1)[1]
        if tail.isdigit() and int(tail) > start:
            stale.append(d)
    for d in stale:
        moved = _io.move_aside(d, f".stale-{d.name}")
        log.warning("%s: written after the restart point (epoch %d) by an abandoned attempt; "
                    "moved to %s", d, start, moved.name)


def _check_writable(run_dir: Path) -> None:
    """Refuses a run directory that cannot be created or written, before any compute."""
    problem = _io.writable_problem(run_dir)
    if problem:
        raise ConfigError(f"output_dir: {problem} (run directory {run_dir})")


def fit(config: ExperimentConfig, data: Optional[ESPData] = None, *,
        reporter: Optional[Reporter] = None, run_dir: Optional[Path] = None,
        resume_from: Optional[Path] = None, allow_config_change: bool = False) -> FitResult:
    """Trains a DCMNet as `config` says and writes the run directory.

    Args:
      config: The experiment.
      data: The full dataset (split here by config.data); loaded from config.data.data_files
        (or the bundled demo set) when None.
      reporter: Called after every epoch with (epoch, metrics, latest checkpoint dir).
      run_dir: Output directory; defaults to config.run_dir.
      resume_from: A checkpoint directory to continue from exactly (params, optimizer state,
        EMA, step, RNG, best metric and history). Its config, data checksum and split must be
        this run's (see `_check_resume_config`).
      allow_config_change: Accept a restart whose config differs from the checkpoint's; the
        differences are recorded in the checkpoints' meta (`restarts`) and in restarts.json.

    Returns:
      A FitResult. status "diverged" when a loss became non-finite (the run stops there).

    Raises:
      ConfigError / DataError / CheckpointError before anything is written.
    """
    t_cfg = config.training
    run_dir = Path(run_dir) if run_dir is not None else config.run_dir

    # 1. Data and split (errors here leave no trace on disk).
    if data is None:
        data = load_dataset(config.data.data_files, config.model.max_atomic_number,
                            config.data.dipole_units)
    splits = _split(config, data)
    train, valid = data.subset(splits["train"]), data.subset(splits["valid"])
    buckets, upe = _train_buckets(train, config, resume_from)
    static = StepConfig(config.model, t_cfg.use_grad_clip, t_cfg.use_ema)
    hp = hparams_of(t_cfg, upe)
    weights = _weights(hp)

    # 2. State: fresh, or restored exactly (the config is checked before anything compiles).
    history: list[dict] = []
    restarts: list[dict] = []
    best_loss, best_epoch, start = math.inf, 0, 1
    if resume_from is not None:
        meta = ckpt.verify_checkpoint(Path(resume_from))
        changes = _check_resume_config(meta, config, Path(resume_from),
                                       data_checksum=data.checksum(), splits=splits,
                                       allow_change=allow_config_change)
        _check_writable(run_dir)
        state, meta = ckpt.load_checkpoint(Path(resume_from), template=init_state(config))
        history = [dict(r) for r in meta.get("history", [])]
        restarts = [dict(r) for r in meta.get("restarts", [])]
        if changes:
            restarts.append({"from_epoch": int(meta["epoch"]), "checkpoint": str(resume_from),
                             "at": datetime.datetime.now().isoformat(timespec="seconds"),
                             "allow_config_change": bool(allow_config_change),
                             "changes": changes})
        best_loss = meta.get("best_valid_loss", math.inf)
        best_loss = math.inf if best_loss is None else float(best_loss)
        best_epoch, start = int(meta.get("best_epoch", 0)), int(meta["epoch"]) + 1
        _set_aside_stale(run_dir / "checkpoints", meta)
        log.info("resuming from %s at epoch %d", resume_from, start)
    elif (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        raise ckpt.CheckpointError(
            f"{run_dir}: already holds checkpoints; resume from {run_dir}/checkpoints/latest "
            "or choose another name/output_dir")
    else:
        _check_writable(run_dir)
        state = init_state(config)

    # 3. Run directory: resolved config and split, written once.
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    if not config.created_at:  # a resumed run keeps the date it was created
        created = (meta.get("config") or {}).get("created_at") if resume_from else None
        config = config.replace(
            created_at=created or datetime.datetime.now().isoformat(timespec="seconds"))
    _io.write_json(run_dir / "config.json", config.to_dict())
    record = split_record(
        data, splits, split_by=config.data.split_by, split_seed=config.data.split_seed,
        train_molecules=config.data.train_molecules, data_files=list(config.data.data_files))
    data_checksum = record["checksum"]
    _io.write_json(run_dir / "split.json", record)
    if restarts:
        _io.write_json(run_dir / "restarts.json", restarts)

    # 4. Data on the device, or streamed from host memory above the budget.
    k, b = t_cfg.gradient_accumulation_steps, t_cfg.batch_size
    bucketed = config.data.batching == "bucketed"
    valid_buckets = (batching.assign_buckets(valid, buckets) if bucketed
                     else batching.padded_bucket(valid))
    mb = (batching.batch_bytes(train, buckets) + batching.batch_bytes(valid, valid_buckets)) / 2**20
    resident = mb <= config.data.device_data_budget_mb
    log.info("data: %s batches, train buckets (atoms x grid points (conformers)) %s; %.1f MB "
             "%s data.device_data_budget_mb = %g: %s", config.data.batching,
             batching.describe(buckets), mb, "<=" if resident else ">",
             config.data.device_data_budget_mb,
             "device-resident" if resident else "streamed from host memory")
    feed = batching.TrainFeed(train, buckets, resident)
    valid_batches = batching.eval_batches(valid, valid_buckets, b * k, resident)

    status = "completed"
    for epoch in range(start, t_cfg.num_epochs + 1):
        # 5. One epoch of updates, dispatched asynchronously.
        t0 = time.perf_counter()
        key = jax.random.fold_in(state.rng, epoch)
        updates = (batching.epoch_updates(buckets, b, k, key) if bucketed
                   else batching.padded_updates(train.num_conformers, b, k, key))
        sums = zero_sums()
        for inputs, idx in feed.inputs(updates):
            state, s = _update(state, inputs, idx, hp, static)
            sums = _add_sums(sums, s)
        train_metrics = finalize_metrics(jax.device_get(sums), weights)
        t_train = time.perf_counter() - t0

        # 6. Validation with the EMA weights.
        eval_params = state.ema_params if t_cfg.use_ema else state.params
        valid_metrics = finalize_metrics(jax.device_get(
            evaluate_sums(eval_params, valid_batches(), weights, config.model)), weights)
        step = int(state.step)
        metrics: dict[str, float] = {"epoch": epoch, "step": step,
                                     "lr": learning_rate_at(hp, step - 1)}
        metrics.update({f"train_{k_}": v for k_, v in train_metrics.items()})
        metrics.update({f"valid_{k_}": v for k_, v in valid_metrics.items()})
        diverged = not (math.isfinite(metrics["train_loss"])
                        and math.isfinite(metrics["valid_loss"]))
        improved = not diverged and metrics["valid_loss"] < best_loss
        if improved:
            best_loss, best_epoch = metrics["valid_loss"], epoch
        metrics.update(best_valid_loss=best_loss, best_epoch=best_epoch,
                       diverged=int(diverged), epoch_time=time.perf_counter() - t0,
                       batch_time=t_train / upe)
        history.append(metrics)

        # 7. Checkpoints (never of a diverged state), history, report.
        latest = None
        if diverged:
            status = "diverged"
            log.warning("epoch %d: non-finite loss (train %s, valid %s); stopping", epoch,
                        metrics["train_loss"], metrics["valid_loss"])
        else:
            meta = {"epoch": epoch, "step": step, "metrics": metrics, "history": history,
                    "best_valid_loss": best_loss, "best_epoch": best_epoch,
                    "config": config.to_dict(), "data_checksum": data_checksum,
                    "split": record, "restarts": restarts,
                    "bucket_bounds": [bk.num_atoms for bk in buckets]}
            latest = ckpt.save_checkpoint(ckpt_root / "latest", state, meta)
            if improved:
                ckpt.save_checkpoint(ckpt_root / "best", state, meta)
            if t_cfg.save_every_n_epochs and epoch % t_cfg.save_every_n_epochs == 0:
                ckpt.save_checkpoint(ckpt_root / f"epoch_{epoch}", state, meta)
                ckpt.prune_periodic(ckpt_root, t_cfg.keep_top_k_checkpoints)
        _io.write_csv(run_dir / "history.csv", history)
        log.info("epoch %d/%d train_loss %.5g valid_loss %.5g valid_esp_rmse %.4g", epoch,
                 t_cfg.num_epochs, metrics["train_loss"], metrics["valid_loss"],
                 metrics["valid_esp_rmse"])
        if reporter is not None:
            reporter(epoch, metrics, latest)
        if diverged:
            break

    return FitResult(params=state.params, ema_params=state.ema_params, best_valid_loss=best_loss,
                     best_epoch=best_epoch, run_dir=run_dir, history=history, status=status)


def run_training(data: Optional[ESPData] = None, reporter: Optional[Reporter] = None,
                 restart_checkpoint: Optional[str] = None, **kwargs):
    """Trains from flat keyword arguments (any config field name).

    Returns:
      (params used for evaluation (EMA when use_ema), best valid loss, run directory).
    """
    config = config_from_flat(**kwargs)
    res = fit(config, data, reporter=reporter, resume_from=restart_checkpoint)
    params = res.ema_params if config.training.use_ema else res.params
    return params, res.best_valid_loss, res.run_dir


if __name__ == "__main__":  # `python -m dcmtune.train`: the CLI lives in dcmtune.train_cli.
    from dcmtune.train_cli import main

    raise SystemExit(main())
