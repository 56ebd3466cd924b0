"""Tune's logger callbacks for a sweep: one TensorBoard stream per trial, MLflow and W&B.

Tune adds CSV, JSON and TensorBoard loggers unless it is given its own. A sweep gives it CSV and
JSON loggers (Tune's result analysis reads them) and `NoTuneEvents` in place of the TensorBoard
logger: the trainer writes each trial's event stream itself (`dcmtune.train.tensorboard`), so a
trial directory holds one stream, not two. The spec's `tracking:` adds Ray's `MLflowLoggerCallback`
and `WandbLoggerCallback` (one run per trial, every reported result, the epoch's metrics under
their registry names; W&B's local files in <experiment>/wandb/, written there directly rather
than synced from Tune's staging directory). These objects are pickled with the experiment, so
`--resume` keeps them.
"""

from __future__ import annotations

import sys

from ray.air.integrations.wandb import WandbLoggerCallback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

from dcmtune.train.tracking import TrackingSpec

__all__ = ["NoTuneEvents", "WandbCallback", "tune_callbacks"]


class NoTuneEvents(TBXLoggerCallback):
    """Takes the place of Tune's TensorBoard logger (Tune adds one unless one is given) and
    writes nothing."""

    def log_trial_start(self, trial) -> None:
        pass

    def log_trial_result(self, iteration, trial, result) -> None:
        pass

    def log_trial_end(self, trial, failed: bool = False) -> None:
        pass


class WandbCallback(WandbLoggerCallback):
    """Ray's W&B logger that needs no API key when `mode` is offline or disabled (Ray's own
    looks only at the WANDB_MODE environment variable for that) and keeps quiet at exit."""

    def setup(self, *args, **kwargs):
        if self.kwargs.get("mode") in ("offline", "disabled"):
            self.api_key_file = None
            return
        super().setup(*args, **kwargs)

    def __del__(self):
        # Ray's __del__ calls into a half torn-down `ray` module at interpreter exit; the runs
        # were already finished when the experiment ended.
        if not sys.is_finalizing():
            super().__del__()


def tune_callbacks(tracking: TrackingSpec, name: str, experiment_dir: str) -> list:
    """The logger callbacks of a sweep named `name` (see the module docstring). W&B's local
    files go to <experiment_dir>/wandb/ (one run directory per trial, named after its id)."""
    callbacks: list = [CSVLoggerCallback(), JsonLoggerCallback(), NoTuneEvents()]
    if tracking.mlflow is not None:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        m = tracking.mlflow
        callbacks.append(
            MLflowLoggerCallback(
                tracking_uri=m.tracking_uri,
                experiment_name=m.experiment_name or name,
                tags=dict(m.tags) or None,
            )
        )
    if tracking.wandb is not None:
        w = tracking.wandb
        import wandb

        callbacks.append(
            WandbCallback(
                project=w.project,
                group=w.group or name,
                entity=w.entity,
                mode=w.mode,
                tags=list(w.tags) or None,
                dir=str(experiment_dir),
                settings=wandb.Settings(console="off", silent=True),
            )
        )
    return callbacks
