"""Learning-rate schedules and the optimizer, composed from optax.

Schedules count *optimizer updates*, not micro-batches: with k-step gradient accumulation an
epoch is a number of updates, and warmup and decay end where the config says whatever k is. A
schedule here returns a *factor* of the peak learning rate.

Every setting is a traced input: the schedule kind and its numbers travel with the peak
learning rate in the step's `Hparams` (a pytree of scalars), so runs that differ in learning
rate, schedule type, warmup, floor, step settings or length share one compiled program. That is
why the formulas are written out below rather than taken from optax's schedule factories, which
need Python numbers (they branch on them); the values are the same.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcmtune.train.hparams import Hparams

__all__ = ["lr_factor_schedule", "lr_factor", "make_optimizer", "learning_rate_at"]


def lr_factor(hp: Hparams, count, xp=jnp):
    """Factor of the peak learning rate at update `count` (0-based).

    warmup: (count + 1) / warmup for count < warmup, so the first update is not wasted at 0.
    After warmup, with s = (count - warmup) / (total - 1 - warmup) clipped to [0, 1]:
      cosine: min + (1 - min) * (1 + cos(pi * s)) / 2 (optax.cosine_decay_schedule).
      exponential: min ** s (optax.exponential_decay with end_value = min).
      step: step_factor ** floor(count / step_every), never below min (count is absolute).
      constant: 1 (no warmup either).

    Args:
      hp: The hyper-parameters (numbers or traced scalars); their schedule is used.
      count: Update index (scalar or array).
      xp: `jax.numpy` inside a jitted step; `numpy` for host-side values (no compile).
    """
    f32 = xp.float32
    c = xp.asarray(count).astype(f32)
    w = xp.asarray(hp.warmup).astype(f32)
    last = xp.asarray(hp.total).astype(f32) - 1.0
    lo = xp.asarray(hp.min_factor).astype(f32)
    decay_len = xp.maximum(last - w, 1.0)
    t = c - w  # updates since warmup ended
    s = xp.minimum(xp.maximum(t, 0.0), decay_len) / decay_len
    cosine = lo + (1.0 - lo) * 0.5 * (1.0 + xp.cos(f32(math.pi) * s))
    expo = xp.where(t <= 0, f32(1.0), xp.power(lo, xp.maximum(t, 0.0) / decay_len))
    expo = xp.where(lo < 1.0, xp.maximum(expo, lo), xp.minimum(expo, lo))
    drops = xp.floor(c / xp.asarray(hp.step_every).astype(f32))
    step = xp.maximum(xp.power(xp.asarray(hp.step_factor).astype(f32), drops), lo)
    kind = xp.asarray(hp.schedule)
    decayed = xp.where(kind == 1, cosine, xp.where(kind == 2, expo, step))
    warm = (c + 1.0) / xp.maximum(w, 1.0)
    factor = xp.where(c < w, warm, decayed)
    return xp.where(kind == 0, xp.ones_like(factor), factor).astype(f32)


def lr_factor_schedule(hp: Hparams) -> optax.Schedule:
    """`lr_factor` of `hp` as an optax schedule (count -> factor), for jitted code."""
    return lambda count: lr_factor(hp, count)


def make_optimizer(hp: Hparams, use_grad_clip: bool) -> optax.GradientTransformation:
    """Adam with optional global-norm clipping and a scheduled learning rate.

    `hp` may hold traced values: building the chain inside a jitted step with them changes no
    state structure, so one compiled program serves any values; the state's structure depends
    on `use_grad_clip` only.
    """
    factor = lr_factor_schedule(hp)
    parts = [optax.clip_by_global_norm(hp.grad_clip_norm)] if use_grad_clip else []
    parts += [
        optax.scale_by_adam(),
        optax.scale_by_learning_rate(lambda c: hp.learning_rate * factor(c)),
    ]
    return optax.chain(*parts)


def learning_rate_at(hp: Hparams, count) -> float:
    """The learning rate used by the update with 0-based index `count`, computed on the host
    (numpy: no device work, nothing to compile)."""
    host = jax.tree.map(np.asarray, hp)
    return float(np.asarray(host.learning_rate) * lr_factor(host, count, xp=np))
