"""Command-line overrides (`--data`, `--set`), the dry run, and bundled sets named in a spec.

No test here starts Ray: the CLI's `run_sweep` is replaced by a function that fails the test.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from dcmtune.data.synthetic import make_synthetic
from dcmtune.sweep import commands as sweep
from dcmtune.sweep.experiment_store import check_experiment_dir, write_spec_record
from dcmtune.sweep.overrides import apply_overrides, data_override, parse_set
from dcmtune.sweep.plan import asha_epochs_per_trial, budget, describe
from dcmtune.sweep.spec import SpecError, find_spec, load_spec

SPEC = {
    "name": "t",
    "data": {"data_files": ["syn.npz"], "valid_fraction": 0.2, "test_fraction": 0.2},
    "model": {"features": 4, "max_degree": 1, "num_iterations": 1, "n_dcm": 1},
    "training": {"num_epochs": 9, "batch_size": 2},
    "search": {"training.learning_rate": {"loguniform": [1e-3, 1e-1]}},
    "scheduler": {"grace_period": 1, "reduction_factor": 3},
    "run": {"num_samples": 4, "resources": {"cpu": 1, "gpu": "auto"}, "storage_path": "results"},
}


def _npz(path: Path, seed: int = 1) -> Path:
    d = make_synthetic(num_molecules=10, conformers=2, max_atoms=5, num_grid=24, seed=seed)
    np.savez(
        path,
        R=d.R,
        Z=d.Z,
        N=d.N,
        esp=d.esp,
        vdw_surface=d.grid,
        n_grid=d.n_grid,
        Dxyz=d.dipole,
        com=d.com,
        Q=d.Q,
        mono=d.mono,
        mol_id=d.mol_id,
    )
    return path


@pytest.fixture
def spec_path(tmp_path, monkeypatch):
    _npz(tmp_path / "syn.npz")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(SPEC, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    return path


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if the CLI gets as far as running a sweep (which starts Ray)."""

    def refuse(*a, **k):
        raise AssertionError("run_sweep reached")

    monkeypatch.setattr(sweep, "run_sweep", refuse)
    monkeypatch.setattr(sweep, "run_debug", refuse)
    monkeypatch.setattr("dcmtune.sweep.driver._connect", refuse)
    monkeypatch.setattr("dcmtune.sweep.driver.detect_local_gpus", lambda *a, **k: 0)


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


# --------------------------------------------------------------------------- parsing


def test_set_values_are_typed_like_the_yaml_file():
    assert parse_set("training.num_epochs=300") == ("training.num_epochs", 300)
    assert parse_set("training.learning_rate=1e-2") == ("training.learning_rate", 0.01)
    assert parse_set("training.use_ema=false") == ("training.use_ema", False)
    assert parse_set("run.resources.gpu=auto") == ("run.resources.gpu", "auto")
    assert parse_set("run.time_budget_s=null") == ("run.time_budget_s", None)
    assert parse_set("debug.training.num_epochs=2") == ("debug.training.num_epochs", 2)
    assert parse_set("data.data_files=[a.npz, b.npz]") == ("data.data_files", ["a.npz", "b.npz"])


def test_overrides_nest_into_the_raw_spec_without_changing_it():
    raw = {"training": {"num_epochs": 9}, "run": {"resources": {"cpu": 1}}}
    out = apply_overrides(
        raw,
        [
            ("run.resources.gpu", 0),
            ("training.num_epochs", 30),
            ("debug.training.num_epochs", 2),
            ("notes", "x"),
        ],
    )
    assert out == {
        "training": {"num_epochs": 30},
        "run": {"resources": {"cpu": 1, "gpu": 0}},
        "debug": {"training.num_epochs": 2},
        "notes": "x",
    }
    assert raw == {"training": {"num_epochs": 9}, "run": {"resources": {"cpu": 1}}}


@pytest.mark.parametrize(
    "item, message",
    [
        ("training.num_epochs", "--set training.num_epochs: expected KEY=VALUE"),
        ("=3", "--set =3: expected KEY=VALUE"),
        ("search.training.chg_w=[0, 1]", "--set search.training.chg_w: the search space is not"),
        ("name=other", "--set name: the experiment name is set with --name"),
        ("training..lr=3", "--set training..lr: expected training.<key>"),
        ("notes.x=1", "--set notes.x: notes is a single value"),
        ("modell.features=3", "--set modell.features: unknown spec key 'modell'"),
        ("training.num_epochs=[1", "--set training.num_epochs: '[1' is not a YAML value"),
        ("notes=2026-01-01", "--set notes: expected a number, string"),
    ],
)
def test_bad_set_items_are_refused_with_one_line(item, message):
    with pytest.raises(SpecError) as e:
        parse_set(item)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_data_override_keeps_bundled_names_and_makes_paths_absolute(spec_path):
    key, files = data_override(["organic", "syn.npz"])
    assert key == "data.data_files"
    assert files == ["organic", str(spec_path.parent.resolve() / "syn.npz")]
    with pytest.raises(SpecError, match=r"^--data: file not found: nope.npz$"):
        data_override(["nope.npz"])


# --------------------------------------------------------------------------- the spec


def test_overrides_are_applied_validated_and_recorded(spec_path):
    spec = load_spec(
        spec_path,
        overrides=[("training.num_epochs", 27), ("run.num_samples", 5), ("data.split_seed", 3)],
    )
    assert spec.num_epochs == 27
    assert spec.run.num_samples == 5 and spec.base.data.split_seed == 3
    assert dict(spec.overrides) == {
        "training.num_epochs": 27,
        "run.num_samples": 5,
        "data.split_seed": 3,
    }
    write_spec_record(spec)
    record = json.loads((spec.experiment_dir / "sweep_spec.json").read_text())
    assert record["overrides"] == dict(spec.overrides)
    assert load_spec(spec_path).overrides == {}


def test_resume_needs_the_same_overrides(spec_path, no_ray, capsys):
    spec = load_spec(spec_path, overrides=[("training.num_epochs", 27)])
    write_spec_record(spec)
    (spec.experiment_dir / "tuner.pkl").write_bytes(b"")
    check_experiment_dir(load_spec(spec_path, overrides=[("training.num_epochs", 27)]), True)
    for flags in ([], ["--set", "training.num_epochs=28"], ["--set", "notes=x"]):
        assert sweep.main([str(spec_path), "--resume", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(
            "error: --set: the experiment being resumed was started with overrides "
            "training.num_epochs=27, not "
        ), err
    with pytest.raises(AssertionError, match="run_sweep reached"):
        sweep.main([str(spec_path), "--resume", "--set", "training.num_epochs=27"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--set", "training.num_epochs=abc"], "error: --set training.num_epochs: expected"),
        (["--set", "training.nope=1"], "error: --set training.nope: unknown key"),
        (["--set", "run.num_samples=0"], "error: --set run.num_samples: expected"),
        (["--set", "scheduler.name=sha"], "error: --set scheduler.name: expected asha"),
        (["--set", "scheduler.name=fifo"], "error: scheduler.grace_period: only used by name"),
        (["--set", "model=3"], "error: --set model: expected a mapping"),
        (["--set", "training.learning_rate=0.1"], "error: --set training.learning_rate: this spec"),
        (["--set", "run.resources=2"], "error: --set run.resources: expected a mapping"),
        (["--set", "data.split_by=atom"], "error: --set data.split_by: expected"),
        (["--data", "missing.npz"], "error: --data: file not found: missing.npz"),
        (["--num-samples", "0"], "error: --num-samples: expected at least 1, got 0"),
        (["--dry-run", "--debug"], "error: --dry-run: describes a new sweep"),
    ],
)
def test_bad_overrides_exit_2_and_write_nothing(spec_path, no_ray, capsys, flags, message):
    before = _tree(spec_path.parent)
    assert sweep.main([str(spec_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message), err
    assert err.count("\n") == 1
    assert _tree(spec_path.parent) == before


def test_bundled_set_named_in_a_spec_and_by_data(spec_path, no_ray):
    from dcmtune.sweep.driver import prepare

    raw = {**SPEC, "data": {**SPEC["data"], "data_files": ["organic"]}}
    spec_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    spec = load_spec(spec_path)
    assert spec.base.data.data_files == ["organic"]
    assert prepare(spec).data.num_conformers == 870  # 174 molecules x 5 conformers
    by_flag = load_spec(find_spec("quick"), overrides=[data_override(["organic"])])
    assert by_flag.base.data.data_files == ["organic"]
    assert by_flag.overrides["data.data_files"] == ["organic"]


# --------------------------------------------------------------------------- the dry run


def test_asha_budget_in_closed_form(spec_path):
    spec = load_spec(spec_path)  # grace 1, eta 3, max_t 9: rungs at 1 and 3
    assert asha_epochs_per_trial(spec.scheduler, 9) == pytest.approx(1 + 2 / 3 + 6 / 9)
    b = budget(spec)
    assert b.worst_case == 4 * 9 and b.nominal == pytest.approx(4 * (1 + 2 / 3 + 6 / 9))
    fifo = load_spec(spec_path, overrides=[parse_set("scheduler={name: fifo}")])
    assert budget(fifo).worst_case == 36 and budget(fifo).nominal is None


def test_dry_run_prints_the_plan_and_writes_nothing(spec_path, no_ray, capsys):
    before = _tree(spec_path.parent)
    flags = ["--dry-run", "--set", "training.num_epochs=27", "--data", "syn.npz", "organic"]
    assert sweep.main([str(spec_path), *flags]) == 0
    out = capsys.readouterr().out
    assert _tree(spec_path.parent) == before
    assert not (spec_path.parent / "results").exists()
    lines = out.splitlines()
    assert lines[0] == f"spec: {spec_path.resolve()}"
    assert lines[1].startswith("overrides: data.data_files=[") and "training.num_epochs=27" in out
    assert f"data: {spec_path.parent.resolve() / 'syn.npz'}, organic" in out
    assert "  training.num_epochs          27" in out
    assert "  training.learning_rate       loguniform [0.001, 0.1]" in out
    assert "searcher: optuna tpe (seed 0, 10 start-up trials)" in out
    assert "scheduler: asha (grace 1, reduction 3, brackets 1); max_t = training.num_epochs" in out
    assert "budget: 4 trials x at most 27 epochs = 108 trial-epochs in the worst case" in out
    cpus = os.cpu_count()
    assert f"-> here 1 CPU, CPU trials; {cpus} at once on {cpus} CPUs / 0 GPUs" in out
    assert f"results: {spec_path.parent.resolve() / 'results' / 't'}" in out
    assert lines[-1] == "nothing was started or written (--dry-run)"


def test_dry_run_of_a_shipped_spec_names_it(no_ray, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sweep.main(["quick", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("quick.yaml (shipped)")
    assert list(tmp_path.iterdir()) == []


def test_trial_epoch_budget_counts_each_trials_highest_epoch():
    from dcmtune.sweep.tune_ext import TrialEpochBudget

    stop = TrialEpochBudget(10)
    for trial, epoch in [("a", 1), ("a", 2), ("b", 1), ("a", 2), ("b", 5), ("a", 1)]:
        assert stop(trial, {"epoch": epoch}) is False
    assert stop.used == 7 and not stop.stop_all()  # a: 2, b: 5 (a repeated epoch counts once)
    stop("c", {"epoch": 3})
    assert stop.used == 10 and stop.stop_all()


def test_budget_of_the_dry_run_respects_max_trial_epochs(spec_path):
    spec = load_spec(spec_path, overrides=[("run.max_trial_epochs", 20)])
    assert budget(spec).worst_case == 20  # 4 trials x 9 epochs = 36 > 20
    assert budget(spec).nominal == pytest.approx(4 * (1 + 2 / 3 + 6 / 9))  # below 20
    assert budget(load_spec(spec_path, overrides=[("run.max_trial_epochs", 5)])).nominal == 5
    with pytest.raises(SpecError, match=r"^--set run.max_trial_epochs: expected"):
        load_spec(spec_path, overrides=[("run.max_trial_epochs", 0)])


def test_dry_run_warns_that_hyperband_under_a_concurrency_limit_stops_nothing(spec_path):
    def plan(*overrides):
        return "\n".join(describe(load_spec(spec_path, overrides=list(overrides)), {}, None, None))

    hb = parse_set("scheduler={name: hyperband}")
    assert "HyperBand stopped no trial" in plan(hb, ("run.max_concurrent_trials", 2))
    assert "HyperBand stopped no trial" not in plan(hb)


def test_settings_a_sampler_or_the_debug_trial_does_not_use_are_refused(spec_path):
    with pytest.raises(SpecError, match=r"searcher.n_startup_trials: only used by sampler: tpe"):
        load_spec(spec_path, overrides=[parse_set("searcher={sampler: qmc, n_startup_trials: 5}")])
    with pytest.raises(SpecError, match=r"^--set debug.data.split_seed: the debug trial uses"):
        load_spec(spec_path, overrides=[parse_set("debug.data.split_seed=3")])
