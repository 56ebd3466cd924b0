"""Accuracy against cost: the front of synthetic trials, the selection rules, the cost metrics,
several objectives in a spec (bad ones exit 2), and a two-objective sweep on the demo set
interrupted and finished with --resume, then ranked into its front."""

import json
import math
import os
import signal
from pathlib import Path

import optuna
import pandas as pd
import pytest
from ray import tune

from dcmtune.analysis.pareto import describe_rule, dominates, front, select
from dcmtune.config import ModelConfig
from dcmtune.model.cost import model_costs, reference_num_atoms
from dcmtune.sweep import commands as sweep
from dcmtune.sweep.experiment_store import check_experiment_dir
from dcmtune.sweep.spec import SpecError, load_spec
from dcmtune.sweep.study import open_storage

NAN = float("nan")

# --------------------------------------------------------------------------- the front


def test_front_excludes_dominated_points_and_keeps_ties():
    points = [
        [1.0, 2],  # 0 front
        [1.2, 1],  # 1 front: the cheapest
        [1.0, 2],  # 2 front: equal to 0, neither dominates the other
        [1.3, 2],  # 3 dominated by 0 (worse error, same cost)
        [1.2, 3],  # 4 dominated by 0 and 1
        [0.9, 4],  # 5 front: the most accurate
        [NAN, 1],  # 6 no part: not finite
        [0.95, 4],  # 7 dominated by 5 (same cost, worse error)
    ]
    assert front(points) == [0, 1, 2, 5]
    assert dominates([1.0, 2], [1.3, 2]) and not dominates([1.0, 2], [1.0, 2])
    assert not dominates([1.2, 1], [1.0, 2]) and not dominates([1.0, 2], [1.2, 1])


def test_front_of_three_objectives_keeps_a_point_best_on_any_one():
    points = [[1.0, 2, 500], [1.0, 2, 400], [1.5, 1, 900], [2.0, 3, 100], [2.0, 3, 200]]
    assert front(points) == [1, 2, 3]
    assert front([]) == [] and front([[NAN, 1]]) == []


# --------------------------------------------------------------------------- selection

NAMES = ("valid_esp_rmse", "charges_per_atom")
# A front: more charges, lower error. The best error is 1.00; within 5%: up to 1.05.
FRONT = [[1.60, 1], [1.05, 2], [1.02, 3], [1.00, 4]]


def test_most_accurate_picks_the_lowest_error_ties_by_cost_then_order():
    assert select(FRONT, "most_accurate", NAMES) == 3
    assert select([[1.0, 3], [1.0, 2], [1.0, 2]], "most_accurate", NAMES) == 1


def test_knee_is_the_cheapest_within_five_percent_of_the_best():
    assert select(FRONT, "knee", NAMES) == 1  # 1.05 <= 1.05 x 1.00: included, 2 charges
    just_over = [[1.60, 1], [1.0501, 2], [1.02, 3], [1.00, 4]]
    assert select(just_over, "knee", NAMES) == 2
    assert select([[1.0, 1]], "knee", NAMES) == 0
    # Two costs: the first decides, the second breaks ties, then the error.
    three = ("valid_esp_rmse", "charges_per_atom", "n_params")
    pts = [[1.00, 3, 10], [1.03, 2, 900], [1.04, 2, 800], [1.01, 3, 5]]
    assert select(pts, "knee", three) == 2


def test_max_cost_picks_the_most_accurate_within_the_bounds():
    assert select(FRONT, {"max_cost": 2.0}, NAMES) == 1
    assert select(FRONT, {"max_cost": {"charges_per_atom": 3}}, NAMES) == 2
    assert select(FRONT, {"max_cost": 10}, NAMES) == 3
    with pytest.raises(ValueError, match=r"^rank.select.max_cost: no model of the front has "):
        select(FRONT, {"max_cost": 0.5}, NAMES)
    with pytest.raises(ValueError, match=r"^rank.select.max_cost.n_params: not a cost objective"):
        select(FRONT, {"max_cost": {"n_params": 3}}, NAMES)
    assert "within 5% of the best" in describe_rule("knee", NAMES)
    assert "charges_per_atom <= 2" in describe_rule({"max_cost": 2}, NAMES)


# --------------------------------------------------------------------------- cost metrics


def test_costs_are_deterministic_and_grow_with_the_model():
    one, two = ModelConfig(n_dcm=1, features=4), ModelConfig(n_dcm=2, features=4)
    names = ("charges_per_atom", "n_params", "flops_per_molecule")
    a, b = model_costs(one, 5, names), model_costs(two, 5, names)
    assert a["charges_per_atom"] == 1.0 and b["charges_per_atom"] == 2.0
    assert 0 < a["n_params"] < b["n_params"]
    assert 0 < a["flops_per_molecule"] < b["flops_per_molecule"]
    assert model_costs(one, 9, names)["flops_per_molecule"] > a["flops_per_molecule"]
    assert model_costs(one, 5, names) == a
    assert reference_num_atoms([3, 4, 9, 10]) == 7  # median 6.5, rounded up
    with pytest.raises(ValueError, match=r"^valid_loss: not a cost metric"):
        model_costs(one, 5, ["valid_loss"])


# --------------------------------------------------------------------------- the spec


def _objectives(*names):
    return [{"metric": n, "mode": "min"} for n in names]


def _edit(raw, objectives=None, select=None, sampler=None):
    raw["search"]["model.n_dcm"] = {"choice": [1, 2]}
    del raw["model"]["n_dcm"]
    if objectives is not None:
        raw["run"]["objectives"] = objectives
        raw["run"].pop("metric", None)
    if select is not None:
        raw["rank"] = {"select": select}
    if sampler is not None:
        raw["searcher"] = {"sampler": sampler, "seed": 0}


def test_objectives_load_round_trip_and_set_the_metric(tiny_spec, tmp_path):
    path = tiny_spec("mo", tmp_path, edit=lambda raw: _edit(raw, _objectives(*NAMES), "knee"))
    spec = load_spec(path)
    assert spec.run.metric == "valid_esp_rmse" and spec.run.mode == "min"
    assert spec.run.objective_metrics == NAMES and spec.run.costs == ("charges_per_atom",)
    record = json.loads(json.dumps(spec.to_dict()))
    assert record["run"]["objectives"] == _objectives(*NAMES)
    assert record["rank"]["select"] == "knee"
    # One objective keeps the single-metric spec as it was.
    (tmp_path / "one").mkdir()
    single = load_spec(tiny_spec("one", tmp_path / "one", edit=None))
    assert single.run.objectives == () and single.run.objective_metrics == ("valid_esp_rmse",)
    assert single.to_dict()["run"]["objectives"] == ()


BAD = [
    ("unknown metric", _objectives("valid_esp_rmse", "n_charges"), None, None,
     "run.objectives[1].metric: unknown metric 'n_charges'; expected one of valid_loss"),
    ("a test metric", _objectives("valid_esp_rmse", "test_esp_rmse"), None, None,
     "run.objectives[1].metric: unknown metric 'test_esp_rmse' (the test split never"),
    ("mode max", [{"metric": "valid_esp_rmse", "mode": "min"},
                  {"metric": "charges_per_atom", "mode": "max"}], None, None,
     "run.objectives[1].mode: errors and costs are both lower-is-better, so expected min"),
    ("a cost first", _objectives("charges_per_atom", "valid_esp_rmse"), None, None,
     "run.objectives[0].metric: the first objective is the error the scheduler"),
    ("one objective", _objectives("valid_esp_rmse"), None, None,
     "run.objectives: expected a list of at least two {metric, mode} mappings"),
    ("twice", _objectives("valid_esp_rmse", "valid_esp_rmse"), None, None,
     "run.objectives[1].metric: valid_esp_rmse is already an objective"),
    ("an unknown key", [{"metric": "valid_esp_rmse"}, {"metric": "n_params", "min": 1}], None,
     None, "run.objectives[1].min: unknown key; expected one of metric, mode"),
    ("cmaes", _objectives(*NAMES), None, "cmaes",
     "searcher.sampler: cmaes handles one objective; use tpe or nsga2"),
    ("knee without a cost", None, "knee", None,
     "rank.select: knee chooses on cost, but no cost is an objective"),
    ("a bound on a cost that is no objective", _objectives(*NAMES),
     {"max_cost": {"n_params": 100}}, None,
     "rank.select.max_cost.n_params: not an objective; expected one of charges_per_atom"),
    ("an unknown rule", _objectives(*NAMES), "cheapest", None,
     "rank.select: expected most_accurate, knee or {max_cost:"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_objectives_exit_2_with_one_line_and_start_nothing(
    case, tiny_spec, tmp_path, monkeypatch, capsys
):
    _, objectives, select_, sampler, expected = case

    def refuse(*a, **k):
        raise AssertionError("run_sweep reached: the spec was accepted")

    monkeypatch.setattr(sweep, "run_sweep", refuse)
    monkeypatch.setattr("dcmtune.sweep.driver._connect", refuse)
    path = tiny_spec("bad", tmp_path, edit=lambda raw: _edit(raw, objectives, select_, sampler))
    assert sweep.main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: " + expected), err
    assert not (tmp_path / "results").exists()


def test_metric_with_objectives_and_a_constant_cost_are_refused(tiny_spec, tmp_path):
    def both(raw):
        _edit(raw, _objectives(*NAMES))
        raw["run"]["metric"] = "valid_esp_rmse"

    with pytest.raises(SpecError, match=r"^run.metric: given with run.objectives"):
        load_spec(tiny_spec("both", tmp_path, edit=both))

    def fixed_n_dcm(raw):
        raw["run"]["objectives"] = _objectives(*NAMES)

    with pytest.raises(SpecError, match=r"^run.objectives\[1\].metric: charges_per_atom is model"):
        load_spec(tiny_spec("fixed", tmp_path, edit=fixed_n_dcm))


# --------------------------------------------------------------------------- a sweep on Ray


class _InterruptAfter(tune.Callback):
    """Stops the run like Ctrl-C (Tune's graceful-stop signal) once `n` trials have ended; once
    per `log` file, which lists them."""

    def __init__(self, n, log):
        self.n, self.log = n, str(log)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if os.path.exists(self.log):
            return
        done = sorted({t.trial_id for t in trials if t.status == "TERMINATED"} | {trial.trial_id})
        if len(done) >= self.n:
            Path(self.log).write_text(json.dumps(done))
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.fixture(scope="module")
def mo_sweep(ray_session, tiny_spec, tmp_path_factory):
    """A two-objective sweep (valid_esp_rmse, charges_per_atom; knee) on the demo set with tiny
    trials: interrupted after two trials, then finished with --resume and ranked.

    Returns:
      (spec, first outcome, resumed outcome, ids of the trials done before the interrupt)
    """
    from dcmtune.sweep.driver import run_sweep

    def edit(raw):
        _edit(raw, _objectives(*NAMES), "knee")
        raw["data"] = {"data_files": ["demo"], "train_molecules": 5, "split_seed": 0}
        raw["training"]["num_epochs"] = 3
        raw["searcher"]["storage"] = "mo.log"
        raw["searcher"]["points_to_evaluate"] = [
            {"training.learning_rate": 1e-2, "training.chg_w": 1.0, "model.n_dcm": n}
            for n in (2, 1)
        ]
        raw["run"]["num_samples"] = 4

    directory = tmp_path_factory.mktemp("mo_sweep")
    spec = load_spec(tiny_spec("mo", directory, edit=edit))
    log = directory / "interrupt.json"
    first = run_sweep(spec, verbose=0, callbacks=[_InterruptAfter(2, log)])
    second = run_sweep(spec, resume=True, verbose=0)
    return spec, first, second, json.loads(log.read_text())


def _frames(outcome):
    return {r.metrics["trial_id"]: r.metrics_dataframe for r in outcome.results}


@pytest.mark.ray
def test_two_objective_sweep_resumes_and_tells_optuna_both_values(mo_sweep):
    spec, first, second, done = mo_sweep
    assert first.status == "interrupted" and second.status == "completed"
    ids = [r.metrics["trial_id"] for r in second.results]
    assert len(ids) == len(set(ids)) == spec.run.num_samples
    before, after = _frames(first), _frames(second)
    for tid in done:  # trials that ended before the interrupt were not run again
        pd.testing.assert_frame_equal(
            before[tid].reset_index(drop=True), after[tid].reset_index(drop=True)
        )
    study = optuna.load_study(study_name=spec.name, storage=open_storage(spec.study_storage))
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    assert len(study.trials) == spec.run.num_samples
    by_point = {
        (t.params["model.n_dcm"], t.params["training.learning_rate"]): t for t in study.trials
    }
    for r in second.results:
        df, n_dcm = r.metrics_dataframe, r.config["model.n_dcm"]
        assert (df["charges_per_atom"] == n_dcm).all()  # reported with every epoch
        t = by_point[(n_dcm, r.config["training.learning_rate"])]
        if r.metrics["epoch"] < spec.num_epochs:  # the scheduler stopped it (on the error)
            assert t.state == optuna.trial.TrialState.PRUNED and t.values is None
        else:  # both objectives at the best epoch by the error, as checkpointed and ranked
            assert t.state == optuna.trial.TrialState.COMPLETE
            assert t.values == pytest.approx([df["valid_esp_rmse"].min(), n_dcm], rel=1e-12)
    record = json.loads((spec.experiment_dir / "sweep_spec.json").read_text())
    assert record["run"]["objectives"] == _objectives(*NAMES)


@pytest.mark.ray
def test_resume_refuses_other_objectives(mo_sweep, tiny_spec):
    spec = mo_sweep[0]
    path = Path(spec.path)
    text = path.read_text()
    try:
        path.write_text(text.replace("charges_per_atom", "n_params"))
        with pytest.raises(SpecError, match=r"^run.objectives: differs from the experiment"):
            check_experiment_dir(load_spec(path), resume=True)
    finally:
        path.write_text(text)


@pytest.mark.ray
def test_the_ranking_gives_the_front_and_copies_every_front_model(mo_sweep):
    spec, _, second, _ = mo_sweep
    exp = spec.experiment_dir
    # The front, decided again here from the trials' best validation epochs and their n_dcm.
    best = {
        r.metrics["trial_id"]: [
            r.metrics_dataframe["valid_esp_rmse"].min(),
            r.config["model.n_dcm"],
        ]
        for r in second.results
    }
    ids = sorted(best)
    want = {ids[i] for i in front([best[t] for t in ids])}
    info = json.loads((exp / "ranking.json").read_text())
    got = info["pareto"]
    assert set(got["front"]) == want
    assert {p["trial_id"] for p in got["points"] if p["on_front"]} == want
    assert {p["trial_id"] for p in got["points"]} == set(ids)
    members = sorted(want)
    chosen = members[select([best[t] for t in members], "knee", NAMES)]
    assert got["front"][0] == chosen and info["winner"]["trial_id"] == chosen
    # best_model/ is the knee; pareto/ holds every front model with its test evaluation.
    evaluation = json.loads((exp / "best_model" / "evaluation.json").read_text())
    assert evaluation["trial_id"] == chosen and evaluation["selected_by"]["select"] == "knee"
    copies = sorted(p.name for p in (exp / "pareto").iterdir())
    assert copies == sorted(f"trial_{t}" for t in want)
    for t in want:
        e = json.loads((exp / "pareto" / f"trial_{t}" / "evaluation.json").read_text())
        assert (exp / "pareto" / f"trial_{t}" / "state.msgpack").is_file()
        assert e["selected_by"]["selected"] == (t == chosen)
        assert math.isfinite(e["metrics"]["test_esp_rmse"])
    df = pd.read_csv(exp / "ranking.csv")
    assert list(df["trial_id"].astype(str)) == got["front"]
    assert df["charges_per_atom"].tolist() == [best[t][1] for t in got["front"]]
    assert df["test_esp_rmse"].map(math.isfinite).all()
    assert (exp / "pareto.png").stat().st_size > 0
    report = (exp / "report.md").read_text()
    assert f"## The front: {len(want)} models" in report
    assert "knee: the cheapest model (by charges_per_atom) whose valid_esp_rmse" in report
    assert "![Validation error against each cost" in report


@pytest.mark.ray
def test_rank_select_from_the_command_line_is_checked(mo_sweep, tmp_path, capsys):
    import shutil

    from dcmtune.analysis.commands import rank_main

    copy = tmp_path / "mo"
    shutil.copytree(mo_sweep[0].experiment_dir, copy)
    before = (copy / "ranking.json").read_bytes()
    for select_, expected in (
        ("{max_cost: 0.5}", "rank.select.max_cost: no model of the front has charges_per_atom"),
        ("cheapest", "select: expected most_accurate, knee or {max_cost: ...}, got 'cheapest'"),
        ("{max_cost: {n_params: 9}}", "rank.select.max_cost.n_params: not a cost objective"),
    ):
        assert rank_main([str(copy), "--select", select_]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    assert (copy / "ranking.json").read_bytes() == before  # nothing rewritten


def test_nsga2_sampler_and_the_dry_run_of_several_objectives(tiny_spec, tmp_path):
    from dcmtune.sweep.plan import describe
    from dcmtune.sweep.tuner import sampler

    def edit(raw):
        _edit(raw, _objectives(*NAMES), {"max_cost": 1})
        raw["searcher"] = {"sampler": "nsga2", "seed": 3, "population_size": 8}

    spec = load_spec(tiny_spec("nsga", tmp_path, edit=edit))
    s = sampler(spec)
    assert isinstance(s, optuna.samplers.NSGAIISampler) and s._population_size == 8
    text = "\n".join(describe(spec, {}, None, None))
    assert "objectives: valid_esp_rmse (min), charges_per_atom (min)" in text
    assert "the scheduler and the checkpoints use valid_esp_rmse" in text
    assert "note: asha stops trials on valid_esp_rmse alone" in text  # the cheap end
    assert "searcher: optuna nsga2 (seed 3, population 8)" in text
    fifo = tiny_spec(
        "fifo", tmp_path, edit=lambda raw: (edit(raw), raw.update(scheduler={"name": "fifo"}))
    )
    assert "stops trials on" not in "\n".join(describe(load_spec(fifo), {}, None, None))
    with pytest.raises(SpecError, match=r"^searcher.population_size: only used by sampler: nsga2"):
        load_spec(
            tiny_spec("pop", tmp_path, edit=lambda raw: raw["searcher"].update(population_size=8))
        )
