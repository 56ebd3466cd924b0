"""Sweeps replayed on a table of learning curves (dcmtune.sweep.replay): the table's space,
snapping and target rule in closed form, and the replay against a real Ray Tune run of the same
spec on a tiny table.
"""

import dataclasses
import itertools
import math
import time

import numpy as np
import pandas as pd
import pytest

from dcmtune.sweep.replay import CurveTable, replay, replay_spec

LRS = [3e-3, 1e-2, 3e-2]
N_DCM = [1, 2]
EPOCHS = 9


def _tiny_frame() -> pd.DataFrame:
    """6 configurations x 9 epochs whose curves cross: the fast learning rate is best early,
    the middle one best at the end; 2 charges per atom better than 1."""
    rows = []
    for i, (lr, n) in enumerate(itertools.product(LRS, N_DCM)):
        final = 1.0 + 0.4 * abs(math.log10(lr) + 2) - 0.1 * (n - 1)
        speed = {3e-3: 6.0, 1e-2: 3.0, 3e-2: 1.0}[lr]
        for e in range(1, EPOCHS + 1):
            v = final * (1 + 2 * math.exp(-e / speed))
            rows.append(
                {
                    "config": f"c{i}",
                    "training.learning_rate": lr,
                    "model.n_dcm": n,
                    "epoch": e,
                    "valid_esp_rmse": v,
                    "test_esp_rmse": 1.1 * v,
                    "epoch_time": 1.0 + 0.5 * (n - 1),
                }
            )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def table() -> CurveTable:
    return CurveTable.from_frame(_tiny_frame())


def test_table_space_snapping_and_target(table):
    assert table.keys == ("training.learning_rate", "model.n_dcm")
    assert table.valid.shape == (6, EPOCHS) and table.epoch_time.tolist() == [1, 1.5] * 3
    space = table.space()
    lo, hi = space["training.learning_rate"]["loguniform"]
    assert lo == pytest.approx(3e-3 / math.sqrt(10 / 3), rel=1e-3)
    assert hi == pytest.approx(3e-2 * math.sqrt(3), rel=1e-3)
    assert space["model.n_dcm"] == {"randint": [1, 2]}
    # Nearest in log space: 5e-3 is nearer 3e-3 than 1e-2 on a log scale (ratio 1.67 vs 2).
    assert table.config(table.nearest({"training.learning_rate": 5e-3, "model.n_dcm": 2})) == {
        "training.learning_rate": 3e-3,
        "model.n_dcm": 2.0,
    }
    assert table.nearest({"training.learning_rate": 6e-3, "model.n_dcm": 1}) == 2
    # Best = lr 1e-2, n_dcm 2 at the last epoch: 0.9 x (1 + 2 e^-3). It alone lies within
    # 5%, but it is 1 of 6 configurations, more than a tenth: the target tightens to 2%.
    best = 0.9 * (1 + 2 * math.exp(-3))
    assert table.best() == pytest.approx(best)
    assert table.target() == (0.02, pytest.approx(1.02 * best))
    # With 6 more, worse configurations (1 of 12 within 5%) it stays at 5%.
    worse = _tiny_frame()
    worse = worse.assign(config="w" + worse["config"], valid_esp_rmse=1.5 * worse["valid_esp_rmse"])
    worse["model.n_dcm"] += 2
    wide = CurveTable.from_frame(pd.concat([_tiny_frame(), worse]))
    assert wide.num_configs == 12 and wide.target() == (0.05, pytest.approx(1.05 * best))


def test_bad_tables_are_refused():
    df = _tiny_frame()
    with pytest.raises(ValueError, match="no column 'test_esp_rmse'"):
        CurveTable.from_frame(df.drop(columns="test_esp_rmse"))
    with pytest.raises(ValueError, match="configurations differ in length"):
        CurveTable.from_frame(df.iloc[:-1])


def test_replay_counts_epochs_and_chooses_by_validation(table):
    spec = replay_spec(table, {"sampler": "random", "seed": 3}, num_samples=4, concurrency=2)
    r = replay(table, spec)
    assert r.trial_epochs == 4 * EPOCHS and len(r.trials) == 4
    assert all(ending == "completed" for *_, ending in r.trials)
    assert np.all(np.diff(r.time) >= 0)  # in the order the driver received them
    assert sorted(set(r.trial.tolist())) == [0, 1, 2, 3]
    cfg, epoch, valid, test = r.chosen(r.trial_epochs)
    assert valid == r.valid.min() and test == pytest.approx(1.1 * valid)
    first = r.epochs_to(float(r.valid.max()))
    assert first == 1 and r.epochs_to(0.0) is None
    with pytest.raises(ValueError, match="search.model.features: not an axis"):
        bad = replay_spec(table, search={"model.features": {"choice": [16, 32]}})
        replay(table, bad)


def test_asha_stops_trials_in_the_replay(table):
    spec = replay_spec(
        table,
        {"sampler": "random", "seed": 0},
        {"name": "asha", "grace_period": 1, "reduction_factor": 3},
        num_samples=12,
        concurrency=1,
    )
    r = replay(table, spec)
    ended = [e for *_, e in r.trials]
    assert "stopped" in ended and "completed" in ended
    assert r.trial_epochs == sum(n for _, n, _ in r.trials) < 12 * EPOCHS


CASES = {
    "tpe+asha": ({"sampler": "tpe", "n_startup_trials": 2}, {"name": "asha", "grace_period": 1}),
    "random+hyperband": ({"sampler": "random"}, {"name": "hyperband", "reduction_factor": 3}),
    "qmc+median": (
        {"sampler": "qmc"},
        {"name": "median", "grace_period": 2, "min_samples_required": 2},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_replay_matches_a_real_tune_run(ray_session, table, tmp_path, case):
    """The same spec, run by Ray Tune with a trainable that reports the table's curves, and
    replayed: at concurrency 1 the trials, their configurations and their lengths agree."""
    from ray import tune

    from dcmtune.sweep.tuner import _searcher, scheduler

    searcher, sched = CASES[case]
    spec = replay_spec(table, {**searcher, "seed": 1}, sched, num_samples=7, concurrency=1)
    replayed = [(c, n) for c, n, _ in replay(table, spec).trials]

    def trainable(config):
        c, started = table.nearest(config), time.time_ns()
        for e in range(1, EPOCHS + 1):
            valid = float(table.valid[c, e - 1])
            tune.report({"epoch": e, "valid_esp_rmse": valid, "cfg": c, "started": started})

    tuner = tune.Tuner(
        trainable,
        param_space=spec.param_space(),
        tune_config=tune.TuneConfig(
            metric="valid_esp_rmse",
            mode="min",
            search_alg=_searcher(spec),
            scheduler=scheduler(spec),
            num_samples=spec.run.num_samples,
        ),
        run_config=tune.RunConfig(name=case, storage_path=str(tmp_path), verbose=0),
    )
    grid = tuner.fit()
    assert grid.num_errors == 0
    runs = sorted(  # trials in the order they started (one at a time)
        (res.metrics["started"], int(res.metrics["cfg"]), len(res.metrics_dataframe))
        for res in grid
    )
    assert [(c, n) for _, c, n in runs] == replayed


def test_replay_ends_at_the_trial_epoch_budget_and_at_the_target(table):
    spec = replay_spec(table, {"sampler": "random", "seed": 0}, num_samples=6, concurrency=2)
    capped = dataclasses.replace(spec, run=dataclasses.replace(spec.run, max_trial_epochs=20))
    r = replay(table, capped)
    assert r.trial_epochs == 20  # Tune's stop_all after the result that reached the budget
    full = replay(table, spec)
    assert np.array_equal(full.valid[:20], r.valid)  # the same sweep, cut short
    target = float(np.min(full.valid[:12]))
    early = replay(table, spec, until=(target, 15))
    assert early.trial_epochs == max(full.epochs_to(target), 15)
