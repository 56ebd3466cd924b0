"""The analysis commands: `python -m dcmtune.analysis PATH` (evaluate one checkpoint) and
`python -m dcmtune.rank EXPERIMENT` (rank a sweep's best checkpoints on held-out data).

Each parses its flags and calls the library (`dcmtune.analysis.evaluate`,
`dcmtune.analysis.rank`); bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dcmtune._yaml import read_yaml_value
from dcmtune.analysis.breakdown import format_breakdown
from dcmtune.analysis.checkpoints import EVAL_SPLITS, AnalysisError
from dcmtune.analysis.evaluate import (
    analysis_breakdown,
    analyze_checkpoint,
    batch_analysis_summary,
    print_analysis_summary,
)
from dcmtune.analysis.rank import rank_experiment
from dcmtune.analysis.ranking import RankError
from dcmtune.analysis.report import format_ranking
from dcmtune.cli import OneLineParser, run_cli
from dcmtune.config import ConfigError
from dcmtune.data.file_format import DataError
from dcmtune.train import checkpoints as ckpt

__all__ = ["main", "rank_main"]


def _parser() -> OneLineParser:
    p = OneLineParser(
        prog="python -m dcmtune.analysis",
        description="Evaluate a DCMNet checkpoint (ESP, monopole and dipole errors; the ESP "
        "error per grid shell, nearest element, molecule size and functional class).",
    )
    p.add_argument("path", help="checkpoint directory, run directory, or a ranking's best_model/")
    p.add_argument(
        "--split",
        choices=EVAL_SPLITS,
        default="test",
        help="split of the run to evaluate on (default test)",
    )
    p.add_argument(
        "--data",
        nargs="+",
        metavar="FILE",
        help="the run's data files, if they moved (checked by checksum)",
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        help="also write best_analysis.json, predictions.csv, training_history.csv, breakdown.csv",
    )
    p.add_argument("--batch-size", type=int, default=16)
    return p


def _main(args) -> int:
    if args.output_dir is not None:
        res = batch_analysis_summary(
            args.path, args.split, args.output_dir, batch_size=args.batch_size, data_files=args.data
        )
        analysis, breakdown = res["analysis"], res["breakdown"]
    else:
        analysis = analyze_checkpoint(
            args.path, args.split, batch_size=args.batch_size, data_files=args.data
        )
        breakdown = analysis_breakdown(analysis, args.data)
    print(print_analysis_summary(analysis))
    print(format_breakdown(breakdown))
    if args.output_dir is not None:
        print(f"wrote {', '.join(str(f) for f in res['files'].values())}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dcmtune.analysis PATH`: evaluate a checkpoint and print the summary and the
    error per grid shell, element, molecule size and functional class.

    Exit 0 on success, 2 on bad input (one line on stderr).
    """
    return run_cli(
        _main,
        _parser(),
        argv,
        bad_input=(AnalysisError, ckpt.CheckpointError, DataError, ConfigError),
    )


# --------------------------------------------------------------------------- rank


def _rank_parser() -> OneLineParser:
    p = OneLineParser(
        prog="python -m dcmtune.rank",
        description="Rank the best checkpoints of a dcmtune sweep on its held-out "
        "test split and write ranking.csv/json, report.md, plots and "
        "best_model/ into the experiment directory.",
    )
    p.add_argument(
        "experiment_dir",
        help="<storage_path>/<name> of a sweep: a directory or a URI such as s3://bucket/path/name",
    )
    p.add_argument(
        "--local-copy",
        type=Path,
        help="where a remote experiment is read into (default ./ray_results/<scheme>-<hash>/...)",
    )
    p.add_argument(
        "--top-k", type=int, help="trials to re-evaluate (default: the spec's rank.top_k, else 5)"
    )
    p.add_argument(
        "--split",
        choices=("test", "valid"),
        help="held-out split to report (default: the spec's rank.split, else test)",
    )
    p.add_argument(
        "--data",
        nargs="+",
        metavar="FILE",
        help="the sweep's .npz files, if they moved (checked by checksum)",
    )
    p.add_argument(
        "--select",
        help="with several objectives, how best_model/ is chosen from the front: "
        "most_accurate, knee or '{max_cost: {charges_per_atom: 2}}' (default: the spec's "
        "rank.select)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="conformers per forward pass")
    return p


def _rank(args) -> int:
    df = rank_experiment(
        args.experiment_dir,
        top_k=args.top_k,
        split=args.split,
        data_files=args.data,
        batch_size=args.batch_size,
        local_copy=args.local_copy,
        select=read_yaml_value(args.select, RankError, "--select") if args.select else None,
    )
    print(format_ranking(df))
    return 0


def rank_main(argv: Sequence[str] | None = None) -> int:
    """`python -m dcmtune.rank EXPERIMENT_DIR`: exit 0 done, 2 bad input (one line)."""
    return run_cli(_rank, _rank_parser(), argv, bad_input=(RankError,))
