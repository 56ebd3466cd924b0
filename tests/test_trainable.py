"""The trainable's resource logic on CPU: resource dicts in, Ray resources and XLA env out."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from dcmtune.sweep import trainable
from dcmtune.sweep.resources import (
    TrialResources,
    check_trial_backend,
    detect_local_gpus,
    resolve_resources,
    trial_env_vars,
)
from dcmtune.sweep.sections import ResourceSpec
from dcmtune.sweep.spec import SpecError
from dcmtune.sweep.trainable import TrialSettings

GPU_NODE = {"CPU": 16.0, "GPU": 2.0, "memory": 6.4e10}
CPU_NODE = {"CPU": 2.0, "memory": 8e9}


# --------------------------------------------------------------------------- resources


def test_auto_takes_the_gpu_share_where_there_are_gpus():
    r = resolve_resources(ResourceSpec(cpu=2, gpu="auto", gpu_share=0.25), GPU_NODE)
    assert r == TrialResources(cpu=2.0, gpu=0.25)
    assert r.as_tune() == {"cpu": 2.0, "gpu": 0.25}


def test_auto_makes_cpu_trials_without_gpus():
    r = resolve_resources(ResourceSpec(cpu=1, gpu="auto", gpu_share=0.5), CPU_NODE)
    assert r == TrialResources(cpu=1.0, gpu=0.0)


def test_explicit_gpu_share_and_one_whole_gpu():
    assert resolve_resources(ResourceSpec(1, 0.5), GPU_NODE).gpu == 0.5
    assert resolve_resources(ResourceSpec(1, 1.0), GPU_NODE).gpu == 1.0
    assert resolve_resources(ResourceSpec(1, 0.0), GPU_NODE).gpu == 0.0  # CPU trials on purpose


@pytest.mark.parametrize(
    "raw, key",
    [({"gpu": 2}, "gpu: 2 GPUs per trial"), ({"gpu_share": 2}, "gpu_share: expected a fraction")],
)
def test_more_than_one_gpu_per_trial_is_refused_while_the_trainer_uses_one(raw, key):
    with pytest.raises(SpecError, match=rf"^run\.resources\.{key}") as err:
        ResourceSpec.from_dict(raw)
    assert "\n" not in str(err.value) and "one device" in str(err.value)


def test_a_gpu_trial_whose_jax_fell_back_to_the_cpu_stops(monkeypatch):
    with pytest.raises(
        SpecError,
        match=r"^run\.resources\.gpu: the trial asked for 0\.25 GPU "
        r"but JAX fell back to the CPU",
    ) as err:
        trainable.train_trial({}, data={}, settings=TrialSettings(base={}, gpu=0.25))
    assert "\n" not in str(err.value)
    check_trial_backend(0.25, "gpu")  # on a GPU it trains
    check_trial_backend(0.0, "cpu")  # a CPU trial on the CPU


def test_explicit_gpu_on_a_cluster_without_gpus_is_refused():
    with pytest.raises(
        SpecError,
        match=r"^run\.resources\.gpu: 0\.5 GPU per trial requested, "
        r"but the cluster has no GPUs",
    ):
        resolve_resources(ResourceSpec(1, 0.5), CPU_NODE)


def test_more_than_the_cluster_has_is_refused():
    half = {"CPU": 2.0, "GPU": 0.5}  # a node offering half a GPU
    with pytest.raises(
        SpecError,
        match=r"^run\.resources\.gpu: 1 GPUs per trial requested, but the cluster has 0\.5",
    ):
        resolve_resources(ResourceSpec(1, 1.0), half)
    with pytest.raises(SpecError, match=r"^run\.resources\.gpu_share: 1 GPUs"):
        resolve_resources(ResourceSpec(1, "auto", 1.0), half)
    with pytest.raises(
        SpecError,
        match=r"^run\.resources\.cpu: 4 CPUs per trial requested, "
        r"but the cluster has 2",
    ):
        resolve_resources(ResourceSpec(4, "auto"), CPU_NODE)


# --------------------------------------------------------------------------- environment


@pytest.mark.parametrize("gpu, fraction", [(0.25, "0.225"), (0.5, "0.450"), (1.0, "0.900")])
def test_gpu_trial_env(gpu, fraction, tmp_path):
    env = trial_env_vars(TrialResources(cpu=2, gpu=gpu), tmp_path / "cache")
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert env["XLA_CLIENT_MEM_FRACTION"] == fraction  # 0.9 x the share of one GPU
    # jaxlib 0.10: the deprecated name next to the new one is an error; blank = unset.
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == ""
    assert "JAX_PLATFORMS" not in env  # JAX uses the GPU(s) Ray assigned
    assert "CUDA_VISIBLE_DEVICES" not in env  # Ray sets it per trial
    assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "cache")
    assert env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0"
    assert all(isinstance(v, str) for v in env.values())  # runtime_env needs strings


def test_cpu_trial_env(tmp_path):
    env = trial_env_vars(TrialResources(cpu=1, gpu=0), tmp_path)
    assert env["JAX_PLATFORMS"] == "cpu"
    assert not any(k.startswith(("XLA_PYTHON_CLIENT", "XLA_CLIENT")) for k in env)
    assert "CUDA_VISIBLE_DEVICES" not in env
    assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path)


def test_packed_trials_fit_on_one_gpu():
    """Four trials of a quarter GPU together ask XLA for at most 90% of the device."""
    env = trial_env_vars(TrialResources(cpu=1, gpu=0.25), "/c")
    assert 4 * float(env["XLA_CLIENT_MEM_FRACTION"]) <= 0.9 + 1e-9


def test_detect_local_gpus_follows_ray_rules():
    def none(name):  # no nvidia-smi
        return None

    assert detect_local_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}, which=none) == 2
    assert detect_local_gpus({"CUDA_VISIBLE_DEVICES": ""}, which=none) == 0
    assert detect_local_gpus({"CUDA_VISIBLE_DEVICES": "-1"}, which=none) == 0
    assert detect_local_gpus({}, which=none) == 0

    def smi(args, **kw):
        lines = "\n".join(f"GPU {i}: NVIDIA A100 (UUID: GPU-{i})" for i in range(4))
        return types.SimpleNamespace(returncode=0, stdout=lines + "\n")

    assert detect_local_gpus({}, which=lambda n: "/usr/bin/nvidia-smi", run=smi) == 4

    def failing(args, **kw):
        return types.SimpleNamespace(returncode=9, stdout="")

    assert detect_local_gpus({}, which=lambda n: "/x", run=failing) == 0


def test_apply_env_sets_the_process_environment(monkeypatch):
    env = trial_env_vars(TrialResources(cpu=1, gpu=0.5), "/tmp/c")
    for k in env:
        monkeypatch.setenv(k, "before")  # restored after the test; an inherited old name too
    trainable._apply_env(env)
    import os

    assert os.environ["XLA_CLIENT_MEM_FRACTION"] == "0.450"
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == ""  # no clash in jaxlib


def test_apply_defaults_keeps_a_memory_fraction_the_user_set():
    from dcmtune.train.environment import apply_defaults, gpu_memory_env

    for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        environ = {name: "0.3"}
        apply_defaults(gpu_memory_env(0.5), environ)
        assert environ == {name: "0.3", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


def test_the_streaming_threshold_follows_the_device_memory_share(monkeypatch):
    import jax

    from dcmtune.train import feed

    gpu = types.SimpleNamespace(memory_stats=lambda: {"bytes_limit": int(0.225 * 2**34)})
    monkeypatch.setattr(jax, "devices", lambda *a: [gpu])  # a quarter of a 16-GiB GPU
    assert feed.device_memory_bytes() == int(0.225 * 2**34)
    assert feed.data_budget_mb(None) == pytest.approx(0.5 * 0.225 * 2**14, rel=1e-6)
    assert feed.data_budget_mb(5.0) == 5.0  # data.device_data_budget_mb when set
    cpu = types.SimpleNamespace(memory_stats=lambda: None)
    monkeypatch.setattr(jax, "devices", lambda *a: [cpu])
    assert feed.device_memory_bytes() is None and feed.data_budget_mb(None) == 1024.0


# --------------------------------------------------------------------------- reporter


class _FakeTune:
    """Stands in for ray.tune inside the reporter: records report() calls."""

    def __init__(self):
        self.reports = []
        self.Checkpoint = types.SimpleNamespace(from_directory=lambda d: ("ckpt", str(d)))

    def report(self, metrics, checkpoint=None):
        self.reports.append((metrics, checkpoint))


def test_reporter_checkpoints_on_improvement_every_n_and_at_the_end(monkeypatch, tmp_path):
    fake = _FakeTune()
    monkeypatch.setattr(trainable, "tune", fake)
    settings = TrialSettings(base={}, metric="valid_esp_rmse", mode="min", checkpoint_every=3)
    rep = trainable._TuneReporter(settings, num_epochs=7)
    values = [5.0, 4.0, 4.5, 4.2, 3.0, 3.5, 3.6]
    for epoch, v in enumerate(values, start=1):
        rep(epoch, {"epoch": epoch, "valid_esp_rmse": v, "diverged": 0}, tmp_path / "latest")
    with_ckpt = [m["epoch"] for m, c in fake.reports if c is not None]
    # improvements 1, 2, 5; every 3rd epoch 3, 6; the last epoch 7.
    assert with_ckpt == [1, 2, 3, 5, 6, 7]
    assert [m["fit_status"] for m, _ in fake.reports] == ["running"] * 6 + ["completed"]
    assert all(c == ("ckpt", str(tmp_path / "latest")) for _, c in fake.reports if c)


def test_reporter_resumed_knows_the_best_so_far(monkeypatch, tmp_path):
    fake = _FakeTune()
    monkeypatch.setattr(trainable, "tune", fake)
    settings = TrialSettings(base={}, metric="valid_esp_rmse", mode="min", checkpoint_every=0)
    best = trainable._best_so_far(
        [{"valid_esp_rmse": 3.0}, {"valid_esp_rmse": float("nan")}, {"valid_esp_rmse": 2.5}],
        settings,
    )
    assert best == 2.5
    rep = trainable._TuneReporter(settings, num_epochs=10, best=best)
    rep(4, {"epoch": 4, "valid_esp_rmse": 2.7, "diverged": 0}, tmp_path)  # not better
    rep(5, {"epoch": 5, "valid_esp_rmse": 2.4, "diverged": 0}, tmp_path)  # better
    assert [c is not None for _, c in fake.reports] == [False, True]


def test_reporter_diverged_epoch_reports_status_without_checkpoint(monkeypatch, tmp_path):
    fake = _FakeTune()
    monkeypatch.setattr(trainable, "tune", fake)
    rep = trainable._TuneReporter(TrialSettings(base={}), num_epochs=5)
    rep(2, {"epoch": 2, "valid_esp_rmse": float("nan"), "diverged": 1}, None)
    ((metrics, ckpt),) = fake.reports
    assert metrics["fit_status"] == "diverged" and ckpt is None


def test_reporter_acknowledges_only_reports_that_returned(monkeypatch, tmp_path):
    fake = _FakeTune()
    monkeypatch.setattr(trainable, "tune", fake)

    def ack(epoch):
        trainable._io.write_json(tmp_path / trainable.ACK_FILE, {"epoch": epoch})

    rep = trainable._TuneReporter(TrialSettings(base={}), num_epochs=5, acknowledge=ack)
    assert trainable._acknowledged_epoch(tmp_path) == 0
    for epoch in (1, 2):
        rep(epoch, {"epoch": epoch, "valid_esp_rmse": 1.0, "diverged": 0}, None)
    assert trainable._acknowledged_epoch(tmp_path) == 2

    def dies(metrics, checkpoint=None):
        raise RuntimeError("the trial was stopped inside tune.report")

    monkeypatch.setattr(fake, "report", dies)
    with pytest.raises(RuntimeError):
        rep(3, {"epoch": 3, "valid_esp_rmse": 0.5, "diverged": 0}, None)
    assert trainable._acknowledged_epoch(tmp_path) == 2  # epoch 3 may not have reached Tune


def test_resume_replays_the_epochs_tune_may_not_have(monkeypatch, tmp_path):
    fake = _FakeTune()
    monkeypatch.setattr(trainable, "tune", fake)
    settings = TrialSettings(base={}, metric="valid_esp_rmse", mode="min", checkpoint_every=0)
    history = [{"epoch": e, "valid_esp_rmse": 6.0 - e, "diverged": 0} for e in range(1, 6)]
    known = 3  # Tune's checkpoint or the last acknowledged report
    rep = trainable._TuneReporter(
        settings, num_epochs=10, best=trainable._best_so_far(history[:known], settings)
    )
    trainable._replay(rep, history, known, 5, tmp_path / "latest")
    assert [m["epoch"] for m, _ in fake.reports] == [4, 5]
    # Only the resumed epoch has a checkpoint (it is that epoch's state).
    assert [c for _, c in fake.reports] == [None, ("ckpt", str(tmp_path / "latest"))]
    assert [m["fit_status"] for m, _ in fake.reports] == ["running", "running"]
    fake.reports.clear()
    trainable._replay(rep, history, 5, 5, tmp_path / "latest")  # Tune has them all
    assert fake.reports == []


def test_stale_checkpoints_of_a_failed_attempt_are_set_aside(tmp_path):
    (tmp_path / "checkpoints" / "latest").mkdir(parents=True)
    trainable._set_aside_stale_checkpoints(tmp_path)
    assert not (tmp_path / "checkpoints").exists()
    assert len(list(tmp_path.glob("checkpoints.attempt-*"))) == 1


# --------------------------------------------------------------------------- driver side


def test_driver_prep_starts_no_jax_backend(tmp_path):
    """Spec, data, param space, searcher and trainable are built on the driver with numpy
    only: JAX is not even imported (and Ray is not started)."""
    import numpy as np
    import yaml

    from dcmtune.data.synthetic import make_synthetic

    d = make_synthetic(num_molecules=6, conformers=2, max_atoms=5, num_grid=24, seed=1)
    np.savez(
        tmp_path / "syn.npz",
        R=d.R,
        Z=d.Z,
        N=d.N,
        esp=d.esp,
        vdw_surface=d.grid,
        n_grid=d.n_grid,
        mono=d.mono,
        mol_id=d.mol_id,
    )
    path = tmp_path / "spec.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "data": {"data_files": ["syn.npz"], "num_valid": 2, "num_test": 2},
                "model": {"features": 4, "max_degree": 1},
                "training": {"num_epochs": 4, "batch_size": 2, "warmup_epochs": 0},
                "search": {
                    "training.learning_rate": {"loguniform": [1e-4, 1e-2]},
                    "model.n_dcm": {"randint": [1, 2]},
                },
            }
        )
    )
    code = f"""
import json, sys
from dcmtune.sweep.spec import load_spec
from dcmtune.sweep.driver import prepare
from dcmtune.sweep.trainable import TrialSettings, make_trainable
from dcmtune.sweep.resources import TrialResources, trial_env_vars
from dcmtune.sweep.tune_ext import PruningAwareOptunaSearch
spec = load_spec({str(path)!r})
prep = prepare(spec)
space = spec.param_space()
res = TrialResources(1, 0)
settings = TrialSettings(base=spec.base.to_dict(), env=trial_env_vars(res, "/tmp/c"))
t = make_trainable(prep.data, settings, res)
s = PruningAwareOptunaSearch(metric="valid_esp_rmse", mode="min", max_t=4)
backends = False
if "jax" in sys.modules:
    from jax._src import xla_bridge
    backends = xla_bridge.backends_are_initialized()
import ray
print(json.dumps({{"jax_imported": "jax" in sys.modules, "backends": backends,
                  "ray_started": ray.is_initialized(),
                  "trainer": any(m in sys.modules for m in ("dcmtune.train.loop",
                                                             "dcmtune.train.step")),
                  "flax": "flax" in sys.modules}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.returncode == 0, out.stderr
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state["jax_imported"] is False  # numpy only on the driver
    assert state["backends"] is False  # so certainly no JAX backend (CPU or GPU)
    assert state["ray_started"] is False
    assert state["trainer"] is False and state["flax"] is False  # the trainer stays in trials


# --------------------------------------------------------------------------- Tune extensions


def _searcher(max_t=4):
    from ray import tune

    from dcmtune.sweep.tune_ext import PruningAwareOptunaSearch

    s = PruningAwareOptunaSearch(metric="valid_esp_rmse", mode="min", max_t=max_t, seed=0)
    s.set_search_properties("valid_esp_rmse", "min", {"lr": tune.loguniform(1e-4, 1e-2)})
    return s


def _feed(s, tid, values, stop_result=None, **complete):
    s.suggest(tid)
    for epoch, v in enumerate(values, start=1):
        s.on_trial_result(tid, {"valid_esp_rmse": v, "epoch": epoch, "training_iteration": epoch})
    last = stop_result or {"valid_esp_rmse": values[-1], "epoch": len(values), "diverged": 0}
    s.on_trial_complete(tid, last, **complete)


def test_searcher_tells_optuna_the_truth():
    import optuna

    s = _searcher(max_t=4)
    _feed(s, "full", [5.0, 3.0, 3.5, 4.0])  # ran all 4 epochs; best epoch 2
    # ASHA stopped it: the STOP result (epoch 2) never reaches on_trial_result.
    s.suggest("stopped")
    s.on_trial_result("stopped", {"valid_esp_rmse": 9.0, "epoch": 1})
    s.on_trial_complete("stopped", {"valid_esp_rmse": 8.0, "epoch": 2, "diverged": 0})
    _feed(
        s,
        "diverged",
        [6.0],
        stop_result={"valid_esp_rmse": float("nan"), "epoch": 2, "diverged": 1},
    )
    _feed(s, "crashed", [7.0], error=True)
    by_id = {
        tid: s._ot_study.trials[i]
        for i, tid in enumerate(["full", "stopped", "diverged", "crashed"])
    }
    full = by_id["full"]
    assert full.state == optuna.trial.TrialState.COMPLETE and full.value == 3.0  # best epoch
    assert full.intermediate_values == {1: 5.0, 2: 3.0, 3: 3.5, 4: 4.0}
    stopped = by_id["stopped"]
    assert stopped.state == optuna.trial.TrialState.PRUNED
    assert stopped.intermediate_values == {1: 9.0, 2: 8.0} and stopped.value == 8.0
    diverged = by_id["diverged"]
    assert diverged.state == optuna.trial.TrialState.FAIL  # never a good-but-unfinished point
    assert diverged.intermediate_values == {1: 6.0}  # the NaN epoch is not reported
    assert by_id["crashed"].state == optuna.trial.TrialState.FAIL


def test_searcher_ignores_replayed_epochs_and_late_results():
    s = _searcher(max_t=2)
    s.suggest("t")
    s.on_trial_result("t", {"valid_esp_rmse": 2.0, "epoch": 1})
    s.on_trial_result("t", {"valid_esp_rmse": 2.5, "epoch": 1})  # replayed after a resume
    s.on_trial_complete("t", {"valid_esp_rmse": 1.0, "epoch": 2, "diverged": 0})
    s.on_trial_result("t", {"valid_esp_rmse": 0.5, "epoch": 3})  # after completion: ignored
    t = s._ot_study.trials[0]
    assert t.intermediate_values == {1: 2.0, 2: 1.0} and t.value == 1.0


def test_asha_state_round_trip():
    from ray.tune.schedulers import ASHAScheduler

    from dcmtune.sweep.tune_ext import AshaStateCallback

    a = ASHAScheduler(time_attr="epoch", max_t=9, grace_period=1, reduction_factor=3)
    for milestone, recorded in a._brackets[0]._rungs:
        recorded.update({f"t{int(milestone)}": -float(milestone)})
    state = AshaStateCallback(a).get_state()
    b = ASHAScheduler(time_attr="epoch", max_t=9, grace_period=1, reduction_factor=3)
    AshaStateCallback(b).set_state(state)
    assert [r for _, r in b._brackets[0]._rungs] == [r for _, r in a._brackets[0]._rungs]
    assert [r for _, r in b._brackets[0]._rungs] == [{"t9": -9.0}, {"t3": -3.0}, {"t1": -1.0}]


# --------------------------------------------------------------------------- Ray connection


def test_connect_starts_local_ray_with_the_env_and_dashboard_hint(monkeypatch):
    import ray

    from dcmtune.sweep import driver as sweep

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(
        ray,
        "init",
        lambda **kw: calls.append(kw) or types.SimpleNamespace(dashboard_url="127.0.0.1:8265"),
    )
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    lines = []
    assert sweep._connect(None, False, "127.0.0.1", {"JAX_PLATFORMS": "cpu"}, lines.append)
    assert calls[-1]["include_dashboard"] is False
    assert calls[-1]["runtime_env"] == {"env_vars": {"JAX_PLATFORMS": "cpu"}}
    assert lines == []
    sweep._connect(None, True, "127.0.0.1", {}, lines.append)
    assert calls[-1]["include_dashboard"] is True and calls[-1]["dashboard_host"] == "127.0.0.1"
    assert lines[0] == "Ray dashboard: http://127.0.0.1:8265"
    assert "ray get-auth-token" in lines[1]
    sweep._connect("ray://head:10001", False, "127.0.0.1", None, lines.append)
    assert calls[-1]["address"] == "ray://head:10001" and "runtime_env" not in calls[-1]
