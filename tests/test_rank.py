"""Ranking a sweep: order by the validation metric, test metrics re-evaluated from the saved
checkpoints and reproducible in a fresh process, valid plots, excluded trials, bad input."""

import json
import math
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from dcmtune import metrics
from dcmtune.analysis import plots as report
from dcmtune.analysis import rank
from dcmtune.analysis.commands import rank_main
from dcmtune.analysis.plots import PLOT_FILES
from dcmtune.analysis.rank import rank_experiment
from dcmtune.analysis.ranking import RankError
from dcmtune.config import flat_dict

ray = pytest.mark.ray  # tests on the shared tiny sweep (it needs the session's Ray)

TOP_K = 3


@pytest.fixture(scope="module")
def ranked(tiny_sweep, tmp_path_factory):
    """A copy of the shared tiny sweep's experiment, ranked (the copy keeps the shared one
    untouched for other tests). Returns (experiment dir, ranking DataFrame, seconds)."""
    spec, outcome, _ = tiny_sweep
    exp = tmp_path_factory.mktemp("rank") / spec.name
    shutil.copytree(outcome.experiment_dir, exp)
    for name in rank.OUTPUT_FILES + (rank.BEST_MODEL,):  # in case the sweep ranked already
        p = exp / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    t0 = time.perf_counter()
    df = rank_experiment(exp, top_k=TOP_K, split="test")
    return exp, df, time.perf_counter() - t0


def _best_from_histories(exp, metric="valid_esp_rmse"):
    """{trial_id: best finite metric} read independently from each trial's history.csv."""
    out = {}
    for d in exp.glob("trial_*"):
        h = pd.read_csv(d / "history.csv")
        if h.get("diverged", pd.Series([0])).fillna(0).astype(bool).any():
            continue
        v = pd.to_numeric(h[metric], errors="coerce")
        out[d.name[len("trial_") :]] = float(v[np.isfinite(v)].min())
    return out


@ray
def test_ranking_csv_has_top_k_rows_ordered_by_the_validation_metric(ranked):
    exp, df, seconds = ranked
    csv = pd.read_csv(exp / "ranking.csv", dtype={"trial_id": str})
    assert len(csv) == TOP_K and csv["rank"].tolist() == list(range(1, TOP_K + 1))
    assert csv["valid_esp_rmse"].is_monotonic_increasing
    best = _best_from_histories(exp)
    expected = sorted(best, key=lambda t: (best[t], t))[:TOP_K]
    assert csv["trial_id"].tolist() == expected
    np.testing.assert_allclose(csv["valid_esp_rmse"], [best[t] for t in expected], rtol=1e-9)
    for col in (
        "test_esp_rmse",
        "test_esp_mae",
        "test_mono_mae",
        "training.learning_rate",
        "training.chg_w",
        "checkpoint_epoch",
        "epochs",
        "status",
    ):
        assert col in csv, col
    assert np.all(np.isfinite(csv["test_esp_rmse"]))
    js = json.loads((exp / "ranking.json").read_text())
    assert [r["trial_id"] for r in js["ranking"]] == expected
    assert js["winner"]["trial_id"] == expected[0] and js["split"] == "test"
    # The checkpoint ranked is the one that scored the recorded validation value.
    for c in js["checks"]:
        assert math.isclose(c["re_evaluated"], c["recorded"], rel_tol=1e-5)
    print(f"rank_experiment on the tiny sweep: {seconds:.1f} s")


@ray
def test_plots_are_valid_pngs(ranked):
    import matplotlib.image

    exp, _, _ = ranked
    for name in PLOT_FILES:
        path = exp / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        img = matplotlib.image.imread(path)
        assert img.shape[0] > 200 and img.shape[1] > 200, name


@ray
def test_report_lists_winner_baselines_and_plots(ranked):
    exp, df, _ = ranked
    text = (exp / "report.md").read_text()
    winner = df.attrs["winner"]["trial_id"]
    assert f"Trial **{winner}**" in text
    for needle in ("element charges (LSQ)", "per-conformer charges", "kcal/mol/e", *PLOT_FILES):
        assert needle in text, needle
    methods = [b["method"] for b in df.attrs["baselines"]]
    assert "element charges (LSQ)" in methods and "per-conformer charges (`mono`)" in methods
    # The synthetic file's `mono` are the exact charges that made its ESP.
    mono = next(b for b in df.attrs["baselines"] if b["method"].startswith("per-conformer"))
    assert mono["test_esp_rmse"] < 1e-3


@ray
def test_report_and_breakdown_csv_show_where_the_winners_error_is(ranked):
    exp, df, _ = ranked
    csv = pd.read_csv(exp / "breakdown.csv")
    info = json.loads((exp / "ranking.json").read_text())["breakdown"]
    text = (exp / "report.md").read_text()
    assert "## Where the error is" in text
    shells = csv[csv["kind"] == "shell"]
    assert shells["group"].astype(str).tolist() == ["1.4", "1.6", "1.8", "2.0"]
    for kind in ("shell", "element", "size"):  # partitions of the test grid points
        t = csv[csv["kind"] == kind]
        assert t["n_points"].sum() == info["n_points"]
        pooled = np.sqrt((t["n_points"] * t["esp_rmse"] ** 2).sum() / info["n_points"])
        assert pooled == pytest.approx(info["esp_rmse"], rel=1e-9)
    for row in shells.itertuples():
        assert f"| {row.group} | {row.esp_rmse:.4g} |" in text


@ray
def test_ranking_columns_and_report_units_come_from_the_metric_registry(ranked):
    exp, df, _ = ranked
    csv = pd.read_csv(exp / "ranking.csv", dtype={"trial_id": str})
    metric_cols = [c for c in csv if metrics.split_of(c)]
    assert metric_cols and all(metrics.base_name(c) in metrics.METRICS for c in metric_cols)
    assert [c for c in metric_cols if metrics.split_of(c) == "test"] == [
        f"test_{name}" for name in metrics.EVAL_METRICS
    ]
    valid = {c for c in metric_cols if metrics.split_of(c) == "valid"}
    assert valid == {m for m in metrics.SWEEP_METRICS if m.startswith("valid_")}
    lines = (exp / "report.md").read_text().splitlines()
    # The top-trials table: every header is the registry's label (name [unit]).
    header = next(ln for ln in lines if ln.startswith("| rank | trial_id"))
    for cell in header.strip("| ").split(" | "):
        assert cell == metrics.label(cell.split(" [")[0]), cell
    assert f"test_esp_rmse [{metrics.unit('esp_rmse')}]" in header
    # The winner's table: the unit column is the registry's unit.
    start = lines.index(next(ln for ln in lines if ln.startswith("| metric | unit |")))
    rows = [ln.strip("| ").split(" | ") for ln in lines[start + 2 :] if ln.startswith("| ")]
    rows = rows[: next((i for i, r in enumerate(rows) if r[0] == "rank"), len(rows))]
    assert rows and all(unit == (metrics.unit(name) or "–") for name, unit, *_ in rows)


@ray
def test_plot_axes_are_labelled_from_the_metric_registry(ranked, tmp_path, monkeypatch):
    exp, df, _ = ranked
    copy = tmp_path / exp.name
    shutil.copytree(exp, copy)
    figures = {}
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.setdefault(path.name, fig))
    out = rank_experiment(copy, top_k=1, split="valid")
    metric = out.attrs["metric"]
    assert set(figures) == set(PLOT_FILES)
    assert figures["learning_curves.png"].axes[0].get_ylabel() == metrics.axis_label(metric)
    assert {ax.get_ylabel() for ax in figures["hyperparameters.png"].axes} == {
        f"best validation {metrics.axis_label(metric)}"
    }
    unit = f"({metrics.unit('esp_rmse')})"
    parity = figures["esp_parity.png"].axes[0]
    assert parity.get_xlabel().endswith(unit) and parity.get_ylabel().endswith(unit)
    assert figures["per_molecule_rmse.png"].axes[0].get_xlabel().endswith(unit)


@ray
def test_best_model_reproduces_the_reported_test_rmse_in_a_fresh_process(ranked, tmp_path):
    exp, df, _ = ranked
    best = exp / "best_model"
    for name in (
        "state.msgpack",
        "meta.json",
        "config.json",
        "split.json",
        "history.csv",
        "evaluation.json",
    ):
        assert (best / name).is_file(), name
    code = (
        "import json, sys\n"
        "from dcmtune.analysis import analyze_checkpoint, checkpoint_data\n"
        "from dcmtune.analysis import open_checkpoint as load_checkpoint\n"
        "from dcmtune.train.hparams import Hparams\n"
        "from dcmtune.train.step import evaluate_params\n"
        "c = load_checkpoint(sys.argv[1])\n"
        "a = analyze_checkpoint(c, 'test')\n"
        "t = c.config.training\n"
        "m = evaluate_params(c.params, checkpoint_data(c, 'test'), c.config.model,\n"
        "                    Hparams.of(t))\n"
        "print(json.dumps({'analysis': a.metrics['esp_rmse'], 'trainer': m['esp_rmse']}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(best)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    reported = pd.read_csv(exp / "ranking.csv").loc[0, "test_esp_rmse"]
    np.testing.assert_allclose(got["analysis"], reported, rtol=1e-5)
    np.testing.assert_allclose(got["trainer"], reported, rtol=1e-5)
    evaluation = json.loads((best / "evaluation.json").read_text())
    np.testing.assert_allclose(evaluation["metrics"]["test_esp_rmse"], reported, rtol=1e-12)


@ray
def test_diverged_and_failed_trials_are_excluded_and_listed(ranked, tmp_path):
    exp, df, _ = ranked
    copy = tmp_path / exp.name
    shutil.copytree(exp, copy)
    victim = df.loc[0, "trial_id"]  # the winner diverges on its last epoch
    hist = copy / f"trial_{victim}" / "history.csv"
    h = pd.read_csv(hist)
    h.loc[h.index[-1], ["diverged", "valid_loss"]] = [1, float("nan")]
    h.to_csv(hist, index=False)
    crashed = copy / "trial_deadbeef"  # a trial that crashed before its first epoch
    crashed.mkdir()
    (crashed / "params.json").write_text(json.dumps({"training.learning_rate": 0.5}))
    (crashed / "error.txt").write_text("Traceback ...\nRuntimeError: out of memory\n")
    df2 = rank_experiment(copy, top_k=2, split="test", write=False)
    assert victim not in df2["trial_id"].tolist()
    assert df2["trial_id"].tolist() == df["trial_id"].tolist()[1:3]
    excluded = {e["trial_id"]: e for e in df2.attrs["excluded"]}
    assert excluded[victim]["status"] == "diverged"
    assert "diverged at epoch" in excluded[victim]["reason"]
    assert excluded["deadbeef"]["status"] == "failed"
    assert "out of memory" in excluded["deadbeef"]["reason"]


@ray
def test_a_selection_metric_on_the_test_split_is_refused(ranked):
    exp, _, _ = ranked
    with pytest.raises(RankError, match="validation"):
        rank_experiment(exp, metric="test_esp_rmse", write=False)


@pytest.mark.parametrize("kind", ["missing", "empty", "foreign", "file"])
def test_bad_directory_exits_2_with_one_line(kind, tmp_path, capsys):
    path = tmp_path / "exp"
    if kind in ("empty", "foreign"):
        path.mkdir()
    if kind == "foreign":
        (path / "some_dir").mkdir()
        (path / "some_dir" / "data.txt").write_text("not a trial")
    if kind == "file":
        path.write_text("x")
    assert rank_main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "expected" in err[0]


@ray
def test_storage_path_hint_names_the_experiments(ranked, capsys):
    exp, _, _ = ranked
    assert rank_main([str(exp.parent)]) == 2
    err = capsys.readouterr().err.strip()
    assert exp.name in err and "pass one of them" in err


def test_cli_module_exit_code_in_a_subprocess(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "dcmtune.rank", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "not found" in out.stderr


def test_flat_dict_joins_nested_keys_and_keeps_leaves():
    nested = {
        "model": {"n_dcm": 2, "sizes": [8, 16]},
        "training": {"opt": {"lr": 1e-3}},
        "seed": 0,
        "empty": {},
    }
    assert flat_dict(nested) == {
        "model.n_dcm": 2,
        "model.sizes": [8, 16],
        "training.opt.lr": 1e-3,
        "seed": 0,
        "empty": {},
    }
    assert flat_dict(nested, sep="/")["training/opt/lr"] == 1e-3
    assert flat_dict({}) == {}
