"""The report of a ranking: report.md and the console table.

`dcmtune.analysis.rank` decides which trials compete and who wins; this module only presents a
`Ranking` (its plots: `dcmtune.analysis.plots`). Metric names, units and labels come from
`dcmtune.metrics`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dcmtune import metrics

if TYPE_CHECKING:  # only for annotations
    from dcmtune.analysis.ranking import Ranking

__all__ = ["markdown", "format_ranking"]

_ESP_UNIT = metrics.unit("esp_rmse")
# Columns of the top-trials table beside the selection metric (`{split}_` + name).
_TOP_TABLE = ("esp_rmse", "esp_mae", "mono_mae", "dipole_mae")
# Metrics of the winner's table: recorded on valid at the chosen epoch, re-evaluated on split.
_WINNER_TABLE = (
    "esp_rmse",
    "esp_mae",
    "esp_max_abs_error",
    "esp_abs_error_p95",
    "esp_r2",
    "esp_pearson_r",
    "mono_mae",
    "mono_rmse",
    "dipole_mae",
    "dipole_magnitude_mae",
)


# --------------------------------------------------------------------------- report.md


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "–"
        return f"{v:.{digits}g}"
    return str(v)


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _files_text(files) -> str:
    if not isinstance(files, list):
        return str(files)
    return ", ".join(f"`{f}`" for f in files) if files else "the bundled demo set"


def _how_chosen(info: dict) -> list[str]:
    if "pareto" in info:
        return _how_chosen_front(info)
    metric, split, trials = info["metric"], info["split"], info["trials"]
    n_stopped = sum(t["status"] == "stopped early" for t in trials)
    n_rankable = sum(t["eligible"] for t in trials)
    return [
        "## How the winner was chosen",
        "",
        f"Trials are ranked by their best **{metric}** ({info['mode']}) on the validation split, "
        "each at the epoch whose checkpoint was saved (trials stopped early by ASHA compete at "
        "their best epoch). The winner is rank 1. The top trials' checkpoints were then "
        f"re-evaluated on the **{split}** split saved with each trial"
        + (
            (
                ": those molecules played no part in training or in choosing the model."
                if info.get("data", {}).get("guarantee", "molecules").startswith("molecules")
                else ": those conformers played no part in training or in choosing the model, but "
                "the split is by conformer, so other conformers of the same molecules may have "
                "been trained on (this measures interpolation, not unseen molecules)."
            )
            if split == "test"
            else " (the validation split also chose the model: these "
            "numbers are not an unbiased estimate)."
        )
        + " Diverged and failed trials are excluded.",
        "",
        f"{len(trials)} trials: {n_rankable} rankable ({n_stopped} stopped early by the "
        f"scheduler), {len(info['excluded'])} excluded.",
        "",
    ]


def _how_chosen_front(info: dict) -> list[str]:
    front, split, trials = info["pareto"], info["split"], info["trials"]
    names = front["objectives"]
    n_stopped = sum(t["status"] == "stopped early" for t in trials)
    return [
        "## How the winner was chosen",
        "",
        f"The sweep had {len(names)} objectives, all lower-is-better: "
        + ", ".join(f"**{n}**" for n in names)
        + f". Each trial competes at the epoch of its best {names[0]} (the checkpoint saved "
        "there), with that epoch's validation values and "
        "its costs, which are computed from its config and the same for every epoch. The "
        "**front** holds the trials that no other trial matches or beats on every objective "
        "(equal trials are all kept). The winner, copied to `best_model/`, was chosen from the "
        f"front by `rank.select`: {front['rule']}. Every front model was then re-evaluated on "
        f"the **{split}** split saved with it and copied to `pareto/trial_<id>/`; the {split} "
        "numbers are reported and chose nothing. Diverged and failed trials are excluded.",
        "",
        f"{len(trials)} trials: {len(front['points'])} rankable ({n_stopped} stopped early by "
        f"the scheduler, which compares trials on {names[0]} only), "
        f"{len(front['front'])} on the front, {len(info['excluded'])} excluded.",
        "",
    ]


def _front_section(r: Ranking) -> list[str]:
    """The front: one row per model, the selected one first, with its objectives (validation
    and costs) and its re-evaluated error on the ranking split."""
    front, split, df = r.info["pareto"], r.settings.split, r.df
    names = front["objectives"]
    held = [c for c in (f"{split}_{n}" for n in _TOP_TABLE) if c in df]
    cols = ["trial_id", "status", "checkpoint_epoch", *r.keys, *names, *held]
    rows = df[cols].values.tolist()
    rows = [
        [("**selected** " if i == 0 else "") + str(row[0]), *row[1:]] for i, row in enumerate(rows)
    ]
    return [
        "",
        f"## The front: {len(df)} models",
        "",
        f"Selection rule (`rank.select`): {front['rule']}.",
        "",
        _md_table([metrics.label(c) for c in cols], rows),
        "",
        f"Objectives on the validation split at each trial's chosen epoch; `{split}_*` columns "
        "re-evaluated from the same checkpoints (reported only). Dominated trials are drawn "
        "faint in `pareto.png`; every trial's objectives are in `ranking.json` (`pareto`).",
        "",
    ]


def _data_section(d: dict) -> list[str]:
    lines = [
        "## Data",
        "",
        f"Files: {_files_text(d['files'])}  ",
        f"Checksum: `{(d['checksum'] or '')[:16]}`; split by {d['split_by']} "
        f"(split_seed {d['split_seed']})",
        "",
    ]
    lines.append(
        _md_table(
            ["split", "conformers", "molecules"],
            [
                [
                    s,
                    v["conformers"],
                    f"{len(v['molecules'])}: "
                    + ", ".join(v["molecules"][:12])
                    + (" …" if len(v["molecules"]) > 12 else ""),
                ]
                for s, v in d["splits"].items()
            ],
        )
    )
    for s_, z in d.get("elements_not_in_train", {}).items():
        lines += [
            "",
            f"**Note:** the {s_} split holds elements the training split never shows "
            f"(atomic numbers {', '.join(map(str, z))}); the model has to guess their "
            "charges, so expect large errors on those molecules.",
        ]
    return lines


def _winner_section(r: Ranking) -> list[str]:
    w, split = r.info["winner"], r.settings.split
    lines = [
        "",
        "## Winner",
        "",
        f"Trial **{w['trial_id']}** ({w['status']}, {w['epochs']} of {w['max_epochs']} "
        f"epochs trained), checkpoint of epoch {w['checkpoint_epoch']}, "
        f"{w['n_params']} parameters, copied to `{r.best_model.name}/`"
        + (
            f"; chosen from the front by `rank.select`: {r.info['pareto']['rule']}."
            if "pareto" in r.info
            else "."
        ),
        "",
    ]
    if r.keys:
        lines += [_md_table(["hyper-parameter", "value"], [[k, w.get(k)] for k in r.keys]), ""]
    m = r.top[0].analysis.metrics
    rows = [
        [name, metrics.unit(name) or "–", w.get(f"valid_{name}"), m.get(name)]
        for name in _WINNER_TABLE
    ]
    lines.append(
        _md_table(
            ["metric", "unit", "valid (recorded at that epoch)", f"{split} (re-evaluated)"], rows
        )
    )
    return lines


def _breakdown_section(r: Ranking) -> list[str]:
    """The winner's ESP error per grid shell, nearest element, molecule size and functional
    class on the ranking split (`dcmtune.analysis.breakdown`)."""
    from dcmtune.analysis.breakdown import KIND_TITLES, KINDS

    b, split = r.info.get("breakdown"), r.settings.split
    if not b:
        return []
    lines = [
        "## Where the error is",
        "",
        f"The winner's {split} ESP RMSE ({_ESP_UNIT}) pooled over the grid points of each group "
        f"(all {b['n_points']} points: {_fmt(b['esp_rmse'])}). Shells are the generator's "
        "Merz-Kollman factors × vdW radius"
        + (
            ", recovered from the geometry (largest deviation "
            f"{b['shell_max_deviation']:.2g} × vdW)"
            if b["shell_source"] == "geometry" and math.isfinite(b["shell_max_deviation"] or 0)
            else ""
        )
        + "; the element is that of the nearest atom; molecules are sized by heavy atoms; a "
        "molecule may be in several functional classes (RDKit SMARTS on its SMILES; "
        "`unknown`: no SMILES in the data's provenance). Also in `breakdown.csv`.",
    ]
    for kind in KINDS:
        rows = b["tables"].get(kind) or []
        if not rows:
            continue
        lines += [
            "",
            _md_table(
                [KIND_TITLES[kind], "ESP RMSE", "ESP MAE", "points", "conformers", "molecules"],
                [
                    [
                        row["group"],
                        row["esp_rmse"],
                        row["esp_mae"],
                        row["n_points"],
                        row["n_conformers"],
                        row["n_molecules"],
                    ]
                    for row in rows
                ],
            ),
        ]
    return [*lines, ""]


def _top_section(r: Ranking) -> list[str]:
    metric, split, df = r.settings.metric, r.settings.split, r.df
    cols = (
        ["rank", "trial_id", "status", "epochs", "checkpoint_epoch"]
        + r.keys
        + [metric]
        + [c for c in (f"{split}_{n}" for n in _TOP_TABLE) if c != metric and c in df]
    )
    return [
        "",
        f"## Top {len(df)} trials",
        "",
        _md_table([metrics.label(c) for c in cols], df[cols].values.tolist()),
        "",
        f"ESP in {_ESP_UNIT}, charges in {metrics.unit('mono_mae')}, dipoles in "
        f"{metrics.unit('dipole_mae')} (Debye). Full table: `ranking.csv`; everything: "
        "`ranking.json`.",
        "",
    ]


def _baselines_section(r: Ranking) -> list[str]:
    info, split = r.info, r.settings.split
    if not info["baselines"]:
        return []
    rows = [
        [
            "DCMNet (winner)",
            "train split (selected on valid)",
            "prediction",
            r.top[0].analysis.metrics["esp_rmse"],
        ]
    ]
    rows += [
        [b["method"], b["fitted_on"], b["kind"], b[f"{split}_esp_rmse"]] for b in info["baselines"]
    ]
    return [
        f"## Classical baselines on the same {split} conformers",
        "",
        _md_table(["method", "fitted on", "kind", f"{split} ESP RMSE [{_ESP_UNIT}]"], rows),
        "",
        "Fits to the evaluated ESP itself are not predictions: they show what "
        "fixed atom-centred charges can reach on these molecules at best. ESP RMSE "
        "is defined as for the model (root of the mean over conformers of each "
        "conformer's mean squared error).",
        "",
        *[f"- {b['method']}: {b['note']}" for b in info["baselines"] if b.get("note")],
        "",
    ]


def _importances_section(r: Ranking) -> list[str]:
    imp = r.info.get("importances") or {}
    if not imp:
        return []
    n = sum(t["eligible"] and math.isfinite(t["value"]) for t in r.info["trials"])
    return [
        "## Parameter importances",
        "",
        _md_table(["hyper-parameter", "importance"], [[k, v] for k, v in imp.items()]),
        "",
        f"How much of the spread of {r.settings.metric} each searched hyper-parameter "
        f"explains (Optuna's `get_param_importances`, PED-ANOVA; sums to 1), over the {n} "
        "rankable trials, each at its best epoch. With few trials these are rough.",
        "",
    ]


def _warnings_section(info: dict) -> list[str]:
    lines = []
    if info["excluded"]:
        lines += [
            "## Excluded trials",
            "",
            _md_table(
                ["trial", "status", "reason"],
                [[e["trial_id"], e["status"], e["reason"]] for e in info["excluded"]],
            ),
            "",
        ]
    if info.get("skipped_checkpoints"):
        lines += [
            "## Damaged checkpoints (passed over for the next candidate)",
            "",
            *[f"- {s}" for s in info["skipped_checkpoints"]],
            "",
        ]
    if info.get("splits_differ"):
        split = info["split"]
        lines += [
            f"**Warning:** the ranked trials used different {split} splits; their "
            f"{split} metrics are not directly comparable.",
            "",
        ]
    return lines


def _plots_section(r: Ranking, plots: list[str]) -> list[str]:
    split, metric = r.settings.split, r.settings.metric
    captions = {
        "learning_curves.png": "Learning curves of the top trials",
        "esp_parity.png": f"Winner: predicted vs reference ESP on the {split} split",
        "per_molecule_rmse.png": f"ESP RMSE per {split} molecule, winner and baselines",
        "hyperparameters.png": f"Searched hyper-parameters vs {metric}",
        "param_importances.png": "Importance of each searched hyper-parameter",
        "pareto.png": "Validation error against each cost: the front, dominated trials faint",
    }
    lines = ["## Plots", ""]
    for p in plots:
        lines += [f"![{captions.get(p, p)}]({p})", ""]
    return lines + [
        "## Reproduce",
        "",
        "```",
        f"python -m dcmtune.analysis {r.best_model} --split {split}",
        "```",
        "",
    ]


def markdown(r: Ranking, plots: list[str]) -> str:
    """report.md of a ranking: how the winner was chosen, the data, the winner, the top
    trials, the classical baselines, where the winner's error is, excluded trials, the plots
    and how to reproduce."""
    info = r.info
    return "\n".join(
        [
            f"# Ranking of sweep `{info['name']}`",
            "",
            f"Experiment: `{info['experiment']}`  ",
            f"Ranked: {info['created']}",
            "",
            *_how_chosen(info),
            *_data_section(info["data"]),
            *_winner_section(r),
            *(_front_section(r) if "pareto" in info else _top_section(r)),
            *_importances_section(r),
            *_baselines_section(r),
            *_breakdown_section(r),
            *_warnings_section(info),
            *_plots_section(r, plots),
        ]
    )


# --------------------------------------------------------------------------- console


def format_ranking(df: pd.DataFrame) -> str:
    """The ranking as a console table, the winner, the baselines and the report path."""
    metric, split = df.attrs["metric"], df.attrs["split"]
    front = df.attrs.get("pareto")
    costs = front["objectives"][1:] if front else []
    cols = [
        c
        for c in (
            "rank",
            "trial_id",
            "status",
            "checkpoint_epoch",
            *costs,
            metric,
            f"{split}_esp_rmse",
            f"{split}_esp_mae",
            f"{split}_mono_mae",
        )
        if c in df
    ]
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        lines = [df[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}")]
    w = df.attrs["winner"]
    if front:
        lines.append(
            f"\nthe front of {', '.join(front['objectives'])}: {len(df)} of "
            f"{len(front['points'])} rankable trials; selected by {front['rule']}"
        )
    lines.append(
        f"\nwinner: trial {w['trial_id']} ({metric} {w[metric]:.4g}; {split}_esp_rmse "
        f"{w[f'{split}_esp_rmse']:.4g} {_ESP_UNIT}) -> {w['best_model']}"
    )
    for b in df.attrs["baselines"]:
        lines.append(f"  baseline {b['method']:<36} {split}_esp_rmse {b[f'{split}_esp_rmse']:.4g}")
    if df.attrs["excluded"]:
        lines.append(
            "excluded: "
            + ", ".join(f"{e['trial_id']} ({e['reason']})" for e in df.attrs["excluded"])
        )
    report = [f for f in df.attrs.get("files") or [] if f.endswith("report.md")]
    if report:
        lines.append(f"report: {report[0]}")
    return "\n".join(lines)
