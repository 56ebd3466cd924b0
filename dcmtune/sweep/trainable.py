"""The Ray Tune trainable around `dcmtune.train.fit`.

A trial maps its sampled point to an `ExperimentConfig` (the spec's fixed values plus the point),
runs the trainer with the trial's directory in the experiment (<storage>/<name>/trial_<id>) as its
output directory (with object storage: a node-local directory, whose run files and checkpoints
reach the bucket through Tune, see `_trial_dirs`), and reports every epoch to Tune. A Tune
checkpoint is attached whenever the sweep metric improves, every `checkpoint_every` epochs and at
the last epoch, so every trial's best epoch has one. A retried trial resumes from the newest
checkpoint that passes its checksums, `tune.get_checkpoint()` or the trainer's own `latest`. A
non-finite loss ends the trial cleanly with `fit_status = "diverged"`. The cost metrics among a
multi-objective sweep's objectives (`dcmtune.model.cost`: charges per atom, parameters, FLOPs)
are computed once from the trial's config and reported with every epoch.

JAX/XLA settings for trial processes are computed once
(`dcmtune.sweep.resources.trial_env_vars`) and applied in one place: through Ray's runtime
environment when dcmtune starts or connects to Ray, and again by the trial itself before it
imports JAX (so a Ray session started by someone else, e.g. a notebook or the tests, gets them
too). The driver never imports the trainer: data reaches trials
as plain numpy arrays through the object store (`tune.with_parameters`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ray import tune

from dcmtune import _io
from dcmtune._io import plain
from dcmtune.config import ExperimentConfig
from dcmtune.sweep.resources import TrialResources, check_trial_backend
from dcmtune.train.tensorboard import EventReporter

__all__ = [
    "TrialSettings",
    "make_trainable",
    "train_trial",
    "trial_dirname",
    "trial_dirname_creator",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrialSettings:
    """What every trial of a sweep shares (passed through the object store).

    Attributes:
      base: ExperimentConfig.to_dict() of the spec's fixed values.
      metric, mode: The sweep metric.
      checkpoint_every: Periodic Tune checkpoints (0 = only at improvements and at the end).
      env: Environment of trial processes (`trial_env_vars`).
      experiment_dir: <storage_path>/<name>; trials write to experiment_dir/trial_<id>.
        Empty: Tune's node-local trial directory, synced to storage by Tune.
      gpu: The GPU share each trial asked for (0: CPU trials); set by `make_trainable`.
      costs: Cost metrics reported with every epoch (the costs among the objectives).
    """

    base: dict
    metric: str = "valid_esp_rmse"
    mode: str = "min"
    checkpoint_every: int = 0
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    experiment_dir: str = ""
    gpu: float = 0.0
    costs: tuple[str, ...] = ()


def trial_dirname(trial_id: str) -> str:
    """The directory name of a trial in its experiment."""
    return f"trial_{trial_id}"


def trial_dirname_creator(trial) -> str:
    """Tune's `trial_dirname_creator`: trial_<id>."""
    return trial_dirname(trial.trial_id)


def _trial_dirs(settings: TrialSettings) -> tuple[Path, Path]:
    """(where the trainer writes, the trial directory that reaches storage).

    POSIX storage (every node mounts it): both are the trial's directory in the experiment.
    Object storage, or an experiment not reachable from this node: the trial directory is
    Tune's node-local one, which Tune uploads to storage with every checkpoint and when the
    trial ends; the trainer writes into a node-local scratch directory beside it, so its own
    checkpoints (`latest`, `best`) are not uploaded a second time (Tune's checkpoints are),
    and the small run files are copied into the trial directory before each report
    (`_publish`).
    """
    if settings.experiment_dir:
        experiment = Path(settings.experiment_dir)
        if experiment.is_dir():  # Tune creates the trial's own directory lazily
            path = experiment / trial_dirname(tune.get_context().get_trial_id())
            path.mkdir(exist_ok=True)
            return path, path
        log.warning(
            "%s is not reachable from this node; writing to Tune's trial directory "
            "(synced to storage)",
            experiment,
        )
    synced = _synced_trial_dir()
    scratch = synced.parent.parent / "dcmtune_scratch" / synced.name
    scratch.mkdir(parents=True, exist_ok=True)
    return scratch, synced


def _synced_trial_dir() -> Path:
    """The node-local trial directory Tune uploads (StorageContext.trial_working_directory).

    `tune.get_context().get_trial_dir()` names it for a reused actor, but for the first trial
    of an actor Ray 2.60 returns the driver's staging directory of the trial, which is not
    uploaded from a worker node: its sibling under working_dirs/ is the one.
    """
    d = Path(tune.get_context().get_trial_dir())
    if d.parent.name == "driver_artifacts":
        d = d.parent.parent / "working_dirs" / d.name
    d.mkdir(parents=True, exist_ok=True)
    return d


_RUN_FILES = ("config.json", "split.json", "history.csv", "restarts.json")
# The last epoch whose `tune.report` returned (Tune's driver had taken it), in the run directory.
ACK_FILE = "tune_reported.json"


def _publish(run_dir: Path, trial_dir: Path) -> None:
    """Copies the trainer's small run files into the trial directory that reaches storage."""
    if run_dir == trial_dir:
        return
    for name in _RUN_FILES:
        if (run_dir / name).is_file():
            _io.write_bytes(trial_dir / name, (run_dir / name).read_bytes())


class _TuneReporter:
    """The trainer's Reporter inside a trial: `tune.report` every epoch, with a checkpoint when
    the metric improves, every `checkpoint_every` epochs and at the last epoch; before that,
    the epoch goes to the trial's TensorBoard stream (`events`), closed when the trial ends."""

    def __init__(
        self,
        settings: TrialSettings,
        num_epochs: int,
        best: float | None = None,
        events: EventReporter | None = None,
        publish: Callable[[], None] = lambda: None,
        acknowledge: Callable[[int], None] = lambda epoch: None,
        costs: Mapping[str, float] | None = None,
    ):
        self.publish, self.acknowledge = publish, acknowledge
        self.costs = dict(costs or {})
        self.metric = settings.metric
        self.every, self.num_epochs = settings.checkpoint_every, num_epochs
        self.best = best
        self.calls = 0
        self.events = events

    def wants_checkpoint(self, epoch: int, value: float | None) -> bool:
        improved = (
            value is not None and math.isfinite(value) and (self.best is None or value < self.best)
        )
        if improved:
            self.best = value
        periodic = self.every > 0 and epoch % self.every == 0
        return improved or periodic or epoch == self.num_epochs

    def __call__(
        self, epoch: int, metrics: dict, checkpoint_dir: Path | None, force: bool = False
    ) -> None:
        self.calls += 1
        out = {k: plain(v) for k, v in metrics.items()} | self.costs
        diverged = bool(out.get("diverged"))
        out["fit_status"] = (
            "diverged" if diverged else "completed" if epoch == self.num_epochs else "running"
        )
        value = out.get(self.metric)
        checkpoint = None
        if (
            checkpoint_dir is not None
            and not diverged
            and (self.wants_checkpoint(epoch, value) or force)
        ):
            checkpoint = tune.Checkpoint.from_directory(checkpoint_dir)
        if self.events is not None:
            self.events(epoch, metrics, checkpoint_dir)
        self.publish()
        try:
            tune.report(out, checkpoint=checkpoint)  # a stopped trial's thread exits here
        except BaseException:
            self.close()
            raise
        self.acknowledge(epoch)
        if out["fit_status"] != "running":
            self.close()

    def close(self) -> None:
        if self.events is not None:
            self.events.close()


def _apply_env(env: Mapping[str, str]) -> None:
    """Sets the trial environment in this process (before JAX is imported here)."""
    os.environ.update(env)
    if "JAX_PLATFORMS" not in env and os.environ.get("JAX_PLATFORMS") == "cpu":
        log.warning("JAX_PLATFORMS=cpu is set for a GPU trial; the trial will run on the CPU")


def train_trial(config: dict, *, data: Mapping[str, Any], settings: TrialSettings) -> None:
    """The function trainable: one trial = one `train.fit`.

    Args:
      config: The sampled point (dotted config keys, as in the spec's `search:`).
      data: ESPData fields as numpy arrays (the driver's dataset).
      settings: Shared settings of the sweep.
    """
    _apply_env(settings.env)
    import jax  # after the environment is set

    from dcmtune.data.dataset import ESPData
    from dcmtune.train.loop import fit

    check_trial_backend(settings.gpu, jax.default_backend())
    trial_dir, synced = _trial_dirs(settings)
    experiment = ExperimentConfig.from_dict(settings.base)
    point = {k: plain(v) for k, v in config.items()}
    cfg = experiment.replace(**point, name=trial_dir.name, output_dir=str(trial_dir.parent))
    dataset = ESPData(**data)

    def reporter_for(best: float | None) -> _TuneReporter:
        return _TuneReporter(
            settings,
            cfg.training.num_epochs,
            best=best,
            events=EventReporter(synced, hparams=point),
            publish=lambda: _publish(trial_dir, synced),
            acknowledge=lambda epoch: _io.write_json(
                trial_dir / ACK_FILE, {"epoch": epoch}, durable=False
            ),
            costs=_costs(cfg, dataset, settings.costs),
        )

    with contextlib.ExitStack() as stack:
        # A retried trial continues from the newest checkpoint that passes its checksums: Tune's
        # (the last one attached to a report) or the trainer's own `latest` (every epoch).
        candidates = [trial_dir / "checkpoints" / "latest"]
        tune_ckpt = tune.get_checkpoint()
        if tune_ckpt is not None:
            candidates.insert(0, Path(stack.enter_context(tune_ckpt.as_directory())))
        valid = _verified(candidates)
        resume, meta = _newest(valid)
        if resume is None:
            if tune_ckpt is not None:
                log.warning(
                    "trial %s: no readable checkpoint to resume from; starting over", trial_dir.name
                )
            _set_aside_stale_checkpoints(trial_dir)
            (trial_dir / ACK_FILE).unlink(missing_ok=True)
            reporter = reporter_for(None)
            result = fit(cfg, dataset, reporter=reporter, run_dir=trial_dir)
        else:
            tune_meta = valid.get(candidates[0], {}) if tune_ckpt is not None else {}
            result = _resume(
                cfg, dataset, trial_dir, resume, meta, tune_meta, reporter_for, settings
            )
    if result.status != "completed":
        best = f"best valid_loss {result.best_valid_loss:.6g} at epoch {result.best_epoch}"
        log.warning("trial %s ended: %s (%s)", trial_dir.name, result.status, best)


def _costs(cfg: ExperimentConfig, dataset, names: tuple[str, ...]) -> dict[str, float]:
    """The trial's cost metrics `names` (none: nothing is computed)."""
    if not names:
        return {}
    from dcmtune.model.cost import model_costs, reference_num_atoms

    return model_costs(cfg.model, reference_num_atoms(dataset.N), names)


def _resume(
    cfg,
    dataset,
    trial_dir: Path,
    resume: Path,
    meta: dict,
    tune_meta: dict,
    reporter_for: Callable[[float | None], _TuneReporter],
    settings: TrialSettings,
):
    """Continues a retried trial from checkpoint `resume`: first reports again the epochs Tune
    may not have taken (after both Tune's checkpoint and the acknowledged epoch), then trains
    the rest. Returns the trainer's FitResult."""
    from dcmtune.train import checkpoints as ckpt
    from dcmtune.train.loop import fit

    history = meta.get("history", [])
    known = max(int(tune_meta.get("epoch", 0)), _acknowledged_epoch(trial_dir))
    reporter = reporter_for(
        _best_so_far([r for r in history if int(r["epoch"]) <= known], settings)
    )
    log.info(
        "trial %s resumes from %s (epoch %s; Tune has epochs up to %d)",
        trial_dir.name,
        resume,
        meta.get("epoch"),
        known,
    )
    _replay(reporter, history, known, int(meta["epoch"]), resume)
    result = fit(cfg, dataset, reporter=reporter, run_dir=trial_dir, resume_from=resume)
    if not reporter.calls and result.history:
        # Nothing left to train (the trial had finished after the last experiment snapshot):
        # report its last epoch again, so Tune records the final result.
        last = trial_dir / "checkpoints" / "latest"
        reporter(
            int(result.history[-1]["epoch"]),
            result.history[-1],
            last if (last / ckpt.META_FILE).is_file() else None,
            force=True,
        )
    return result


def _verified(candidates: list[Path]) -> dict[Path, dict]:
    """The candidate checkpoints that pass their checksums, with their metas, in order."""
    from dcmtune.train import checkpoints as ckpt

    valid: dict[Path, dict] = {}
    for c in candidates:
        if not (c / ckpt.META_FILE).is_file() and not c.name.startswith("checkpoint_"):
            _io.recover_directory(c)
        if not c.is_dir():
            continue
        try:
            valid[c] = ckpt.verify_checkpoint(c)
        except ckpt.CheckpointError as e:
            log.warning("not resuming from a damaged checkpoint: %s", e)
    return valid


def _newest(valid: dict[Path, dict]) -> tuple[Path | None, dict | None]:
    """The checkpoint with the highest epoch (ties: the earlier one), with its meta; (None,
    None) if there is none."""
    if not valid:
        return None, None
    newest = max(valid, key=lambda c: int(valid[c].get("epoch", 0)))  # max keeps the first
    return newest, valid[newest]


def _acknowledged_epoch(run_dir: Path) -> int:
    """The last epoch whose report Tune took, as recorded in the run directory (0 if none)."""
    try:
        return int(json.loads((run_dir / ACK_FILE).read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _replay(
    reporter: _TuneReporter, history: list, known: int, resumed: int, checkpoint_dir: Path
) -> None:
    """Reports the epochs in (known, resumed] again from the checkpoint's history: Tune may
    never have received them (the trial died between writing `latest` and Tune taking the
    report). The resumed epoch carries its checkpoint, when the reporter's rules want one."""
    for row in history:
        epoch = int(row["epoch"])
        if known < epoch <= resumed:
            reporter(epoch, row, checkpoint_dir if epoch == resumed else None)


def _best_so_far(history: list, settings: TrialSettings) -> float | None:
    values = [r.get(settings.metric) for r in history]
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return None
    return min(values)


def _set_aside_stale_checkpoints(trial_dir: Path) -> None:
    """A retried trial without a Tune checkpoint starts over: its earlier attempt's trainer
    checkpoints are kept, renamed, instead of blocking the new run."""
    stale = trial_dir / "checkpoints"
    if stale.is_dir() and any(stale.iterdir()):
        target = _io.move_aside(stale, f"checkpoints.attempt-{time.strftime('%Y%m%d-%H%M%S')}")
        log.warning("%s: earlier attempt's checkpoints moved to %s", trial_dir, target.name)


def make_trainable(data, settings: TrialSettings, resources: TrialResources):
    """The trainable for a Tuner: `train_trial` with the data in the object store and the
    trial's resources attached."""
    arrays = {f.name: getattr(data, f.name) for f in dataclasses.fields(data)}
    settings = dataclasses.replace(settings, gpu=resources.gpu)
    with_data = tune.with_parameters(train_trial, data=arrays, settings=settings)
    return tune.with_resources(with_data, resources.as_tune())
