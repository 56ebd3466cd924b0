"""One training state and the pure jitted steps on it: update, evaluate, predict.

One optimizer update consumes k = gradient_accumulation_steps micro-batches inside one jit (a
`lax.scan`), so it equals one update on a batch of batch_size * k molecules. Every number is a
traced input (learning rate and all schedule settings, loss weights, EMA decay, clip norm): runs
that differ only in them reuse one compiled program per (model, batch shape, accumulation
steps, use_grad_clip, use_ema). The steps are kept across processes (`dcmtune.train.programs`).

Cold start: the state is made by one compiled program, and the host side runs no eager jnp
work it can avoid (each eager op is a compile of its own).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcmtune.config import DataConfig, ExperimentConfig, ModelConfig, TrainingConfig
from dcmtune.data.batches import plan_buckets
from dcmtune.data.dataset import ESPData
from dcmtune.model.groups import param_group
from dcmtune.model.loss import (
    finalize_metrics,
    loss_and_sums,
    per_molecule_terms,
    predict_observables,
    term_counts,
    terms_loss_and_sums,
    zero_sums,
)
from dcmtune.train.feed import eval_batches, step_molecules
from dcmtune.train.hparams import Hparams
from dcmtune.train.programs import cached_jit, serializable
from dcmtune.train.schedules import make_optimizer

__all__ = [
    "TrainState",
    "StepConfig",
    "keep_frozen",
    "hparams_of",
    "train_step",
    "eval_step",
    "predict_step",
    "predict_batch",
    "accumulated_grads",
    "apply_model",
    "ema_decay_at",
    "evaluate_sums",
    "evaluate_params",
    "init_state",
    "add_sums",
    "compiled_programs",
]


@serializable("dcmtune.TrainState")
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
    """The static (compile-time) part of a training step: the model, which parts the
    optimizer state has, and which parameter groups stay fixed. Every number (learning rate
    and schedule, loss weights, EMA decay, clip norm) is traced (`Hparams`)."""

    model: ModelConfig
    use_grad_clip: bool = True
    use_ema: bool = True
    frozen: tuple[str, ...] = ()  # parameter groups kept fixed (training.freeze)


def hparams_of(cfg: TrainingConfig, updates_per_epoch: int) -> Hparams:
    """The traced hyper-parameters of a step (`Hparams.of`), on the device. Their values never
    shape a program."""
    return jax.device_put(Hparams.of(cfg, updates_per_epoch))


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _model(model_config: ModelConfig):
    """The DCMNet of `model_config`. dcmtune.model (e3x, and sympy through it) is imported
    here, when a program is traced: a process that reads its programs back
    (`dcmtune.train.programs`) never loads it."""
    from dcmtune.model.dcmnet import build_model

    return build_model(model_config)


def apply_model(model, params, batch):
    """Charges (B, A, n_dcm) and positions (B, A, n_dcm, 3) of `model` on `batch`: over the
    batch's neighbour pairs (`pairs`) when it has them, else over all pairs."""
    return model.apply(
        {"params": params},
        batch["Z"],
        batch["R"],
        batch["atom_mask"],
        batch["Q"],
        batch.get("pairs"),
    )


def accumulated_grads(params, batch, hparams: Hparams, model_config: ModelConfig):
    """Gradient of the loss of all micro-batches together, accumulated with a scan.

    Args:
      batch: Micro-batches stacked on a leading axis: R (k, b, A, 3), ... .

    Returns:
      (grads, sums): grads equal those of one batch holding all k*b molecules (each term is
      normalised by the molecule counts of the whole stack); sums are the metric sums.
    """
    model = _model(model_config)
    counts = term_counts(batch)

    def micro(carry, mb):
        def loss_fn(p):
            q, pos = apply_model(model, p, mb)
            return loss_and_sums(q, pos, mb, hparams, counts)

        (_, sums), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grads, acc = carry
        return (_tree_add(grads, g), _tree_add(acc, sums)), None

    init = (jax.tree.map(jnp.zeros_like, params), zero_sums(batch["esp"].dtype))
    (grads, sums), _ = jax.lax.scan(micro, init, batch)
    return grads, sums


def ema_decay_at(hparams: Hparams, step):
    """EMA decay of update `step` (0-based): min(ema_decay, (1 + step) / (10 + step)).

    The warm-up term (as in tf.train.ExponentialMovingAverage with num_updates) keeps the
    average from clinging to the random initial weights during short runs.
    """
    return jnp.minimum(hparams.ema_decay, (1.0 + step) / (10.0 + step))


def keep_frozen(new, old, frozen: tuple[str, ...], num_iterations: int):
    """`new` with the leaves of the `frozen` parameter groups taken from `old` (the same
    arrays: bit-identical). `frozen` and the tree structure are static."""
    if not frozen:
        return new

    def pick(path, n, o):
        return o if param_group(path[0].key, num_iterations) in frozen else n

    return jax.tree_util.tree_map_with_path(pick, new, old)


def train_step(state: TrainState, batch, hparams: Hparams, static: StepConfig):
    """One optimizer update from k stacked micro-batches. Pure.

    Frozen groups (`static.frozen`) get zero gradients (so they neither count in the clipping
    norm nor move Adam's moments) and keep their parameters and EMA weights exactly.

    Returns:
      (new state, metric sums of the batch evaluated with the pre-update params).
    """
    n_iter = static.model.num_iterations
    grads, sums = accumulated_grads(state.params, batch, hparams, static.model)
    grads = keep_frozen(grads, jax.tree.map(jnp.zeros_like, grads), static.frozen, n_iter)
    tx = make_optimizer(hparams, static.use_grad_clip)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = keep_frozen(
        optax.apply_updates(state.params, updates), state.params, static.frozen, n_iter
    )
    if static.use_ema:
        d = ema_decay_at(hparams, state.step.astype(jnp.float32))
        ema = optax.incremental_update(params, state.ema_params, step_size=1.0 - d)
        ema = keep_frozen(ema, state.ema_params, static.frozen, n_iter)
    else:
        ema = params
    new = dataclasses.replace(
        state, step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema
    )
    return new, sums


def predict_step(params, batch, hparams: Hparams, model_config: ModelConfig) -> dict:
    """The model on one batch: outputs, observables, per-molecule errors and metric sums. Pure.

    The one evaluation path: validation during training, analysis and prediction all use it
    (jitted once as `predict_batch`).

    Returns:
      charges (B, A, n_dcm) e, positions (B, A, n_dcm, 3) A, esp (B, G) Hartree/e, mono (B, A)
      e, dipole (B, 3) D, per-molecule esp_mse/esp_mae/mono_mae/dip_mae (B,), and `sums` (the
      batch's metric sums, see `dcmtune.model.loss.SUM_KEYS`).
    """
    model = _model(model_config)
    charges, positions = apply_model(model, params, batch)
    esp, mono, dipole = predict_observables(charges, positions, batch)
    terms = per_molecule_terms(esp, mono, dipole, batch)
    _, sums = terms_loss_and_sums(terms, mono, batch, hparams)
    return {
        "charges": charges,
        "positions": positions,
        "esp": esp,
        "mono": mono,
        "dipole": dipole,
        "esp_mse": terms["esp_mse"],
        "esp_mae": terms["esp_mae"],
        "mono_mae": terms["mono_mae"],
        "dip_mae": terms["dip_mae"],
        "sums": sums,
    }


def eval_step(params, batch, hparams: Hparams, model_config: ModelConfig):
    """Metric sums of one batch. Pure."""
    return predict_step(params, batch, hparams, model_config)["sums"]


predict_batch = cached_jit(predict_step, static_argnames=("model_config",))


@cached_jit(static_argnames=("static",))
def _update(state, data, idx, hparams: Hparams, static: StepConfig):
    """Gathers micro-batches `idx` (k, b) from device-resident `data` and applies one update."""
    batch = jax.tree.map(lambda x: x[idx], data)
    return train_step(state, batch, hparams, static)


add_sums = jax.jit(_tree_add)


@cached_jit(static_argnames=("model_config",))
def _eval_sums(params, batches, hparams: Hparams, model_config: ModelConfig):
    """Sums over stacked batches (nb, B, ...) as one program: a scan of `eval_step`."""

    def body(acc, batch):
        return _tree_add(acc, eval_step(params, batch, hparams, model_config)), None

    sums, _ = jax.lax.scan(body, zero_sums(batches["esp"].dtype), batches)
    return sums


def evaluate_sums(params, batches, hparams: Hparams, model_config: ModelConfig):
    """Metric sums of `params` over device batches, summed on the device in batch order (no
    host sync): stacked batches (nb, B, ...) in one dispatch of one scan program (`_eval_sums`),
    an iterable of batches (e.g. of several bucket shapes) one `predict_batch` per batch."""
    if isinstance(batches, dict):
        return _eval_sums(params, batches, hparams, model_config)
    sums = zero_sums()
    for batch in batches:
        sums = add_sums(sums, predict_batch(params, batch, hparams, model_config)["sums"])
    return sums


@cached_jit(static_argnames=("model_config", "use_grad_clip"))
def _init_state(
    seed, hparams: Hparams, model_config: ModelConfig, use_grad_clip: bool
) -> TrainState:
    """`init_state` as one program (keys, parameters, optimizer state): nothing compiled eagerly.

    `seed` is an int32 scalar: jax.random.PRNGKey(int) makes the same key from it.
    """
    k_init, k_data = jax.random.split(jax.random.PRNGKey(seed))
    from dcmtune.model.dcmnet import init_params

    params = init_params(_model(model_config), k_init)
    opt_state = make_optimizer(hparams, use_grad_clip).init(params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=opt_state,
        ema_params=params,
        rng=k_data,
    )


def evaluate_params(
    params,
    data: ESPData,
    model_config: ModelConfig,
    hparams: Hparams | None = None,
    batch_size: int = 16,
) -> dict[str, float]:
    """Metrics of `params` on all of `data` (loss, esp_rmse, ...), in size-bucketed batches;
    the loss with the weights of `hparams` (default: the TrainingConfig defaults)."""
    hp = Hparams.of(TrainingConfig()) if hparams is None else hparams
    buckets = plan_buckets(
        data, batch_size, 1, DataConfig.max_buckets, model_config.n_dcm, cutoff=model_config.cutoff
    )
    sizes = [step_molecules(b, batch_size, model_config) for b in buckets]
    host_batches = eval_batches(data, buckets, sizes, resident=False)()
    return finalize_metrics(
        jax.device_get(evaluate_sums(params, host_batches, hp, model_config)), hp
    )


def compiled_programs() -> dict[str, int]:
    """Programs this process holds for each kept step (traced, or read back): "update" (one
    per training shape: bucket atoms, grid points, pair slots, scan steps), "predict" (one per
    evaluation or prediction batch shape) and "eval_scan"."""
    return {
        "update": _update._cache_size(),
        "predict": predict_batch._cache_size(),
        "eval_scan": _eval_sums._cache_size(),
    }


def init_state(config: ExperimentConfig) -> TrainState:
    """A fresh TrainState from the config's seed: one root key split per purpose. Its
    structure depends on the model and use_grad_clip only (not on any hyper-parameter value)."""
    return _init_state(
        np.int32(config.random_seed),
        hparams_of(config.training, 1),
        model_config=config.model,
        use_grad_clip=config.training.use_grad_clip,
    )
