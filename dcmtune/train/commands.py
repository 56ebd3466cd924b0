"""`python -m dcmtune.train`: one flag per config field, the per-epoch table, exact restarts.

The flags are generated from the config dataclasses, so the two cannot drift apart; plus
`--config FILE.json` (flags override it), `--restart-checkpoint DIR`, `--quiet` and
`--tracking FILE.yaml` (MLflow / W&B, `dcmtune.train.tracking`). Every run writes its TensorBoard
event stream into its run directory.

A restart takes its config from the checkpoint: flags may change only where the run writes,
the checkpoint cadence, and num_epochs under a constant learning rate. Any other difference
(data, split, batch size, schedule, optimizer, learning rate, model...) is refused with one
line naming the field, unless `--allow-config-change`, which records it in the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence
from pathlib import Path

from dcmtune import metrics
from dcmtune.cli import OneLineParser, TableReporter, run_cli
from dcmtune.config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    TrainingConfig,
    flat_dict,
)
from dcmtune.data.file_format import DataError
from dcmtune.provenance import git_commit
from dcmtune.train.checkpoints import CheckpointError, find_checkpoint
from dcmtune.train.environment import use_compilation_cache
from dcmtune.train.restart import checkpoint_config
from dcmtune.train.tracking import TrackingError, TrackingSpec, load_tracking, run_reporters

__all__ = ["main", "build_train_parser"]

_SECTIONS = (
    ("", ExperimentConfig),
    ("model", ModelConfig),
    ("data", DataConfig),
    ("training", TrainingConfig),
)


def _flag_type(annotation):
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is list:
        return typing.get_args(annotation)[0], "+"
    if origin is typing.Union or (origin is not None and args):
        return args[0], None
    return annotation, None


def build_train_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m dcmtune.train",
        description="Train a DCMNet on ESP data (the bundled demo set when no data is given).",
    )
    p.add_argument("--config", type=Path, help="experiment config JSON; flags override it")
    p.add_argument(
        "--restart-checkpoint", type=Path, help="checkpoint dir (or run dir) to resume exactly from"
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --restart-checkpoint: accept flags that change the checkpoint's "
        "config (recorded in the run's restarts.json and checkpoints)",
    )
    p.add_argument("--quiet", action="store_true", help="no per-epoch table")
    p.add_argument(
        "--tracking",
        type=Path,
        metavar="FILE.yaml",
        help="log to MLflow / W&B as the file's tracking: section says (a sweep spec works)",
    )
    for section, cls in _SECTIONS:
        group = p.add_argument_group(section or "experiment")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in ("model", "data", "training"):
                continue
            flag = "--" + f.name.replace("_", "-")
            kind, nargs = _flag_type(hints[f.name])
            dest = f"{section}.{f.name}" if section else f.name
            if kind is bool:
                group.add_argument(
                    flag, dest=dest, action=argparse.BooleanOptionalAction, default=None
                )
            else:
                group.add_argument(
                    flag, dest=dest, type=kind, nargs=nargs, default=None, metavar=f.name.upper()
                )
    return p


_NOT_CONFIG = ("config", "restart_checkpoint", "quiet", "allow_config_change", "tracking")


def _config_from_args(
    args: argparse.Namespace, base: ExperimentConfig | None = None
) -> ExperimentConfig:
    """The config file (else `base`, else the defaults) with the given flags applied."""
    if args.config:
        base = ExperimentConfig.load(args.config)
    base = base if base is not None else ExperimentConfig()
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in _NOT_CONFIG}
    config = base.replace(**overrides)
    if not config.git_commit:
        config = config.replace(git_commit=git_commit())
    return config


def _train(args: argparse.Namespace) -> int:
    tracking = load_tracking(args.tracking) if args.tracking else TrackingSpec()
    resume = None
    if args.allow_config_change and args.restart_checkpoint is None:
        raise ConfigError("--allow-config-change: only used with --restart-checkpoint")
    if args.restart_checkpoint is not None:
        resume = find_checkpoint(args.restart_checkpoint)
        if resume is None:
            raise CheckpointError(
                f"{args.restart_checkpoint}: no checkpoint there (expected "
                "a checkpoint dir with meta.json or a run dir)"
            )
        config = _config_from_args(args, base=checkpoint_config(resume))
    else:
        config = _config_from_args(args)
    use_compilation_cache(Path(config.output_dir).resolve() / ".jax_cache")
    from dcmtune.train.loop import fit  # JAX loads here, after the compile cache is set

    reporter = (
        None if args.quiet else TableReporter(config.training.num_epochs, metrics.table_rows())
    )
    print(f"run directory: {config.run_dir}", flush=True)
    with run_reporters(
        config.run_dir,
        reporter,
        tracking=tracking,
        name=config.name,
        params=flat_dict(config.to_dict()),
    ) as each_epoch:
        result = fit(
            config,
            reporter=each_epoch,
            resume_from=resume,
            allow_config_change=args.allow_config_change,
        )
    print(
        f"{result.status}: best valid_loss {result.best_valid_loss:.6g} at epoch "
        f"{result.best_epoch}; checkpoints in {result.run_dir / 'checkpoints'}"
    )
    return 0 if result.status == "completed" else 3


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dcmtune.train`: exit 0 on success, 2 on bad input, 3 if training diverged."""
    return run_cli(
        _train,
        build_train_parser(),
        argv,
        bad_input=(ConfigError, DataError, CheckpointError, TrackingError),
    )
