"""Command-line front ends: parse, validate, call the library, print tables.

`python -m dcmtune.train` has one flag per config field (generated from the dataclasses, so the
two cannot drift apart), plus `--config FILE.json` and `--restart-checkpoint DIR`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import subprocess
import sys
import typing
from pathlib import Path
from typing import Optional, Sequence

from dcmtune.xla_env import use_compilation_cache
from dcmtune.config import (ConfigError, DataConfig, ExperimentConfig, ModelConfig,
                            TrainingConfig)

__all__ = ["train_main", "format_epoch_table", "TableReporter", "build_train_parser",
           "OneLineParser"]

TABLE_ROWS = ("loss", "mono_mae", "mono_rmse", "mono_mean", "mono_std", "esp_rmse", "esp_mae",
              "dipole_mae")
UNITS = {"esp_rmse": "kcal/mol/e", "esp_mae": "kcal/mol/e", "mono_mae": "e", "mono_rmse": "e",
         "mono_mean": "e", "mono_std": "e", "dipole_mae": "D"}


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr, exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def format_epoch_table(epoch: int, num_epochs: int, metrics: dict) -> str:
    """The per-epoch summary: Metric | Train | Valid | Diff | % Diff, and timings."""
    best = " *best*" if metrics.get("best_epoch") == epoch else ""
    lines = [f"Epoch {epoch}/{num_epochs}  step {metrics.get('step', '?')}  "
             f"lr {metrics.get('lr', float('nan')):.3e}{best}",
             f"{'Metric':<22}{'Train':>12}{'Valid':>12}{'Diff':>12}{'% Diff':>9}"]
    for name in TABLE_ROWS:
        tr, va = metrics.get(f"train_{name}"), metrics.get(f"valid_{name}")
        if tr is None or va is None or (math.isnan(tr) and math.isnan(va)):
            continue
        diff = va - tr
        pct = 100.0 * diff / abs(tr) if tr not in (0.0,) and math.isfinite(tr) else float("nan")
        label = f"{name} [{UNITS[name]}]" if name in UNITS else name
        lines.append(f"{label:<22}{tr:>12.5g}{va:>12.5g}{diff:>12.4g}{pct:>8.1f}%")
    lines.append(f"avg batch time {metrics.get('batch_time', float('nan')) * 1e3:.1f} ms, "
                 f"epoch {metrics.get('epoch_time', float('nan')):.2f} s")
    return "\n".join(lines)


class TableReporter:
    """A trainer Reporter that prints the epoch table to a stream."""

    def __init__(self, num_epochs: int, stream=None):
        self.num_epochs = num_epochs
        self.stream = stream

    def __call__(self, epoch, metrics, checkpoint_dir) -> None:
        print(format_epoch_table(epoch, self.num_epochs, metrics) + "\n",
              file=self.stream or sys.stdout, flush=True)


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
        description="Train a DCMNet on ESP data (the bundled demo set when no data is given).")
    p.add_argument("--config", type=Path, help="experiment config JSON; flags override it")
    p.add_argument("--restart-checkpoint", type=Path,
                   help="checkpoint dir (or run dir) to resume exactly from")
    p.add_argument("--quiet", action="store_true", help="no per-epoch table")
    for section, cls in (("", ExperimentConfig), ("model", ModelConfig), ("data", DataConfig),
                         ("training", TrainingConfig)):
        group = p.add_argument_group(section or "experiment")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in ("model", "data", "training"):
                continue
            flag = "--" + f.name.replace("_", "-")
            kind, nargs = _flag_type(hints[f.name])
            dest = f"{section}.{f.name}" if section else f.name
            if kind is bool:
                group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                                   default=None)
            else:
                group.add_argument(flag, dest=dest, type=kind, nargs=nargs, default=None,
                                   metavar=f.name.upper())
    return p


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    base = ExperimentConfig.load(args.config) if args.config else ExperimentConfig()
    overrides = {k: v for k, v in vars(args).items()
                 if v is not None and k not in ("config", "restart_checkpoint", "quiet")}
    config = base.replace(**overrides)
    if not config.git_commit:
        config = config.replace(git_commit=_git_commit())
    return config


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m dcmtune.train`: exit 0 on success, 2 on bad input, 3 if training diverged."""
    args = build_train_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = _config_from_args(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    use_compilation_cache(Path(config.output_dir).resolve() / ".jax_cache")
    from dcmtune.checkpoint import CheckpointError, find_checkpoint
    from dcmtune.data import DataError
    from dcmtune.train import fit

    try:
        resume = None
        if args.restart_checkpoint is not None:
            resume = find_checkpoint(args.restart_checkpoint)
            if resume is None:
                raise CheckpointError(f"{args.restart_checkpoint}: no checkpoint there (expected "
                                      "a checkpoint dir with meta.json or a run dir)")
        reporter = None if args.quiet else TableReporter(config.training.num_epochs)
        print(f"run directory: {config.run_dir}", flush=True)
        result = fit(config, reporter=reporter, resume_from=resume)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{result.status}: best valid_loss {result.best_valid_loss:.6g} at epoch "
          f"{result.best_epoch}; checkpoints in {result.run_dir / 'checkpoints'}")
    return 0 if result.status == "completed" else 3
