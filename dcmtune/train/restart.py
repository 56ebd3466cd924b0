"""Exact restarts: what a run resumed from a checkpoint may change, and what it must not.

A restart continues the checkpoint's run: its config, data checksum and split must be this
run's (`check_resume_config`), except for bookkeeping (where the run writes, its notes), the
checkpoint cadence, the data file paths (the data itself is checked by checksum), and
num_epochs under a constant learning rate. Anything else needs `allow_config_change`, which is
recorded. Checkpoints written after the restart point by an abandoned attempt are moved aside
(`set_aside_stale`), so they can never be reported for this run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dcmtune import _io
from dcmtune.config import ConfigError, DataConfig, ExperimentConfig, flat_dict
from dcmtune.train import checkpoints as ckpt

__all__ = ["check_resume_config", "set_aside_stale", "check_writable", "checkpoint_config"]

log = logging.getLogger(__name__)

# What a restart may change without --allow-config-change: bookkeeping (where the run writes,
# its notes), the checkpoint cadence, and the data file paths (the data itself is checked by
# checksum). num_epochs may change only under a constant learning rate, where it shapes nothing.
# Where the data lives (device or streamed) gives the same results, so its budget is free too.
_RESTART_FREE = frozenset(
    {
        "name",
        "output_dir",
        "description",
        "notes",
        "created_at",
        "git_commit",
        "data.data_files",
        "data.device_data_budget_mb",
        "training.save_every_n_epochs",
        "training.keep_top_k_checkpoints",
        "training.report_test_metrics",
    }
)
# Keys added after checkpoints were written, with the value that applied before them: a
# checkpoint without data.batching was trained on padded batches.
_LEGACY_VALUES = {
    "data.batching": "padded",
    "data.max_buckets": DataConfig.max_buckets,
    "data.device_data_budget_mb": 1024.0,  # the fixed budget before it followed the device
    "training.report_test_metrics": False,
    "training.init_from": None,
    "training.freeze": [],
}


def check_resume_config(
    meta: dict,
    config: ExperimentConfig,
    where: Path,
    *,
    data_checksum: str | None = None,
    splits: dict | None = None,
    allow_change: bool = False,
) -> dict:
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
    changes = {
        k: [saved.get(k), now.get(k)]
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    }
    if data_checksum is not None and meta.get("data_checksum") not in (None, data_checksum):
        changes["data.checksum"] = [meta.get("data_checksum"), data_checksum]
    saved_split = (meta.get("split") or {}).get("indices")
    if splits is not None and saved_split is not None:
        now_split = {k: [int(i) for i in v] for k, v in splits.items()}
        if saved_split != now_split:
            changes["data.split"] = ["as recorded in the checkpoint", "another assignment"]
    constant_lr = not config.training.use_lr_schedule and not saved_raw.get("training", {}).get(
        "use_lr_schedule", True
    )
    refused = [
        k
        for k in changes
        if k not in _RESTART_FREE and not (k == "training.num_epochs" and constant_lr)
    ]
    if refused and not allow_change:
        key = refused[0]
        was, is_ = changes[key]
        what = "checkpoint is of another architecture: " if key.startswith("model.") else ""
        raise ckpt.CheckpointError(
            f"{where}: {what}{key} = {is_!r} differs from the checkpoint's {was!r}; a restart "
            "continues the checkpoint's run (pass --allow-config-change to accept and record "
            "the change)"
        )
    return {
        k: v
        for k, v in changes.items()
        if k not in ("name", "output_dir", "created_at", "git_commit")
    }


def set_aside_stale(ckpt_root: Path, meta: dict) -> None:
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
        log.warning(
            "%s: written after the restart point (epoch %d) by an abandoned attempt; moved to %s",
            d,
            start,
            moved.name,
        )


def check_writable(run_dir: Path) -> None:
    """Refuses a run directory that cannot be created or written, before any compute."""
    problem = _io.writable_problem(run_dir)
    if problem:
        raise ConfigError(f"output_dir: {problem} (run directory {run_dir})")


def checkpoint_config(resume: Path) -> ExperimentConfig:
    """The checkpoint's config; the run continues in the run directory holding the checkpoint
    (`<run>/checkpoints/<name>`), even if that directory was moved or copied."""
    saved = ckpt.read_meta(resume).get("config")
    if not isinstance(saved, dict):
        raise ckpt.CheckpointError(f"{resume}: meta.json holds no run config; cannot restart")
    try:
        config = ExperimentConfig.from_dict(saved)
    except ConfigError as e:
        raise ckpt.CheckpointError(f"{resume}: meta.json holds an invalid config ({e})") from None
    resume = resume.resolve()
    if resume.parent.name == "checkpoints":
        run = resume.parent.parent
        config = config.replace(output_dir=str(run.parent), name=run.name)
    return config
