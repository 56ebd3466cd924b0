"""The kit every `python -m dcmtune.*` command is built from. Imports no other dcmtune module.

* `OneLineParser`: argparse whose usage errors are one line and exit code 2.
* `run_cli(main, parser, argv, bad_input=...)`: parse, set up logging, call `main(args)`; a bad
  input error becomes one line on stderr and exit 2, a failed computation or disk exit 1, an
  interrupt exit 130.
* `format_epoch_table` / `TableReporter`: the per-epoch Train/Valid table (rows are passed in;
  the commands take them from `dcmtune.metrics`).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Sequence

__all__ = [
    "OneLineParser",
    "run_cli",
    "one_line",
    "format_epoch_table",
    "TableReporter",
    "LOG_FORMAT",
]

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr, exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def one_line(e: BaseException) -> str:
    """An exception's message folded onto one line (its type name if it has none)."""
    return " ".join(str(e).split()) or type(e).__name__


def run_cli(
    main: Callable[[argparse.Namespace], int],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    *,
    bad_input: tuple[type[BaseException], ...] = (ValueError,),
    failures: tuple[type[BaseException], ...] = (),
    verbose: Callable[[argparse.Namespace], bool] = lambda args: False,
) -> int:
    """Runs one command: the one place that maps errors to exit codes.

    Args:
      main: Does the work with the parsed arguments; returns the exit code.
      parser: The command's parser (usage errors exit 2 with one line).
      argv: Arguments (default sys.argv[1:]).
      bad_input: Exceptions that mean the user's input is wrong: one line, exit 2.
      failures: Exceptions that mean the computation or the disk failed: one line, exit 1.
      verbose: Whether the parsed arguments ask for INFO logging.

    Returns:
      The exit code.
    """
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if verbose(args) else logging.WARNING, format=LOG_FORMAT)
    try:
        return main(args)
    except bad_input as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except failures as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _default_rows(metrics: dict) -> list[tuple[str, str]]:
    """(name, label) of every metric reported for both train and valid, in report order."""
    return [
        (k[6:], k[6:]) for k in metrics if k.startswith("train_") and f"valid_{k[6:]}" in metrics
    ]


def format_epoch_table(
    epoch: int, num_epochs: int, metrics: dict, rows: Sequence[tuple[str, str]] | None = None
) -> str:
    """The per-epoch summary: Metric | Train | Valid | Diff | % Diff, and timings.

    Args:
      metrics: One epoch's flat metrics (`train_<name>`, `valid_<name>`, lr, step, timings).
      rows: (name, label) per row; default every name with a train and a valid value.
    """
    best = " *best*" if metrics.get("best_epoch") == epoch else ""
    lines = [
        f"Epoch {epoch}/{num_epochs}  step {metrics.get('step', '?')}  "
        f"lr {metrics.get('lr', float('nan')):.3e}{best}",
        f"{'Metric':<22}{'Train':>12}{'Valid':>12}{'Diff':>12}{'% Diff':>9}",
    ]
    for name, label in rows if rows is not None else _default_rows(metrics):
        tr, va = metrics.get(f"train_{name}"), metrics.get(f"valid_{name}")
        if tr is None or va is None or (math.isnan(tr) and math.isnan(va)):
            continue
        diff = va - tr
        pct = 100.0 * diff / abs(tr) if tr != 0.0 and math.isfinite(tr) else float("nan")
        lines.append(f"{label:<22}{tr:>12.5g}{va:>12.5g}{diff:>12.4g}{pct:>8.1f}%")
    lines.append(
        f"avg batch time {metrics.get('batch_time', float('nan')) * 1e3:.1f} ms, "
        f"epoch {metrics.get('epoch_time', float('nan')):.2f} s"
    )
    return "\n".join(lines)


class TableReporter:
    """A trainer Reporter that prints the epoch table to a stream (stdout by default)."""

    def __init__(self, num_epochs: int, rows: Sequence[tuple[str, str]] | None = None, stream=None):
        self.num_epochs = num_epochs
        self.rows = rows
        self.stream = stream

    def __call__(self, epoch, metrics, checkpoint_dir) -> None:
        print(
            format_epoch_table(epoch, self.num_epochs, metrics, self.rows) + "\n",
            file=self.stream or sys.stdout,
            flush=True,
        )
