"""One TensorBoard event stream per run: a trainer Reporter that writes every epoch's metrics.

`python -m dcmtune.train`, `python -m dcmtune.sweep --debug` and every sweep trial wrap their
reporter in `EventReporter(run_dir)`, so each run directory holds one event stream (Tune's own
TensorBoard logger is switched off for sweeps: `dcmtune.sweep.tune_loggers.tune_callbacks`). Every
numeric metric the trainer reports (`train_*`, `valid_*`, `lr`, `epoch_time`, `batch_time`, `step`,
`best_valid_loss`, ...) is a scalar under its own name (the names of `dcmtune.metrics`), with the
epoch as the step. Watch runs live with `tensorboard --logdir <experiment or output dir>`.

The writer opens at the first report, so a run that fails its checks writes no event file; a
resumed run purges the epochs it repeats (`purge_step`). Files are flushed after every epoch: a
trial that Tune stops between two reports keeps all it reported. Uses `tensorboardX` (a Ray Tune
dependency, declared by dcmtune too); the `viz` extra adds the `tensorboard` viewer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["EventReporter", "Tee"]

log = logging.getLogger(__name__)

# Reported values that are not curves: the step axis itself.
_NOT_SCALARS = ("epoch",)


def _number(v: Any) -> float | None:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, bool):
        return float(v)
    return float(v) if isinstance(v, (int, float)) else None


class EventReporter:
    """A trainer Reporter writing one TensorBoard event stream into `run_dir`.

    Args:
      run_dir: The run's (or trial's) directory; the event file goes directly into it.
      hparams: Optional hyper-parameters (flat name -> number, string or bool) recorded for
        TensorBoard's HParams view, e.g. a trial's searched point.
      hparam_metrics: The scalars the HParams view lists beside them.

    Use as a context manager (closes the file), or call `close()`.
    """

    def __init__(
        self,
        run_dir: str | Path,
        hparams: Mapping[str, Any] | None = None,
        hparam_metrics: Sequence[str] = ("valid_esp_rmse", "valid_loss"),
    ):
        self.run_dir = Path(run_dir)
        self.hparams = {
            k: v for k, v in (hparams or {}).items() if isinstance(v, (str, bool, int, float))
        }
        self.hparam_metrics = tuple(hparam_metrics)
        self._writer: Any = None
        self._status = "completed"

    def _open(self, first_epoch: int):
        from tensorboardX import SummaryWriter

        self.run_dir.mkdir(parents=True, exist_ok=True)
        # A resumed run repeats epochs >= first_epoch that an earlier attempt may have logged.
        self._writer = SummaryWriter(
            logdir=str(self.run_dir),
            flush_secs=30,
            purge_step=first_epoch if first_epoch > 1 else None,
        )
        if self.hparams:
            from tensorboardX.summary import hparams

            exp, start, _ = hparams(self.hparams, {m: None for m in self.hparam_metrics})
            fw = self._writer._get_file_writer()
            fw.add_summary(exp)
            fw.add_summary(start)
        log.debug("TensorBoard events in %s", self.run_dir)

    def __call__(
        self, epoch: int, metrics: Mapping[str, Any], checkpoint_dir: Path | None = None
    ) -> None:
        if self._writer is None:
            self._open(epoch)
        for name, value in metrics.items():
            v = _number(value)
            if v is not None and name not in _NOT_SCALARS:
                self._writer.add_scalar(name, v, global_step=epoch)
        if metrics.get("diverged"):
            self._status = "diverged"
        self._writer.flush()

    def close(self) -> None:
        if self._writer is None:
            return
        if self.hparams:
            from tensorboardX.proto.api_pb2 import Status
            from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionEndInfo
            from tensorboardX.summary import hparams

            _, _, end = hparams(self.hparams, {})
            if self._status != "completed":  # the default end status is success
                content = HParamsPluginData(
                    session_end_info=SessionEndInfo(status=Status.Value("STATUS_FAILURE")),
                    version=0,
                )
                end.value[0].metadata.plugin_data.content = content.SerializeToString()
            self._writer._get_file_writer().add_summary(end)
        self._writer.close()
        self._writer = None

    def __enter__(self) -> EventReporter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not issubclass(exc_type, SystemExit):
            self._status = "failed"  # Tune ends a stopped trial's thread with SystemExit(0)
        self.close()


class Tee:
    """A Reporter that calls several reporters in order (None entries are skipped)."""

    def __init__(self, *reporters):
        self.reporters = [r for r in reporters if r is not None]

    def __call__(
        self, epoch: int, metrics: Mapping[str, Any], checkpoint_dir: Path | None = None
    ) -> None:
        for r in self.reporters:
            r(epoch, metrics, checkpoint_dir)
