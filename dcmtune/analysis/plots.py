"""The plots of a ranking: learning curves, ESP parity, per-molecule errors, hyper-parameters
and their importances, and with several objectives the error against each cost (the front).
Matplotlib is imported when the first plot is drawn (Agg canvas, no display needed); every file
is written through `dcmtune._io`. Metric names, units and axis labels come from
`dcmtune.metrics`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from dcmtune import _io, metrics
from dcmtune.units import HARTREE_TO_KCAL

if TYPE_CHECKING:  # only for annotations (matplotlib loads lazily)
    from matplotlib.figure import Figure

    from dcmtune.analysis.ranking import Ranking

__all__ = ["PLOT_FILES", "PARETO_PLOT", "write_plots"]

PLOT_FILES = (
    "learning_curves.png",
    "esp_parity.png",
    "per_molecule_rmse.png",
    "hyperparameters.png",
    "param_importances.png",
)
# With several objectives only: the validation error against each cost.
PARETO_PLOT = "pareto.png"
_ESP_UNIT = metrics.unit("esp_rmse")
# --------------------------------------------------------------------------- plots


def write_plots(directory: Path, r: Ranking) -> list[str]:
    """Draws the plots of a ranking into `directory`; returns the file names written
    (hyperparameters.png only when hyper-parameters were searched, param_importances.png
    only when their importances could be computed, pareto.png only with several objectives)."""
    plots: list[tuple[str, Callable[[Ranking], Figure]]] = [
        (PLOT_FILES[0], _learning_curves),
        (PLOT_FILES[1], _parity),
        (PLOT_FILES[2], _per_molecule),
    ]
    if r.keys:
        plots.append((PLOT_FILES[3], _hyperparameters))
    if r.info.get("importances"):
        plots.append((PLOT_FILES[4], _importances))
    if r.info.get("pareto"):
        plots.append((PARETO_PLOT, _pareto))
    for name, draw in plots:
        _save(draw(r), Path(directory) / name)
    return [name for name, _ in plots]


def _figure(w: float, h: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> None:
    _io.atomic_write(path, lambda f: fig.savefig(f, format="png"))


def _learning_curves(r: Ranking) -> Figure:
    """Validation (solid) and training (dashed) metric per epoch of the top trials; a star at
    the checkpoint ranked. Log y axis when all values are positive."""
    metric = r.settings.metric
    top = [e.trial for e in r.top]
    fig = _figure(10, 5)
    ax = fig.add_subplot()
    train_metric = "train_" + metrics.base_name(metric)
    positive = True
    for i, t in enumerate(top, start=1):
        color = f"C{(i - 1) % 10}"
        df = t.history.history_df
        ep = df["epoch"].to_numpy()
        v = pd.to_numeric(df[metric], errors="coerce").to_numpy(np.float64)
        positive &= bool(np.all(v[np.isfinite(v)] > 0))
        ax.plot(ep, v, "-o", ms=3, color=color, label=f"#{i} {t.trial_id} (valid)")
        if train_metric in df:
            tr = pd.to_numeric(df[train_metric], errors="coerce").to_numpy(np.float64)
            positive &= bool(np.all(tr[np.isfinite(tr)] > 0))
            ax.plot(ep, tr, "--", color=color, alpha=0.6, label=f"#{i} {t.trial_id} (train)")
        ax.plot(
            [t.checkpoint_epoch],
            [t.value],
            marker="*",
            ms=14,
            color=color,
            mec="k",
            ls="none",
            label="selected checkpoint" if i == 1 else None,
        )
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    if positive:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metrics.axis_label(metric))
    ax.set_title(
        f"Learning curves of the top {len(top)} trials of {r.settings.name}\n"
        f"solid: validation, dashed: training; star: checkpoint ranked"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def _parity(r: Ranking) -> Figure:
    """The winner's predicted vs reference ESP at every grid point of the ranking split."""
    t, a, split = r.top[0].trial, r.top[0].analysis, r.settings.split
    ref, pred = a.esp_points()
    fig = _figure(6.5, 6)
    ax = fig.add_subplot()
    lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
    pad = 0.03 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    if len(ref) > 3000:
        hb = ax.hexbin(
            ref, pred, gridsize=70, bins="log", mincnt=1, cmap="viridis", extent=(lo, hi, lo, hi)
        )
        fig.colorbar(hb, ax=ax, label="grid points per bin")
    else:
        ax.scatter(ref, pred, s=6, alpha=0.5, label="grid points")
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel(f"reference ESP ({_ESP_UNIT})")
    ax.set_ylabel(f"predicted ESP ({_ESP_UNIT})")
    m = a.metrics
    ax.set_title(
        f"Winner {t.trial_id} (epoch {a.epoch}): ESP on the {split} split\n"
        f"{m['n_conformers']} conformers of {m['n_molecules']} molecules, "
        f"{m['n_grid_points']} grid points"
    )
    ax.text(
        0.03,
        0.97,
        f"RMSE {m['esp_rmse']:.3f} {_ESP_UNIT}\nMAE {m['esp_mae']:.3f} "
        f"{_ESP_UNIT}\nR² {m['esp_r2']:.4f}",
        transform=ax.transAxes,
        va="top",
        bbox=dict(boxstyle="round", fc="white", alpha=0.8),
    )
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _per_molecule_rmse(mol_id: np.ndarray, mse: np.ndarray) -> pd.Series:
    """ESP RMSE (kcal/mol/e) per molecule from per-conformer MSEs ((Hartree/e)^2)."""
    s = pd.Series(mse).groupby(pd.Series(mol_id)).mean()
    return np.sqrt(s) * HARTREE_TO_KCAL


def _per_molecule(r: Ranking) -> Figure:
    """ESP RMSE per molecule of the ranking split: the winner's bars, baselines' markers."""
    t, a, split = r.top[0].trial, r.top[0].analysis, r.settings.split
    model = a.per_molecule.set_index("mol_id")["esp_rmse"].sort_values()
    mols = list(model.index)
    fig = _figure(10.5, max(3.0, 0.45 * len(mols) + 1.8))
    ax = fig.add_subplot()
    y = np.arange(len(mols))
    ax.barh(y, model.to_numpy(), color="C0", alpha=0.8, label=f"DCMNet winner {t.trial_id}")
    markers = ["o", "s", "D", "^", "v"]
    for i, (method, mse) in enumerate(r.baseline_mse.items()):
        per = _per_molecule_rmse(a.data.mol_id, mse).reindex(mols)
        ax.plot(
            per.to_numpy(),
            y,
            ls="none",
            marker=markers[i % len(markers)],
            color=f"C{i + 1}",
            mec="k",
            label=method.replace("`", ""),
        )
    ax.set_yticks(y)
    ax.set_yticklabels(mols)
    ax.set_xlabel(f"ESP RMSE over the molecule's conformers ({_ESP_UNIT})")
    ax.set_title(
        f"ESP RMSE per {split} molecule ({a.metrics['n_conformers']} conformers of "
        f"{len(mols)} molecules)"
    )
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def _hparam_positions(ax, key: str, kind, search: dict, vals: list) -> list[float]:
    """x positions of `vals` on a hyper-parameter axis (categories jittered, numbers on the
    searched range, log for loguniform or wide positive ranges); sets the axis up."""
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
    if kind == "choice" or not numeric:
        cats = (
            list(search[key]["choice"])
            if kind == "choice"
            else [json.loads(c) for c in sorted({json.dumps(v) for v in vals})]
        )
        pos = {json.dumps(c): i for i, c in enumerate(cats)}
        rng = np.random.default_rng(0)
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels([str(c) for c in cats])
        return [pos.get(json.dumps(v), np.nan) + rng.uniform(-0.12, 0.12) for v in vals]
    xs = [float(v) for v in vals]
    positive = all(x > 0 for x in xs)
    bounds = search.get(key, {}).get(kind) if kind else None
    log_x = kind == "loguniform" or (kind is None and positive and xs and max(xs) / min(xs) > 20)
    if log_x:
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    if bounds and len(bounds) >= 2:  # the searched range, a little margin
        lo, hi = float(bounds[0]), float(bounds[1])
        if log_x:
            ax.set_xlim(lo / 1.2, hi * 1.2)
        else:
            ax.set_xlim(lo - 0.04 * (hi - lo), hi + 0.04 * (hi - lo))
    return xs


def _trial_groups(r: Ranking) -> tuple[list[dict], dict[str, list[dict]], dict[str, dict]]:
    """(trials with a finite value, {label: trials}, {label: plot style}) for the
    hyper-parameter panels: other trials, the top ones, the winner, the excluded."""
    top_ids = {e.trial.trial_id for e in r.top}
    winner = r.top[0].trial.trial_id
    top = "front" if r.info.get("pareto") else f"top {len(r.top)}"
    finite = [t for t in r.info["trials"] if math.isfinite(t["value"])]
    groups = {
        "other trials": [t for t in finite if t["eligible"] and t["trial_id"] not in top_ids],
        top: [t for t in finite if t["trial_id"] in top_ids and t["trial_id"] != winner],
        "winner": [t for t in finite if t["trial_id"] == winner],
        "excluded (diverged/failed)": [t for t in finite if not t["eligible"]],
    }
    style = {
        "other trials": dict(marker="o", color="0.6"),
        top: dict(marker="o", color="C0", mec="k"),
        "winner": dict(marker="*", color="C3", ms=14, mec="k"),
        "excluded (diverged/failed)": dict(marker="x", color="C1"),
    }
    return finite, groups, style


def _hyperparameters(r: Ranking) -> Figure:
    """One panel per searched hyper-parameter: every trial's best validation metric."""
    s, keys = r.settings, r.keys
    ncol = min(len(keys), 3)
    nrow = math.ceil(len(keys) / ncol)
    fig = _figure(4.3 * ncol, 3.6 * nrow + 0.9)
    finite, groups, style = _trial_groups(r)
    ids = [t["trial_id"] for t in finite]
    for j, key in enumerate(keys):
        ax = fig.add_subplot(nrow, ncol, j + 1)
        kind = next(iter(s.search.get(key, {})), None)
        values = [t["point"].get(key) for t in finite]
        xs = dict(zip(ids, _hparam_positions(ax, key, kind, s.search, values), strict=True))
        for label, members in groups.items():
            if members:
                x = [xs[t["trial_id"]] for t in members]
                y = [t["value"] for t in members]
                ax.plot(x, y, ls="none", label=label, **{"ms": 7, **style[label]})
        ax.set_xlabel(key + (f" ({kind})" if kind else ""))
        ax.set_ylabel(f"best validation {metrics.axis_label(s.metric)}")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    handles = {}
    for ax in fig.axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    fig.suptitle(
        f"Searched hyper-parameters vs best {s.metric} (lower is better); "
        f"{len(finite)} trials, each at its best epoch"
    )
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="lower center",
        ncol=len(handles),
        fontsize=9,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def _importances(r: Ranking) -> Figure:
    """Horizontal bars: the importance of each searched hyper-parameter, largest on top."""
    imp = r.info["importances"]
    fig = _figure(6.5, 1.2 + 0.45 * len(imp))
    ax = fig.add_subplot(1, 1, 1)
    names = list(imp)[::-1]
    ax.barh(names, [imp[k] for k in names], color="C0")
    ax.set_xlabel(f"importance for {r.settings.metric} (Optuna, sums to 1)")
    ax.set_xlim(0, 1)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def _pareto(r: Ranking) -> Figure:
    """One panel per further objective: every rankable trial's validation error against it,
    dominated trials faint, the front drawn (a staircase with two objectives), the selected
    model starred, and the front's re-evaluated split values as open markers (reported only)."""
    front = r.info["pareto"]
    names, points = front["objectives"], front["points"]
    error, others = names[0], names[1:]
    on = [p for p in points if p["on_front"]]
    off = [p for p in points if not p["on_front"]]
    chosen = [p for p in on if p["trial_id"] == front["front"][0]]
    held = {e.trial.trial_id: e.analysis.metrics.get(metrics.base_name(error)) for e in r.top}
    split = r.settings.split
    fig = _figure(5.2 * len(others) + 1.5, 4.6)
    for j, cost in enumerate(others):
        ax = fig.add_subplot(1, len(others), j + 1)
        ax.plot(
            [p[cost] for p in off],
            [p[error] for p in off],
            "o",
            color="0.6",
            alpha=0.35,
            label="dominated",
        )
        ordered = sorted(on, key=lambda p: (p[cost], p[error]))
        xs, ys = [p[cost] for p in ordered], [p[error] for p in ordered]
        ax.plot(xs, ys, "o", color="C0", mec="k", ms=7, label="front (validation)")
        if len(others) == 1:
            ax.step(xs, ys, where="post", color="C0", lw=1.2)
        held_pts = [(p[cost], held.get(p["trial_id"])) for p in ordered]
        held_pts = [(x, y) for x, y in held_pts if y is not None and math.isfinite(y)]
        if held_pts:
            ax.plot(
                *zip(*held_pts, strict=True),
                "s",
                mfc="none",
                mec="C2",
                ms=8,
                label=f"front, {split} split (reported, never chosen on)",
            )
        ax.plot(
            [p[cost] for p in chosen],
            [p[error] for p in chosen],
            "*",
            color="C3",
            ms=16,
            mec="k",
            label=f"selected ({_rule_name(front['select'])})",
        )
        _cost_axis(ax, cost, [p[cost] for p in points])
        ax.set_ylabel(f"validation {metrics.axis_label(error)}")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    fig.suptitle(
        f"{r.settings.name}: validation error against cost, {len(points)} trials, "
        f"{len(on)} on the front"
    )
    fig.tight_layout()
    return fig


def _rule_name(select) -> str:
    return select if isinstance(select, str) else "max_cost"


def _cost_axis(ax, cost: str, values: list[float]) -> None:
    """x label of a cost; integer ticks for charges per atom, log for wide positive ranges."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel(metrics.axis_label(cost))
    finite = [v for v in values if math.isfinite(v)]
    if cost == "charges_per_atom":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    elif finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        ax.set_xscale("log")
