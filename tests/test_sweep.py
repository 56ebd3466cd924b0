"""The sweep end to end on the shared local Ray: one tiny sweep inspected by several tests, two
trials at once, an interrupted sweep finished with --resume, and --debug without Ray."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
from ray import tune

from dcmtune.sweep.driver import run_sweep
from dcmtune.sweep.spec import SWEEP_METRICS, load_spec
from dcmtune.sweep.study import open_storage
from dcmtune.train.checkpoints import load_checkpoint, read_meta

pytestmark = pytest.mark.ray


def _study(spec):
    return optuna.load_study(study_name=spec.name, storage=open_storage(spec.study_storage))


def _trial_frames(outcome):
    """{trial_id: per-epoch dataframe} of a finished sweep."""
    return {r.metrics["trial_id"]: r.metrics_dataframe for r in outcome.results}


def _lr(result):
    return result.config["training.learning_rate"]


# --------------------------------------------------------------------------- the tiny sweep


def test_tiny_sweep_completes(tiny_sweep):
    spec, outcome = tiny_sweep.spec, tiny_sweep.outcome
    print(f"tiny sweep: {len(outcome.results)} trials in {tiny_sweep.seconds:.1f} s")
    assert outcome.status == "completed"
    assert len(outcome.results) == spec.run.num_samples == 5
    assert outcome.results.num_errors == 0
    assert outcome.resources.gpu == 0.0  # gpu: auto on a cluster without GPUs -> CPU trials


def test_every_trial_reports_every_epoch(tiny_sweep):
    outcome = tiny_sweep.outcome
    for tid, df in _trial_frames(outcome).items():
        epochs = df["epoch"].tolist()
        assert epochs == list(range(1, len(epochs) + 1)), tid
        for name in SWEEP_METRICS + (
            "epoch",
            "step",
            "lr",
            "best_valid_loss",
            "diverged",
            "epoch_time",
            "fit_status",
        ):
            assert name in df.columns, name
        assert df["valid_esp_rmse"].map(math.isfinite).all()


def test_bad_trial_is_stopped_by_asha_and_pruned_in_optuna(tiny_sweep):
    spec, outcome = tiny_sweep.spec, tiny_sweep.outcome
    by_lr = {_lr(r): r for r in outcome.results}
    bad, good = by_lr[tiny_sweep.bad_lr], by_lr[tiny_sweep.good_lr]
    assert good.metrics["epoch"] == spec.num_epochs  # the first trial runs to the end
    assert bad.metrics["epoch"] < spec.num_epochs  # ASHA stopped it at a rung
    assert bad.metrics["fit_status"] == "running" and not bad.metrics["diverged"]

    study = _study(spec)
    assert len(study.trials) == spec.run.num_samples
    states = {t.params["training.learning_rate"]: t for t in study.trials}
    pruned = states[tiny_sweep.bad_lr]
    assert pruned.state == optuna.trial.TrialState.PRUNED
    assert sorted(pruned.intermediate_values) == list(range(1, bad.metrics["epoch"] + 1))
    done = states[tiny_sweep.good_lr]
    assert done.state == optuna.trial.TrialState.COMPLETE
    # A complete trial's value is its best epoch's metric, as ranked and checkpointed.
    best = good.metrics_dataframe["valid_esp_rmse"].min()
    assert done.value == pytest.approx(best, rel=1e-12)
    # Every trial that stopped before max_t is PRUNED; all others COMPLETE.
    for r in outcome.results:
        t = states[_lr(r)]
        want = "PRUNED" if r.metrics["epoch"] < spec.num_epochs else "COMPLETE"
        assert t.state.name == want


def test_results_dataframe_has_the_metrics(tiny_sweep):
    outcome = tiny_sweep.outcome
    df = outcome.results.get_dataframe()
    assert isinstance(df, pd.DataFrame) and len(df) == 5
    assert {"valid_loss", "valid_esp_rmse", "config/training.learning_rate"} <= set(df.columns)


def test_checkpoints_and_trial_files_exist(tiny_sweep):
    spec, outcome = tiny_sweep.spec, tiny_sweep.outcome
    exp = spec.experiment_dir
    assert (exp / "sweep_spec.json").is_file() and (exp / "spec.yaml").is_file()
    for r in outcome.results:
        trial_dir = Path(r.path)
        assert trial_dir.parent == exp and trial_dir.name.startswith("trial_")
        # The trainer's own files, synced from the trial's working directory.
        for name in ("config.json", "split.json", "history.csv"):
            assert (trial_dir / name).is_file(), (trial_dir, name)
        assert (trial_dir / "checkpoints" / "best" / "meta.json").is_file()
        # Tune checkpoints: the best epoch always has one.
        df = r.metrics_dataframe
        best_epoch = int(df.loc[df["valid_esp_rmse"].idxmin(), "epoch"])
        best = r.get_best_checkpoint("valid_esp_rmse", "min")
        assert read_meta(Path(best.path))["epoch"] == best_epoch
        assert 1 <= len(r.best_checkpoints) <= spec.run.num_to_keep + 1  # + the latest


def test_trial_config_is_the_spec_plus_the_point(tiny_sweep):
    spec, outcome = tiny_sweep.spec, tiny_sweep.outcome
    r = outcome.results[0]
    cfg = json.loads((Path(r.path) / "config.json").read_text())
    assert cfg["training"]["learning_rate"] == _lr(r)
    assert cfg["training"]["chg_w"] == r.config["training.chg_w"]
    assert cfg["model"]["features"] == 4 and cfg["training"]["num_epochs"] == 4
    assert cfg["name"] == Path(r.path).name and cfg["output_dir"] == str(spec.experiment_dir)
    assert cfg["data"]["data_files"] == spec.base.data.data_files


def test_best_trial_checkpoint_loads(tiny_sweep):
    outcome = tiny_sweep.outcome
    best = outcome.best
    assert best is not None and best.checkpoint is not None
    state, meta = load_checkpoint(Path(best.checkpoint))
    assert "params" in state and "ema_params" in state
    assert meta["epoch"] == best.epoch
    assert meta["metrics"]["valid_esp_rmse"] == pytest.approx(best.metrics["valid_esp_rmse"])
    assert meta["config"]["training"]["learning_rate"] == best.config["training.learning_rate"]
    all_rmse = [r.metrics_dataframe["valid_esp_rmse"].min() for r in outcome.results]
    assert best.metrics["valid_esp_rmse"] == pytest.approx(min(all_rmse))


def test_asha_state_is_saved_with_the_experiment(tiny_sweep):
    spec = tiny_sweep.spec
    assert list(spec.experiment_dir.glob("callback-states-*.pkl"))
    assert list(spec.experiment_dir.glob("searcher-state-*.pkl"))


# --------------------------------------------------------------------------- concurrency


def test_two_trials_run_at_the_same_time(ray_session, tiny_spec, tmp_path):
    def edit(raw):
        raw["scheduler"] = {"name": "fifo"}
        raw["training"]["num_epochs"] = 3

    path = tiny_spec("conc", tmp_path, edit=edit, num_samples=2, max_concurrent_trials=2)
    outcome = run_sweep(load_spec(path), verbose=0)
    assert outcome.status == "completed" and len(outcome.results) == 2
    spans = []
    for r in outcome.results:
        df = r.metrics_dataframe
        end = float(df["timestamp"].iloc[-1])
        start = end - float(df["time_total_s"].iloc[-1])
        spans.append((start, end))
    (s1, e1), (s2, e2) = spans
    overlap = min(e1, e2) - max(s1, s2)
    print(f"trial spans {spans}, overlap {overlap:.1f} s")
    assert overlap > 0, spans


# --------------------------------------------------------------------------- resume


class _InterruptAfter(tune.Callback):
    """Interrupts the run like Ctrl-C once `n` trials have finished (once per `log` file, which
    lists the finished trial ids)."""

    def __init__(self, n, log):
        self.n, self.log = n, str(log)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if os.path.exists(self.log) and json.loads(Path(self.log).read_text()).get("sent"):
            return
        done = [t.trial_id for t in trials if t.status == "TERMINATED"] + [trial.trial_id]
        done = sorted(set(done))
        sent = len(done) >= self.n
        Path(self.log).write_text(json.dumps({"done": done, "sent": sent}))
        if sent:
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune's graceful-stop signal


def test_interrupted_sweep_finishes_with_resume(ray_session, tiny_spec, tmp_path, caplog):
    def edit(raw):
        raw["searcher"]["storage"] = "res.log"  # a journal file in the experiment directory

    spec = load_spec(tiny_spec("res", tmp_path, edit=edit, num_samples=4))
    log = tmp_path / "interrupt.json"
    first = run_sweep(spec, verbose=0, callbacks=[_InterruptAfter(2, log)])
    assert first.status == "interrupted"
    done = json.loads(log.read_text())["done"]
    finished = {tid: df for tid, df in _trial_frames(first).items() if tid in done}
    assert len(finished) == len(done) >= 2
    assert len(first.results) < 4 or first.results.num_terminated < 4
    assert len(_study(spec).trials) < 4

    caplog.set_level("INFO", logger="dcmtune.sweep.tune_ext")
    second = run_sweep(spec, resume=True, verbose=0)
    assert second.status == "completed"
    ids = [r.metrics["trial_id"] for r in second.results]
    assert len(ids) == len(set(ids)) == spec.run.num_samples
    after = _trial_frames(second)
    for tid, df in finished.items():  # finished trials were not run again
        pd.testing.assert_frame_equal(df.reset_index(drop=True), after[tid].reset_index(drop=True))
    study = _study(spec)
    assert len(study.trials) == spec.run.num_samples
    assert all(t.state.is_finished() for t in study.trials)
    assert any("restored ASHA rungs" in rec.message for rec in caplog.records)


# --------------------------------------------------------------------------- debug


def test_debug_runs_one_trial_without_ray(tiny_spec, jax_cache_dir, tmp_path):
    path = tiny_spec("dbg", tmp_path, edit=lambda raw: raw.update(debug={"training.num_epochs": 2}))
    code = (
        "import sys; from dcmtune.sweep.commands import main; rc = main([sys.argv[1], '--debug']); "
        "print('RAY' if 'ray' in sys.modules else 'NORAY', rc)"
    )
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(jax_cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "NORAY 0", out.stdout[-2000:]
    assert lines[0].startswith("debug trial of dbg: training.learning_rate=")
    assert any(line.startswith("Epoch 2/2") for line in lines)
    assert sum(line.startswith("esp_rmse [kcal/mol/e]") for line in lines) == 2
    runs = list((tmp_path / "results" / "dbg-debug").iterdir())
    assert len(runs) == 1 and (runs[0] / "history.csv").is_file()
    assert not (tmp_path / "results" / "dbg").exists()  # no Tune experiment


# --------------------------------------------------------------------------- the CLI


def test_cli_sweep_on_a_running_cluster(ray_session, tiny_spec, tmp_path):
    """`python -m dcmtune.sweep SPEC --address ADDR` as a user types it, connecting to the test
    session's Ray (no second Ray is started)."""
    path = tiny_spec(
        "cli", tmp_path, num_samples=2, edit=lambda raw: raw["training"].update(num_epochs=2)
    )
    address = ray_session.get_runtime_context().gcs_address
    out = subprocess.run(
        [sys.executable, "-m", "dcmtune.sweep", str(path), "--address", address, "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "cluster: 2 CPUs, 0 GPUs; per trial: 1 CPU, 0 GPU (CPU trial)" in text
    assert f"completed: 2 trials (0 errors) in {tmp_path / 'results' / 'cli'}" in text
    assert "best trial: " in text and "  valid_esp_rmse " in text
    assert "  checkpoint: " + str(tmp_path / "results" / "cli" / "trial_") in text
