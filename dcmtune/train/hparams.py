"""`Hparams`: every traced hyper-parameter of a training step, one typed pytree of scalars.

The learning-rate schedule (kind, warmup, length, floor, step settings), the peak learning
rate, gradient clipping, EMA decay and the loss weights travel into the jitted steps as traced
scalars, so runs that differ only in them share one compiled program per shape; their values
never shape a program. The schedule counts optimizer updates (`Hparams.of` converts the
config's epochs with the run's updates per epoch).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from dcmtune.config import TrainingConfig
from dcmtune.train.programs import serializable

__all__ = ["Hparams", "SCHEDULE_KINDS"]

# The index of a kind is its traced code; "constant" is also what use_lr_schedule=False means.
SCHEDULE_KINDS = ("constant", "cosine", "exponential", "step")


@serializable("dcmtune.Hparams")
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Hparams:
    """The traced hyper-parameters of a step (numpy or JAX scalars; never static).

    Attributes:
      learning_rate: Peak learning rate (after warmup) (float32).
      schedule: Index into SCHEDULE_KINDS (int32).
      warmup: Linear warmup in optimizer updates; the factor rises from 1/warmup to 1 (int32).
      total: Optimizer updates in the whole run; the last update is total - 1 (int32).
      min_factor: Floor of the schedule; cosine and exponential reach it exactly at the last
        update (float32).
      step_every: "step": updates between drops (int32).
      step_factor: "step": factor applied at each drop (float32).
      grad_clip_norm: Global-norm clip of the accumulated gradient (float32; used only when
        the step's static use_grad_clip is set).
      ema_decay: Largest EMA decay (float32).
      esp_w, chg_w, dip_w: Loss weights of the ESP (Hartree/e)^2, monopole e^2 and dipole
        Debye^2 terms (float32).
    """

    learning_rate: Any
    schedule: Any
    warmup: Any
    total: Any
    min_factor: Any
    step_every: Any
    step_factor: Any
    grad_clip_norm: Any
    ema_decay: Any
    esp_w: Any
    chg_w: Any
    dip_w: Any

    @classmethod
    def of(cls, cfg: TrainingConfig, updates_per_epoch: int = 1) -> Hparams:
        """The hyper-parameters of a training config, its epochs converted to updates.

        Raises:
          ValueError: a schedule kind that is not in SCHEDULE_KINDS (the config refuses it
            first).
        """
        if cfg.use_lr_schedule:
            kind, warmup = cfg.lr_schedule_type, cfg.effective_warmup_epochs * updates_per_epoch
        else:
            kind, warmup = "constant", 0
        if kind not in SCHEDULE_KINDS:
            raise ValueError(
                f"lr_schedule_type: expected cosine, exponential or step, got {kind!r}"
            )
        i32, f32 = np.int32, np.float32
        return cls(
            learning_rate=f32(cfg.learning_rate),
            schedule=i32(SCHEDULE_KINDS.index(kind)),
            warmup=i32(warmup),
            total=i32(cfg.num_epochs * updates_per_epoch),
            min_factor=f32(cfg.min_lr_factor if cfg.use_lr_schedule else 0.0),
            step_every=i32(max(cfg.step_every_epochs * updates_per_epoch, 1)),
            step_factor=f32(cfg.step_factor if cfg.use_lr_schedule else 1.0),
            grad_clip_norm=f32(cfg.grad_clip_norm),
            ema_decay=f32(cfg.ema_decay),
            esp_w=f32(cfg.esp_w),
            chg_w=f32(cfg.chg_w),
            dip_w=f32(cfg.dip_w),
        )

    @classmethod
    def for_schedule(
        cls,
        kind: str,
        warmup: int,
        total: int,
        min_factor: float = 0.0,
        step_every: int = 1,
        step_factor: float = 1.0,
        **fields: Any,
    ) -> Hparams:
        """A schedule given in optimizer updates (for a custom loop, a test, a bench); the other
        fields are the TrainingConfig defaults unless given in `fields`.

        Raises:
          ValueError: an unknown kind (naming lr_schedule_type).
        """
        if kind not in SCHEDULE_KINDS:
            raise ValueError(
                f"lr_schedule_type: expected one of {', '.join(SCHEDULE_KINDS)}, got {kind!r}"
            )
        i32, f32 = np.int32, np.float32
        base = cls.of(TrainingConfig())
        return dataclasses.replace(
            base,
            schedule=i32(SCHEDULE_KINDS.index(kind)),
            warmup=i32(warmup),
            total=i32(total),
            min_factor=f32(min_factor),
            step_every=i32(max(step_every, 1)),
            step_factor=f32(step_factor),
            **{k: f32(v) for k, v in fields.items()},
        )

    def replace(self, **changes: Any) -> Hparams:
        """A copy with some fields changed (e.g. `hp.replace(learning_rate=np.float32(1e-3))`)."""
        return dataclasses.replace(self, **changes)
