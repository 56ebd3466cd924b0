"""Learning-rate schedules and the optimizer, composed from optax.

Schedules count *optimizer updates*, not micro-batches: with k-step gradient accumulation an
epoch is floor(n_train / (batch_size * k)) updates, and warmup and decay end where the config
says whatever k is. A schedule here returns a *factor* of the peak learning rate.

Every setting is a traced input: the schedule kind and its numbers (`ScheduleSpec`, a pytree
of scalars) travel with the peak learning rate in the step's `hparams`, so runs that differ
in learning rate, schedule type, warmup, floor, step settings or length share one compiled
program. That is why the formulas are written out below rather than taken from optax's
schedule factories, which need Python numbers (they branch on them); the values are the same.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcmtune.config import TrainingConfig

__all__ = ["SCHEDULE_KINDS", "ScheduleSpec", "schedule_spec", "lr_factor_schedule",
           "lr_factor", "make_optimizer", "learning_rate_at"]

# The index of a kind is its traced code; "constant" is also what use_lr_schedule=False means.
SCHEDULE_KINDS = ("constant", "cosine", "exponential", "step")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    """A schedule in optimizer updates: a pytree of scalars (traced inside a jitted step).

    Attributes:
      kind: Index into SCHEDULE_KINDS (int32).
      warmup: Linear warmup updates (the factor rises from 1/warmup to 1) (int32).
      total: Optimizer updates in the whole run; the last update is total - 1 (int32).
      min_factor: Floor; cosine and exponential reach it exactly at the last update (float32).
      step_every: "step": updates between drops (step_every_epochs * updates_per_epoch) (int32).
      step_factor: "step": factor applied at each drop (float32).
    """

    kind: Any
    warmup: Any
    total: Any
    min_factor: Any
    step_every: Any
    step_factor: Any

    @classmethod
    def of(cls, kind: str, warmup: int, total: int, min_factor: float = 0.0,
           step_every: int = 1, step_factor: float = 1.0) -> "ScheduleSpec":
        """A spec from a kind name and numbers (as numpy scalars of fixed dtypes).

        Raises:
          ValueError: an unknown kind.
        """
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"lr_schedule_type: expected cosine, exponential or step, "
                             f"got {kind!r}")
        i32, f32 = np.int32, np.float32
        return cls(i32(SCHEDULE_KINDS.index(kind)), i32(warmup), i32(total), f32(min_factor),
                   i32(max(step_every, 1)), f32(step_factor))


def schedule_spec(cfg: TrainingConfig, updates_per_epoch: int) -> ScheduleSpec:
    """The `ScheduleSpec` of a training config."""
    total = cfg.num_epochs * updates_per_epoch
    if not cfg.use_lr_schedule:
        return ScheduleSpec.of("constant", 0, total)
    warmup = cfg.effective_warmup_epochs * updates_per_epoch
    return ScheduleSpec.of(cfg.lr_schedule_type, warmup, total, cfg.min_lr_factor,
                           cfg.step_every_epochs * updates_per_epoch, cfg.step_factor)


def lr_factor(spec: ScheduleSpec, count, xp=jnp):
    """Factor of the peak learning rate at update `count` (0-based).

    warmup: (count + 1) / warmup for count < warmup, so the first update is not wasted at 0.
    After warmup, with s = (count - warmup) / (total - 1 - warmup) clipped to [0, 1]:
      cosine: min + (1 - min) * (1 + cos(pi * s)) / 2 (optax.cosine_decay_schedule).
      exponential: min ** s (optax.exponential_decay with end_value = min).
      step: step_factor ** floor(count / step_every), never below min (count is absolute).
      constant: 1 (no warmup either).

    Args:
      spec: The schedule (numbers or traced scalars).
      count: Update index (scalar or array).
      xp: `jax.numpy` inside a jitted step; `numpy` for host-side values (no compile).
    """
    f32 = xp.float32
    c = xp.asarray(count).astype(f32)
    w = xp.asarray(spec.warmup).astype(f32)
    last = xp.asarray(spec.total).astype(f32) - 1.0
    lo = xp.asarray(spec.min_factor).astype(f32)
    decay_len = xp.maximum(last - w, 1.0)
    t = c - w  # updates since warmup ended
    s = xp.minimum(xp.maximum(t, 0.0), decay_len) / decay_len
    cosine = lo + (1.0 - lo) * 0.5 * (1.0 + xp.cos(f32(math.pi) * s))
    expo = xp.where(t <= 0, f32(1.0), xp.power(lo, xp.maximum(t, 0.0) / decay_len))
    expo = xp.where(lo < 1.0, xp.maximum(expo, lo), xp.minimum(expo, lo))
    drops = xp.floor(c / xp.asarray(spec.step_every).astype(f32))
    step = xp.maximum(xp.power(xp.asarray(spec.step_factor).astype(f32), drops), lo)
    kind = xp.asarray(spec.kind)
    decayed = xp.where(kind == 1, cosine, xp.where(kind == 2, expo, step))
    warm = (c + 1.0) / xp.maximum(w, 1.0)
    factor = xp.where(c < w, warm, decayed)
    return xp.where(kind == 0, xp.ones_like(factor), factor).astype(f32)


def lr_factor_schedule(spec: ScheduleSpec) -> optax.Schedule:
    """`lr_factor` of `spec` as an optax schedule (count -> factor), for jitted code."""
    return lambda count: lr_factor(spec, count)


def make_optimizer(hparams, use_grad_clip: bool) -> optax.GradientTransformation:
    """Adam with optional global-norm clipping and a scheduled learning rate.

    `hparams` may hold traced values (`learning_rate`, `grad_clip_norm`, `schedule`): building
    the chain inside a jitted step with them changes no state structure, so one compiled
    program serves any values; the state's structure depends on `use_grad_clip` only.
    """
    factor = lr_factor_schedule(hparams["schedule"])
    parts = [optax.clip_by_global_norm(hparams["grad_clip_norm"])] if use_grad_clip else []
    parts += [optax.scale_by_adam(),
              optax.scale_by_learning_rate(lambda c: hparams["learning_rate"] * factor(c))]
    return optax.chain(*parts)


def learning_rate_at(hparams, count) -> float:
    """The learning rate used by the update with 0-based index `count`, computed on the host
    (numpy: no device work, nothing to compile)."""
    spec = jax.tree.map(np.asarray, hparams["schedule"])
    return float(np.asarray(hparams["learning_rate"]) * lr_factor(spec, count, xp=np))
