"""Learning-rate schedules and the optimizer, composed from optax.

Schedules count *optimizer updates*, not micro-batches: with k-step gradient accumulation an
epoch is floor(n_train / (batch_size * k)) updates, and warmup and decay end where the config
says whatever k is. A schedule here returns a *factor* of the peak learning rate; the peak itself
is a traced hyper-parameter (see `make_optimizer`), so runs that differ only in learning rate
share one compiled program.
"""

from __future__ import annotations

import dataclasses
import jax.numpy as jnp
import optax

from dcmtune.config import TrainingConfig

__all__ = ["ScheduleSpec", "schedule_spec", "lr_factor_schedule", "make_optimizer"]


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    """The static shape of a schedule, in optimizer updates (hashable: a jit static argument).

    Attributes:
      kind: "constant", "cosine", "exponential" or "step".
      warmup: Linear warmup updates (the factor rises from 1/warmup to 1).
      total: Optimizer updates in the whole run; the last update is total - 1.
      min_factor: Floor; cosine and exponential reach it exactly at the last update.
      step_every: "step": updates between drops (step_every_epochs * updates_per_epoch).
      step_factor: "step": factor applied at each drop.
    """

    kind: str
    warmup: int
    total: int
    min_factor: float = 0.0
    step_every: int = 1
    step_factor: float = 1.0


def schedule_spec(cfg: TrainingConfig, updates_per_epoch: int) -> ScheduleSpec:
    """The `ScheduleSpec` of a training config."""
    total = cfg.num_epochs * updates_per_epoch
    if not cfg.use_lr_schedule:
        return ScheduleSpec("constant", 0, total)
    warmup = cfg.effective_warmup_epochs * updates_per_epoch
    return ScheduleSpec(cfg.lr_schedule_type, warmup, total, cfg.min_lr_factor,
                        cfg.step_every_epochs * updates_per_epoch, cfg.step_factor)


def lr_factor_schedule(spec: ScheduleSpec) -> optax.Schedule:
    """Factor of the peak learning rate at update `count` (0-based).

    warmup: (count + 1) / warmup for count < warmup, so the first update is not wasted at 0.
    cosine: min + (1 - min) * (1 + cos(pi * s)) / 2, s = (count - warmup) / (total - 1 - warmup).
    exponential: min ** s.
    step: step_factor ** floor(count / step_every), never below min (count is absolute).
    """
    w, last = spec.warmup, spec.total - 1
    decay_len = max(last - w, 1)
    if spec.kind == "constant":
        return lambda count: jnp.ones_like(count, dtype=jnp.float32)
    if spec.kind == "cosine":
        decay = optax.cosine_decay_schedule(1.0, decay_len, alpha=spec.min_factor)
    elif spec.kind == "exponential":
        decay = optax.exponential_decay(1.0, decay_len, decay_rate=spec.min_factor,
                                        end_value=spec.min_factor)
    elif spec.kind == "step":
        def decay(count):  # `count` counts from the end of warmup: add it back.
            drops = jnp.floor((count + w) / spec.step_every)
            return jnp.maximum(spec.step_factor ** drops, spec.min_factor)
    else:
        raise ValueError(f"lr_schedule_type: expected cosine, exponential or step, "
                         f"got {spec.kind!r}")
    if w == 0:
        return decay
    warmup = optax.linear_schedule(1.0 / w, 1.0, w - 1) if w > 1 else (lambda c: 1.0)
    return optax.join_schedules([warmup, decay], [w])


def make_optimizer(hparams, spec: ScheduleSpec, use_grad_clip: bool
                   ) -> optax.GradientTransformation:
    """Adam with optional global-norm clipping and a scheduled learning rate.

    `hparams` may hold traced values (`learning_rate`, `grad_clip_norm`): building the chain
    inside a jitted step with them changes no state structure, so one compiled program serves
    any values. Use the same `spec` and `use_grad_clip` for `init` and `update`.
    """
    factor = lr_factor_schedule(spec)
    parts = [optax.clip_by_global_norm(hparams["grad_clip_norm"])] if use_grad_clip else []
    parts += [optax.scale_by_adam(),
              optax.scale_by_learning_rate(lambda c: hparams["learning_rate"] * factor(c))]
    return optax.chain(*parts)


def learning_rate_at(hparams, spec: ScheduleSpec, count) -> jnp.ndarray:
    """The learning rate used by the update with 0-based index `count`."""
    return hparams["learning_rate"] * lr_factor_schedule(spec)(count)

