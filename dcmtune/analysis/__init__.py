"""Analysis of trained checkpoints and sweeps: re-evaluation, training histories, the ranking
of a sweep's best checkpoints on held-out data, and its report.

The face hands on the wing's public names; the commands are `python -m dcmtune.analysis` and
`python -m dcmtune.rank` (`dcmtune.analysis.commands`)."""

from dcmtune.analysis.breakdown import Breakdown, esp_breakdown, format_breakdown
from dcmtune.analysis.checkpoints import (
    EVAL_SPLITS,
    AnalysisError,
    DataCache,
    LoadedCheckpoint,
    checkpoint_data,
    open_checkpoint,
    resolve_checkpoint,
    split_summary,
)
from dcmtune.analysis.evaluate import (
    METRIC_UNITS,
    PERCENTILES,
    CheckpointAnalysis,
    analysis_breakdown,
    analyze_checkpoint,
    batch_analysis_summary,
    compare_checkpoints,
    metric_unit,
    print_analysis_summary,
)
from dcmtune.analysis.history import TrainingHistory, analyze_training_history
from dcmtune.analysis.importances import distributions, param_importances
from dcmtune.analysis.plots import PLOT_FILES, write_plots
from dcmtune.analysis.rank import OUTPUT_FILES, rank_experiment, top_checkpoints
from dcmtune.analysis.ranking import (
    BEST_MODEL,
    EVAL_COLUMNS,
    SPEC_RECORD,
    VALID_COLUMNS,
    Evaluated,
    RankError,
    Ranking,
    RankSettings,
    TrialRecord,
    discover_trials,
)
from dcmtune.analysis.report import format_ranking, markdown

__all__ = [
    "AnalysisError",
    "BEST_MODEL",
    "Breakdown",
    "CheckpointAnalysis",
    "DataCache",
    "EVAL_COLUMNS",
    "EVAL_SPLITS",
    "Evaluated",
    "LoadedCheckpoint",
    "METRIC_UNITS",
    "OUTPUT_FILES",
    "PERCENTILES",
    "PLOT_FILES",
    "RankError",
    "RankSettings",
    "Ranking",
    "SPEC_RECORD",
    "TrainingHistory",
    "TrialRecord",
    "VALID_COLUMNS",
    "analysis_breakdown",
    "analyze_checkpoint",
    "analyze_training_history",
    "batch_analysis_summary",
    "checkpoint_data",
    "compare_checkpoints",
    "discover_trials",
    "distributions",
    "esp_breakdown",
    "format_breakdown",
    "format_ranking",
    "markdown",
    "metric_unit",
    "open_checkpoint",
    "param_importances",
    "print_analysis_summary",
    "rank_experiment",
    "resolve_checkpoint",
    "split_summary",
    "top_checkpoints",
    "write_plots",
]
