"""The ecosystem around a run: one TensorBoard stream per run or trial, MLflow and W&B tracking,
the Optuna study as a journal file and its parameter importances, a local Ray on loopback, clear
errors for missing extras, and specs shipped inside the wheel."""

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dcmtune import metrics
from dcmtune.analysis.importances import param_importances
from dcmtune.sweep import commands as sweep
from dcmtune.sweep import driver, study
from dcmtune.sweep.spec import SpecError, spec_from_dict
from dcmtune.train.commands import main as train_main

REPO = Path(__file__).resolve().parent.parent
# Every epoch's curves: each trained metric on both splits, the learning rate, the timings.
CURVES = {f"{split}_{name}" for split in ("train", "valid") for name in metrics.TRAINED} | {
    "lr",
    "epoch_time",
    "batch_time",
    "step",
    "best_valid_loss",
}
TINY_TRAIN = [
    "--n-dcm",
    "1",
    "--features",
    "4",
    "--max-degree",
    "1",
    "--num-iterations",
    "1",
    "--num-basis-functions",
    "4",
    "--batch-size",
    "4",
    "--warmup-epochs",
    "0",
    "--num-valid",
    "6",
    "--num-test",
    "6",
    "--save-every-n-epochs",
    "0",
]


# --------------------------------------------------------------------------- readers


def _event_files(run_dir: Path) -> list[Path]:
    return sorted(Path(run_dir).glob("events.out.tfevents.*"))


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of the event files directly in run_dir (TensorBoard's reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def _wandb_history(directory: Path, run_id: str = "*") -> list[dict]:
    """The logged rows of the one offline W&B run (id `run_id`) under directory/wandb/: the
    .wandb file is a LevelDB-style log of protobuf records after a 7-byte header (W&B has no
    Python reader)."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = list(Path(directory).glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1, files
    buf = files[0].read_bytes()
    assert buf[:4] == b":W&B"
    pos, block, rows, pending = 7, 32768, [], b""
    while pos + 7 <= len(buf):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", buf[pos + 4 : pos + 7])
        if kind == 0 and length == 0:
            break
        pending += buf[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            rec = pb.Record()
            rec.ParseFromString(pending)
            pending = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        i.key or "/".join(i.nested_key): json.loads(i.value_json)
                        for i in rec.history.item
                    }
                )
    return rows


def _mlflow_runs(uri: str, experiment: str) -> dict:
    """{run name: {metric: [(step, value)]}} of an MLflow experiment."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, experiment
    out = {}
    for run in client.search_runs([exp.experiment_id]):
        out[run.info.run_name] = {
            k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
            for k in run.data.metrics
        }
    return out


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    """One sqlite MLflow store for the session (creating its tables takes ~10 s)."""
    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    mlflow.MlflowClient(tracking_uri=uri).search_experiments()
    return uri


# --------------------------------------------------------------------------- train CLI, debug


def test_train_cli_writes_one_event_stream_and_tracks_every_epoch(
    tiny_data_file, tmp_path, mlflow_uri, capsys
):
    tracking = tmp_path / "tracking.yaml"
    tracking.write_text(
        yaml.safe_dump(
            {
                "tracking": {
                    "mlflow": {"tracking_uri": mlflow_uri, "experiment_name": "train-cli"},
                    "wandb": {"project": "dcmtune-test", "mode": "offline"},
                }
            }
        )
    )
    rc = train_main(
        TINY_TRAIN
        + [
            "--data-files",
            str(tiny_data_file),
            "--output-dir",
            str(tmp_path),
            "--name",
            "run",
            "--num-epochs",
            "2",
            "--quiet",
            "--tracking",
            str(tracking),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    run_dir = tmp_path / "run"
    history = pd.read_csv(run_dir / "history.csv")
    assert len(_event_files(run_dir)) == 1  # one stream
    scalars = _scalars(run_dir)
    assert CURVES <= set(scalars), CURVES - set(scalars)
    for tag in CURVES:
        assert [s for s, _ in scalars[tag]] == [1, 2], tag
        np.testing.assert_allclose([v for _, v in scalars[tag]], history[tag], rtol=1e-5)
    # MLflow: one run, every epoch of every metric, the config as parameters.
    ((name, logged),) = _mlflow_runs(mlflow_uri, "train-cli").items()
    assert name == "run"
    for tag in CURVES:
        assert [s for s, _ in logged[tag]] == [1, 2], tag
        np.testing.assert_allclose([v for _, v in logged[tag]], history[tag], rtol=1e-6)
    # W&B offline: one row per epoch holding every metric.
    rows = [r for r in _wandb_history(run_dir) if "valid_esp_rmse" in r]
    assert [r["_step"] for r in rows] == [1, 2]
    assert all(CURVES <= set(r) for r in rows)
    np.testing.assert_allclose([r["valid_esp_rmse"] for r in rows], history["valid_esp_rmse"])


def test_train_cli_refuses_a_bad_tracking_file_before_writing(tiny_data_file, tmp_path, capsys):
    bad = tmp_path / "t.yaml"
    bad.write_text("tracking:\n  wandb: {project: p, mode: sometimes}\n")
    args = TINY_TRAIN + [
        "--data-files",
        str(tiny_data_file),
        "--output-dir",
        str(tmp_path),
        "--name",
        "bad",
        "--quiet",
        "--tracking",
        str(bad),
    ]
    assert train_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: tracking.wandb.mode: expected online or offline or disabled, got 'sometimes'"
    )
    assert not (tmp_path / "bad").exists()


def test_debug_writes_one_event_stream(tiny_spec, tmp_path, capsys):
    path = tiny_spec("dbg", tmp_path, edit=lambda raw: raw.update(debug={"training.num_epochs": 2}))
    assert sweep.main([str(path), "--debug"]) == 0
    (run_dir,) = (tmp_path / "results" / "dbg-debug").iterdir()
    assert len(_event_files(run_dir)) == 1
    scalars = _scalars(run_dir)
    assert CURVES <= set(scalars)
    assert [s for s, _ in scalars["valid_esp_rmse"]] == [1, 2]


# --------------------------------------------------------------------------- sweeps


@pytest.mark.ray
def test_every_trial_writes_one_event_stream(tiny_sweep):
    for r in tiny_sweep.outcome.results:
        trial_dir = Path(r.path)
        assert len(_event_files(trial_dir)) == 1, trial_dir  # not Tune's as well
        scalars = _scalars(trial_dir)
        assert CURVES <= set(scalars), CURVES - set(scalars)
        epochs = r.metrics_dataframe["epoch"].tolist()
        assert [s for s, _ in scalars["valid_esp_rmse"]][: len(epochs)] == epochs
        np.testing.assert_allclose(
            [v for _, v in scalars["lr"]][: len(epochs)], r.metrics_dataframe["lr"], rtol=1e-6
        )


@pytest.mark.ray
def test_report_has_parameter_importances(tiny_sweep):
    spec = tiny_sweep.spec
    exp = spec.experiment_dir
    # The fixture's relative sqlite study file lands in the experiment directory.
    assert spec.study_storage == f"sqlite:///{exp.resolve() / 'study.db'}"
    ranking = json.loads((exp / "ranking.json").read_text())
    imp = ranking["importances"]
    assert set(imp) == set(spec.search) and sum(imp.values()) == pytest.approx(1.0)
    text = (exp / "report.md").read_text()
    assert "## Parameter importances" in text and "| hyper-parameter | importance |" in text
    assert "![Importance of each searched hyper-parameter](param_importances.png)" in text
    assert (exp / "param_importances.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_importance_finds_the_one_parameter_that_matters():
    rng = np.random.default_rng(0)
    search = {
        "training.learning_rate": {"loguniform": [1e-4, 1e-1]},
        "training.chg_w": {"uniform": [0.0, 2.0]},
        "model.features": {"choice": [8, 16, 32]},
        "model.num_iterations": {"randint": [1, 3]},
    }
    points = [
        {
            "training.learning_rate": float(10 ** rng.uniform(-4, -1)),
            "training.chg_w": float(rng.uniform(0, 2)),
            "model.features": int(rng.choice([8, 16, 32])),
            "model.num_iterations": int(rng.integers(1, 4)),
        }
        for _ in range(40)
    ]
    values = [(np.log10(p["training.learning_rate"]) + 2.5) ** 2 for p in points]
    imp = param_importances(points, values, search)
    assert list(imp)[0] == "training.learning_rate"
    assert imp["training.learning_rate"] >= 0.8, imp
    assert param_importances(points[:2], values[:2], search) == {}  # too few trials


def _listening(pid: int) -> set:
    """(ip, port, process name) of every listening inet socket of pid and its descendants."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return set()
    out = set()
    for p in procs:
        try:
            out |= {
                (c.laddr.ip, c.laddr.port, p.name())
                for c in p.net_connections("inet")
                if c.status == psutil.CONN_LISTEN
            }
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


@pytest.mark.ray
def test_local_sweep_on_loopback_with_mlflow_and_wandb(tiny_spec, tmp_path, mlflow_uri):
    """`python -m dcmtune.sweep SPEC` as a user runs it: local Ray listening on 127.0.0.1 only,
    the default Optuna journal in the experiment, one MLflow and one W&B run per trial with
    every epoch, one event stream per trial."""

    def edit(raw):
        raw["scheduler"] = {"name": "fifo"}
        raw["training"]["num_epochs"] = 2
        raw["tracking"] = {
            "mlflow": {"tracking_uri": mlflow_uri, "experiment_name": "loop"},
            "wandb": {"project": "dcmtune-test", "mode": "offline"},
        }

    path = tiny_spec("loop", tmp_path, edit=edit, num_samples=2)
    ray_tmp = tempfile.mkdtemp(prefix="r")  # AF_UNIX paths must stay short
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    }
    env.update(
        RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcmtune.sweep", str(path), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    seen, t0 = set(), time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - t0 < 600:
            seen |= _listening(proc.pid)
            time.sleep(0.5)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, err[-3000:]
    names = {name for _, _, name in seen}
    assert {"gcs_server", "raylet"} <= names, seen  # the poll saw Ray's servers
    exposed = {s for s in seen if s[0] in ("0.0.0.0", "::")}
    assert not exposed, exposed
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip, _, _ in seen), seen

    exp = tmp_path / "results" / "loop"
    assert "watch: tensorboard --logdir " + str(exp) in out
    assert f"optuna-dashboard {exp / 'optuna.log'}" in out
    import optuna

    trials = optuna.load_study(
        study_name="loop", storage=study.open_storage(str(exp / "optuna.log"))
    ).trials
    assert len(trials) == 2 and all(t.state.name == "COMPLETE" for t in trials)
    runs = _mlflow_runs(mlflow_uri, "loop")
    trial_dirs = sorted(exp.glob("trial_*"))
    assert len(runs) == len(trial_dirs) == 2
    for trial_dir in trial_dirs:
        history = pd.read_csv(trial_dir / "history.csv")
        assert len(_event_files(trial_dir)) == 1
        logged = next(m for name, m in runs.items() if trial_dir.name[len("trial_") :] in name)
        for tag in CURVES:
            np.testing.assert_allclose([v for _, v in logged[tag]], history[tag], rtol=1e-6)
        rows = [
            r for r in _wandb_history(exp, trial_dir.name[len("trial_") :]) if "valid_esp_rmse" in r
        ]
        assert [r["epoch"] for r in rows] == [1, 2]
        assert all(CURVES <= set(r) for r in rows)


# --------------------------------------------------------------------------- bad input


def test_tracking_section_is_validated(tmp_path):
    base = {"name": "x"}
    cases = [
        (
            {"tracking": {"neptune": {}}},
            r"^tracking\.neptune: unknown key; expected one of "
            r"mlflow, wandb$",
        ),
        ({"tracking": {"mlflow": {"uri": "x"}}}, r"^tracking\.mlflow\.uri: unknown key"),
        (
            {"tracking": {"mlflow": {"experiment_name": 3}}},
            r"^tracking\.mlflow\.experiment_name: expected a non-empty string, got 3$",
        ),
        ({"tracking": {"wandb": {"mode": "offline"}}}, r"^tracking\.wandb\.project: required"),
        (
            {"tracking": {"wandb": {"project": "p", "tags": "a"}}},
            r"^tracking\.wandb\.tags: expected a list of strings",
        ),
        ({"tracking": []}, r"^tracking: expected a mapping"),
    ]
    for extra, pattern in cases:
        with pytest.raises(SpecError, match=pattern):
            spec_from_dict({**base, **extra}, base_dir=tmp_path)
    spec = spec_from_dict(
        {**base, "tracking": {"mlflow": {"tracking_uri": "sqlite:///m.db"}}}, base_dir=tmp_path
    )
    assert spec.tracking.mlflow.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'm.db'}"
    assert spec.to_dict()["tracking"]["mlflow"]["tracking_uri"].endswith("m.db")


def test_study_storage_forms_resolve_in_the_experiment(tmp_path):
    def resolved(storage):
        raw = {"name": "x", "run": {"storage_path": str(tmp_path)}}
        if storage != "absent":
            raw["searcher"] = {"storage": storage}
        return spec_from_dict(raw).study_storage

    exp = tmp_path / "x"
    assert resolved("absent") == str(exp / "optuna.log")  # the default journal file
    assert resolved(None) is None  # in memory
    assert resolved("s.log") == str(exp / "s.log")
    assert resolved("journal:///sub/s.log") == str(exp / "sub" / "s.log")
    assert resolved(f"journal:///{tmp_path}/abs.log") == str(tmp_path / "abs.log")
    assert resolved(str(tmp_path / "abs.log")) == str(tmp_path / "abs.log")
    assert resolved("sqlite:///s.db") == f"sqlite:///{exp / 's.db'}"
    assert resolved("postgresql://u@h/db") == "postgresql://u@h/db"
    for bad in ("study.db", "journal:///", "", 3):
        with pytest.raises(SpecError, match=r"^searcher\.storage: expected an Optuna storage"):
            resolved(bad)


def test_missing_dashboard_extra_is_one_line_exit_2(tiny_spec, tmp_path, monkeypatch, capsys):
    path = tiny_spec("dash", tmp_path)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")  # leave this process as it is
    monkeypatch.setitem(sys.modules, "ray.dashboard", None)  # as without ray[default]
    monkeypatch.delitem(sys.modules, "ray.dashboard.optional_deps", raising=False)
    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: pytest.fail("Ray was started"))
    assert sweep.main([str(path), "--dashboard", "--dashboard-port", "8299"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: --dashboard: needs the dashboard extra")
    assert "pip install 'dcmtune[dashboard]'" in err
    assert not (tmp_path / "results" / "dash").exists()
    assert sweep.main([str(path), "--dashboard-port", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --dashboard-port: expected a port")


def test_missing_tracking_library_is_one_line_exit_2(tiny_spec, tmp_path, monkeypatch, capsys):
    path = tiny_spec(
        "trk",
        tmp_path,
        edit=lambda raw: raw.update(tracking={"mlflow": {"tracking_uri": "sqlite:///m.db"}}),
    )
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as without the track extra
    assert sweep.main([str(path)]) == 2
    assert capsys.readouterr().err == (
        "error: tracking.mlflow: needs the mlflow package; install the track extra: "
        "pip install 'dcmtune[track]'\n"
    )


def test_dashboard_port_and_loopback_reach_ray_init(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw) or object())
    assert driver._connect(None, True, "127.0.0.1", {}, print, dashboard_port=8299)
    assert calls[0]["dashboard_port"] == 8299 and calls[0]["include_dashboard"]
    assert calls[0]["dashboard_host"] == "127.0.0.1"


# --------------------------------------------------------------------------- packaging


def test_wheel_ships_the_specs(tmp_path):
    """A wheel installed elsewhere finds `quick` from any directory (no source checkout)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "dcmtune", src / "dcmtune", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(
        REPO / "search_spaces", src / "search_spaces", ignore=shutil.ignore_patterns("__pycache__")
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        pip + ["wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(src)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("dcmtune-*.whl")
    subprocess.run(
        pip + ["install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import dcmtune.sweep.spec as s; from dcmtune.sweep.spec import load_spec; "
        "p = s.find_spec('quick'); print(p); print(s.find_spec('search_spaces/quick.yaml')); "
        "print(load_spec(p).name); print(s.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    quick, again, name, module = out.stdout.split()
    site = tmp_path / "site" / "dcmtune"
    assert quick == again == str(site / "search_spaces" / "quick.yaml")
    assert name == "quick" and module == str(site / "sweep" / "spec.py")
