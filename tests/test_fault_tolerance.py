"""Fault-tolerant sweeps, proven by killing them (real processes, every wait bounded by the
work's progress, not by a guess of the machine's speed: cluster_kit.wait_for).

* a trial process SIGKILLed mid-epoch is retried from its last checkpoint;
* a trial whose loss turns non-finite on accepted input is FAIL in Optuna, excluded from the
  ranking and never the console's best, and the sweep goes on;
* the driver (`python -m dcmtune.sweep`) SIGKILLed, and separately SIGTERMed, mid-sweep with
  an sqlite study and two points_to_evaluate: `--resume` ends with every trial exactly once;
* one driver per experiment; the dashboard listens on loopback by default; Ray's auth stays on.

Only processes the tests started are signalled, by pid.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from cluster_kit import CpuMeter, file_size, files_state, processes, ray_workers, stop, wait_for
from ray import tune

from dcmtune.config import DataConfig
from dcmtune.data import load_dataset, split_dataset
from dcmtune.sweep import commands as sweep
from dcmtune.sweep import driver
from dcmtune.sweep.experiment_store import driver_lock
from dcmtune.sweep.spec import load_spec

REPO = Path(__file__).resolve().parent.parent
GOOD_W, BAD_W = 1e-3, 1e30  # esp_w: the outlier's gradient stays finite / overflows float32

pytestmark = pytest.mark.ray


# --------------------------------------------------------------------------- trial killed,
# trial diverged: one sweep, two trials


class _KillTrialOnce(tune.Callback):
    """SIGKILLs the worker process of the first trial as the driver handles its epoch 2 (by the
    pid Tune reports; a Ray worker this test session started), once; records failures.

    The trial's training thread waits at each report until the driver asks for the next
    result, so the kill lands after epoch 2's checkpoint and before epoch 3 ends, however fast
    or loaded the machine is (no sleep aiming at mid-epoch)."""

    def __init__(self):
        self.killed, self.failures = None, {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.killed is None and result.get("epoch") == 2 and not result.get("diverged"):
            os.kill(int(result["pid"]), signal.SIGKILL)
            self.killed = trial.trial_id

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.failures[trial.trial_id] = trial.num_failures


@pytest.fixture(scope="module")
def killed_and_diverged(ray_session, tiny_spec, tmp_path_factory):
    """Two trials (points_to_evaluate): esp_w = GOOD_W is SIGKILLed in epoch 3 and retried;
    esp_w = BAD_W diverges on a finite ESP outlier (1e17 Hartree/e, which the validators
    accept) in one training conformer."""
    directory = tmp_path_factory.mktemp("ft")

    def edit(raw):
        src = raw["data"]["data_files"][0]
        with np.load(src) as f:
            arrays = dict(f)
        split = DataConfig(**{k: v for k, v in raw["data"].items() if k != "data_files"})
        train = split_dataset(load_dataset([src]), split)["train"]
        arrays["esp"] = arrays["esp"].copy()
        arrays["esp"][train[0], 0] = 1e17
        np.savez(directory / "outlier.npz", **arrays)
        raw["data"]["data_files"] = [str(directory / "outlier.npz")]
        raw["search"] = {"training.esp_w": {"choice": [GOOD_W, BAD_W]}}
        raw["scheduler"] = {"name": "fifo"}
        raw["searcher"].update(
            storage="sqlite:///ft.db",
            points_to_evaluate=[{"training.esp_w": GOOD_W}, {"training.esp_w": BAD_W}],
        )

    spec = load_spec(
        tiny_spec("ft", directory, edit=edit, num_samples=2, max_failures=2, checkpoint_every=0)
    )
    cb = _KillTrialOnce()
    outcome = sweep.run_sweep(spec, verbose=0, callbacks=[cb])
    return spec, outcome, cb


def _by_w(outcome):
    return {r.config["training.esp_w"]: r for r in outcome.results}


def test_a_killed_trial_resumes_from_its_last_checkpoint(killed_and_diverged):
    spec, outcome, cb = killed_and_diverged
    assert outcome.status == "completed" and outcome.results.num_errors == 0
    good = _by_w(outcome)[GOOD_W]
    assert cb.killed == good.metrics["trial_id"]
    assert cb.failures[cb.killed] == 1  # Tune recorded one failure, then retried
    history = pd.read_csv(Path(good.path) / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3, 4]  # each epoch once
    # The retry continued from epoch 2's `latest`; a restart from epoch 1 would report epoch 1
    # again. Epoch 2's report was in flight (the kill came while the driver handled it), so
    # the retry reports it again before epoch 3: every epoch at least once, none more than
    # twice. (After a restore, Tune's results of the trial may hold only the retry's.)
    tune_epochs = good.metrics_dataframe["epoch"].tolist()
    assert tune_epochs[-3:] == [2, 3, 4] and tune_epochs.count(1) <= 1, tune_epochs
    assert tune_epochs == sorted(tune_epochs) and len(tune_epochs) <= 5, tune_epochs
    assert good.metrics["fit_status"] == "completed"
    ranked = outcome.ranking
    assert ranked is not None and good.metrics["trial_id"] in set(ranked["trial_id"])


def test_a_diverged_trial_fails_in_optuna_and_is_never_best(killed_and_diverged):
    spec, outcome, _ = killed_and_diverged
    bad = _by_w(outcome)[BAD_W]
    assert bad.metrics["fit_status"] == "diverged" and bad.error is None  # ended cleanly
    study = optuna.load_study(study_name=spec.name, storage=spec.study_storage)
    states = {t.params["training.esp_w"]: t.state.name for t in study.trials}
    assert states == {GOOD_W: "COMPLETE", BAD_W: "FAIL"}
    assert outcome.best is not None and outcome.best.config["training.esp_w"] == GOOD_W
    ranking = json.loads((spec.experiment_dir / "ranking.json").read_text())
    excluded = {e["trial_id"]: e["reason"] for e in ranking["excluded"]}
    assert "diverged" in excluded[bad.metrics["trial_id"]]
    assert bad.metrics["trial_id"] not in set(outcome.ranking["trial_id"])


# --------------------------------------------------------------------------- driver killed


def _study_states(db: Path) -> list[str]:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return [s for (s,) in con.execute("SELECT state FROM trials")]
    except sqlite3.Error:
        return []


def _snapshot_finished(spec) -> dict:
    study = optuna.load_study(study_name=spec.name, storage=spec.study_storage)
    return {
        t.number: (t.state.name, t.value, t.intermediate_values, t.params)
        for t in study.trials
        if t.state.is_finished()
    }


def _kill_driver_mid_sweep(ray_session, tiny_spec, directory, name, sig):
    """Starts `python -m dcmtune.sweep` on the session's cluster, sends `sig` once a trial has
    finished and another runs, and returns (spec, exit code, finished trials at that time)."""

    def edit(raw):
        raw["training"]["num_epochs"] = 3
        raw["scheduler"]["grace_period"] = 2  # trials run 2-3 epochs: a wide window
        raw["searcher"].update(
            storage=f"sqlite:///{name}.db",
            points_to_evaluate=[
                {"training.learning_rate": 1e-2, "training.chg_w": 1.0},
                {"training.learning_rate": 2e-3, "training.chg_w": 1.5},
            ],
        )

    path = tiny_spec(name, directory, edit=edit, num_samples=3)
    spec = load_spec(path)
    db = Path(spec.study_storage.removeprefix("sqlite:///"))  # in the experiment directory
    env = dict(os.environ, PYTHONPATH=str(REPO), TUNE_GLOBAL_CHECKPOINT_S="30")
    address = ray_session.get_runtime_context().gcs_address
    log = directory / f"{name}-driver.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dcmtune.sweep", str(path), "--address", address, "--quiet"],
            cwd=directory,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    driver_cpu = CpuMeter(lambda: processes(proc.pid))
    trials_cpu = CpuMeter(lambda: ray_workers(os.getpid()))  # the session's Ray workers

    def progress():
        """What the sweep leaves behind: the driver's output, the study, the experiment's
        files, CPU time of the driver and of the trials."""
        return (
            file_size(log),
            _study_states(db),
            files_state(spec.experiment_dir),
            driver_cpu(),
            trials_cpu(),
        )

    def window():
        if proc.poll() is not None:
            raise AssertionError(f"the driver exited with {proc.returncode}: {_tail(log)}")
        states = _study_states(db)
        return states.count("COMPLETE") + states.count("PRUNED") >= 1 and "RUNNING" in states

    try:
        wait_for(window, "one trial finished and another running", progress, every=0.05)
        proc.send_signal(sig)
        wait_for(lambda: proc.poll() is not None, f"the driver to exit on {sig.name}", progress)
        finished = _snapshot_finished(spec)  # what was finished when the driver stopped
    finally:
        stop(proc, "the driver")
    return spec, proc.returncode, finished, log.read_text(errors="replace")


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:]


def _check_exactly_once(spec, finished, outcome):
    assert outcome.status == "completed"
    ids = [r.metrics["trial_id"] for r in outcome.results]
    assert len(ids) == len(set(ids)) == spec.run.num_samples
    study = optuna.load_study(study_name=spec.name, storage=spec.study_storage)
    states = [t.state for t in study.trials]
    assert not {optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING} & set(states)
    evaluated = [t for t in study.trials if t.state != optuna.trial.TrialState.FAIL]
    for point in spec.searcher.points_to_evaluate:
        same = [t for t in evaluated if all(np.isclose(t.params[k], v) for k, v in point.items())]
        assert len(same) == 1, (point, [t.number for t in same])
    after = _snapshot_finished(spec)
    for number, record in finished.items():  # finished results unchanged
        assert after[number] == record, number
    assert all(t.is_dir() for t in spec.experiment_dir.glob("trial_*"))
    ranked = outcome.ranking
    assert ranked is not None and set(ranked["trial_id"]) <= set(ids)


def test_driver_sigkilled_mid_sweep_resumes_exactly_once(ray_session, tiny_spec, tmp_path, caplog):
    spec, rc, finished, out = _kill_driver_mid_sweep(
        ray_session, tiny_spec, tmp_path, "kill", signal.SIGKILL
    )
    assert rc == -signal.SIGKILL, out[-3000:]
    caplog.set_level("INFO", logger="dcmtune")
    outcome = sweep.run_sweep(spec, resume=True, verbose=0)
    _check_exactly_once(spec, finished, outcome)
    windows = [
        r.getMessage()
        for r in caplog.records
        if "after the last" in r.getMessage() or "snapshot" in r.getMessage()
    ]
    print("post-snapshot windows hit:", windows)


def test_driver_sigtermed_mid_sweep_stops_gracefully_and_resumes(ray_session, tiny_spec, tmp_path):
    spec, rc, finished, out = _kill_driver_mid_sweep(
        ray_session, tiny_spec, tmp_path, "term", signal.SIGTERM
    )
    assert rc == 130, out[-3000:]  # Tune's graceful stop, not a kill
    assert "--resume" in out
    outcome = sweep.run_sweep(spec, resume=True, verbose=0)
    _check_exactly_once(spec, finished, outcome)


# --------------------------------------------------------------------------- guards


def test_a_second_driver_on_the_same_experiment_is_refused(
    tiny_spec, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("dcmtune.sweep.driver.detect_local_gpus", lambda *a, **k: 0)
    spec = load_spec(tiny_spec("lock", tmp_path))
    exp = spec.experiment_dir
    exp.mkdir(parents=True)
    (exp / "tuner.pkl").write_bytes(b"")
    (exp / "sweep_spec.json").write_text(json.dumps(spec.to_dict()))
    with driver_lock(exp):
        rc = sweep.main([str(spec.path), "--resume"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"another driver (pid {os.getpid()}) is running this experiment" in err


def test_a_restore_that_fails_inside_tune_is_refused(caplog):
    """Tune logs "Failed to restore the run state." and would start a new experiment: the
    guard turns that into an error before any new trial starts."""
    import logging

    guard = driver._RefuseSilentRestart()
    logger = logging.getLogger("ray.tune.execution.tune_controller")
    logger.addHandler(guard)
    try:
        with pytest.raises(driver._RestoreFailed, match="corrupt experiment state"):
            try:
                raise ValueError("corrupt experiment state")
            except ValueError:
                logger.exception("Failed to restore the run state.")
    finally:
        logger.removeHandler(guard)


def test_dashboard_listens_on_loopback_by_default_and_auth_stays_on():
    args = sweep.build_parser().parse_args(["quick", "--dashboard"])
    assert args.dashboard_host in ("127.0.0.1", "localhost", "::1")
    import inspect

    assert inspect.signature(driver._run_sweep).parameters["dashboard_host"].default == "127.0.0.1"
    # No dcmtune module turns Ray's token authentication off (reading it is fine).
    for path in (REPO / "dcmtune").glob("*.py"):
        text = path.read_text()
        for bad in (
            'RAY_AUTH_MODE"] =',
            "RAY_AUTH_MODE=disabled",
            'setdefault("RAY_AUTH_MODE"',
            '"RAY_AUTH_MODE": "disabled"',
        ):
            assert bad not in text, (path.name, bad)


def test_files_without_mol_id_warn_and_the_split_says_so(tmp_path, caplog):
    from dcmtune.config import DataConfig
    from dcmtune.data import split_record
    from dcmtune.data.synthetic import make_synthetic

    d = make_synthetic(num_molecules=4, conformers=2, max_atoms=5, num_grid=16, seed=2)
    path = tmp_path / "noid.npz"
    np.savez(path, R=d.R, Z=d.Z, N=d.N, esp=d.esp, vdw_surface=d.grid)
    with caplog.at_level("WARNING", logger="dcmtune.data"):
        data = load_dataset([path])
    assert any("no mol_id" in r.getMessage() for r in caplog.records)
    cfg = DataConfig(split_by="molecule", valid_fraction=0.25, test_fraction=0.25)
    rec = split_record(data, split_dataset(data, cfg), split_by="molecule", data_files=[str(path)])
    assert rec["mol_id_source"] == "graph" and rec["guarantee"].startswith("molecules")
    assert "bond graph" in rec["guarantee"]
    rec = split_record(
        data,
        split_dataset(data, DataConfig(split_by="conformer")),
        split_by="conformer",
        data_files=[str(path)],
    )
    assert rec["guarantee"].startswith("conformers")
    with_ids = load_dataset([_with_ids(d, tmp_path)])
    rec = split_record(
        with_ids,
        split_dataset(with_ids, cfg),
        split_by="molecule",
        data_files=[str(tmp_path / "ids.npz")],
    )
    assert rec["mol_id_source"] == "file" and rec["guarantee"].startswith("molecules")


def _with_ids(d, tmp_path):
    path = tmp_path / "ids.npz"
    np.savez(path, R=d.R, Z=d.Z, N=d.N, esp=d.esp, vdw_surface=d.grid, mol_id=d.mol_id)
    return path
