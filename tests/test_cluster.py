"""Sweeps on a multi-node Ray cluster with object storage (issue 13).

A two-node cluster on loopback (a head with num_cpus=0 and one worker, each `ray start` with its
own short temp dir and ports, apart from the session's pytest Ray) and an S3-compatible server
(moto) on 127.0.0.1. The driver runs as a subprocess with --address, as a user runs it. One
sweep loses its worker mid-trial; a new worker takes the trial over from its last checkpoint in
the bucket. Then every worker is gone, its temp dir deleted, and the ranking, best_model/ and
--resume work from the bucket alone. Invalid storage URIs and unreachable endpoints exit 2 with
one line before anything starts.
"""

from __future__ import annotations

import json
import socket
import subprocess
import typing
from pathlib import Path

import pytest
import yaml
from cluster_kit import (
    PYTHON,
    CpuMeter,
    MotoServer,
    Node,
    base_env,
    exited,
    file_size,
    files_state,
    processes,
    ray_workers,
    run,
    start_node,
    stop,
    wait_for,
)

NAME = "nodeloss"
EPOCHS = 16


class Cluster(typing.NamedTuple):
    workdir: Path
    moto: MotoServer
    head: Node
    workers: list
    env: dict

    def add_worker(self) -> Node:
        node = start_node(self.workdir, f"worker{len(self.workers) + 1}", 1, self.head.address)
        self.workers.append(node)
        return node

    def run(self, *args: str, cwd: Path) -> subprocess.CompletedProcess:
        """`python -m <args>` to its end, bounded by its progress (its output, its CPU time,
        what the cluster does for it)."""
        cwd.mkdir(parents=True, exist_ok=True)
        return run(
            [PYTHON, "-m", *args],
            f"python -m {' '.join(args)}",
            cwd=cwd,
            env=self.env,
            progress=self.progress(),
        )

    def progress(self) -> typing.Callable[[], tuple]:
        """A snapshot of what a sweep on the cluster leaves behind: objects in the bucket, the
        driver's results on the head (Tune's driver artifacts), CPU time of the workers' Ray
        worker processes (the trials)."""
        cpu = CpuMeter(lambda: [p for n in self.workers for p in ray_workers(n.proc.pid)])

        def snapshot() -> tuple:
            return (
                self.moto.state(""),
                files_state(*self.head.temp_dir.glob("session_*/artifacts")),
                cpu(),
            )

        return snapshot


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    wd = tmp_path_factory.mktemp("cluster")
    moto = MotoServer(wd)
    try:
        head = start_node(wd, "head", 0)
    except BaseException:
        moto.close()
        raise
    c = Cluster(wd, moto, head, [], base_env(wd))
    try:
        yield c
    finally:
        for node in c.workers:
            node.stop()
            node.remove()
        head.stop()
        head.remove()
        moto.close()


def _spec(directory: Path, data_file: Path) -> Path:
    raw = {
        "name": NAME,
        "data": {"data_files": [str(data_file)], "num_valid": 6, "num_test": 6},
        "model": {
            "features": 8,
            "max_degree": 1,
            "num_iterations": 1,
            "n_dcm": 1,
            "num_basis_functions": 4,
        },
        "training": {"num_epochs": EPOCHS, "batch_size": 4, "warmup_epochs": 0},
        "search": {"training.learning_rate": {"loguniform": [1e-3, 3e-2]}},
        "searcher": {"seed": 0, "n_startup_trials": 2},
        "scheduler": {"name": "fifo"},
        "run": {
            "num_samples": 2,
            "max_concurrent_trials": 1,
            "checkpoint_every": 1,
            "num_to_keep": 2,
            "max_failures": 2,
            "resources": {"cpu": 1, "gpu": 0},
        },
        "rank": {"top_k": 1},
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


class Lost(typing.NamedTuple):
    spec: Path
    uri: str
    prefix: str  # the experiment's key prefix in the bucket
    driver: subprocess.CompletedProcess
    killed: Node
    replacement: Node


@pytest.fixture(scope="module")
def lost_node_sweep(cluster, tiny_data_file):
    """A sweep whose worker's raylet is killed once a trial's second checkpoint (or a later one
    before its last) reached the bucket; once the head's GCS reports that node dead, a new
    worker joins and the sweep finishes there. Every wait is bounded by the sweep's progress
    (the driver's log, the bucket, Tune's results on the head, CPU time of the trial)."""
    wd, moto = cluster.workdir, cluster.moto
    spec = _spec(wd / "spec", tiny_data_file)
    storage_uri = moto.uri("exp")
    first = cluster.add_worker()
    log = open(wd / "driver.log", "w")
    driver = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "dcmtune.sweep",
            str(spec),
            "--address",
            cluster.head.address,
            "--storage-path",
            storage_uri,
            "-q",
        ],
        cwd=wd / "spec",
        env=cluster.env,
        text=True,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    driver_cpu, cluster_progress = CpuMeter(lambda: processes(driver.pid)), cluster.progress()

    def progress():
        return file_size(wd / "driver.log"), driver_cpu(), cluster_progress()

    def running() -> bool:
        if driver.poll() is not None:
            raise AssertionError(
                f"the driver exited with {driver.returncode}: "
                + (wd / "driver.log").read_text(errors="replace")[-3000:]
            )
        return True

    try:
        wait_for(
            lambda: running() and _mid_trial(moto.files(f"exp/{NAME}")),
            "a trial's second checkpoint in the bucket",
            progress,
            every=0.1,
        )
        raylet = first.raylet()
        raylet.kill()  # the node is lost mid-trial
        wait_for(lambda: exited(raylet), "the killed raylet to exit")
        stop(first.proc, "ray start of the lost worker")
        first.wait_dead_in_gcs()
        replacement = cluster.add_worker()
        wait_for(
            lambda: driver.poll() is not None, "the sweep to finish on the new worker", progress
        )
    finally:
        stop(driver, "the driver")
        log.close()
    out = subprocess.CompletedProcess(
        driver.args, driver.returncode, (wd / "driver.log").read_text(errors="replace"), ""
    )
    return Lost(spec, moto.uri(f"exp/{NAME}"), f"exp/{NAME}", out, first, replacement)


def _mid_trial(files: list[str]) -> bool:
    """Whether a trial's newest checkpoint in the bucket is its second or a later one, but not
    its last: the trial has a checkpoint to resume from and epochs left. (Not just
    checkpoint_000001: with num_to_keep=2 it is gone two epochs later, and a slow listing
    may not see it.)"""
    newest: dict[str, int] = {}
    for f in files:
        parts = f.split("/")
        if f.endswith("/state.msgpack") and len(parts) >= 3 and parts[-2].startswith("checkpoint_"):
            trial = parts[-3]
            newest[trial] = max(newest.get(trial, -1), int(parts[-2].split("_")[1]))
    return any(1 <= n <= EPOCHS - 2 for n in newest.values())


def _trials(moto: MotoServer, prefix: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in moto.files(prefix):
        parts = f[len(prefix) + 1 :].split("/")
        if parts[0].startswith("trial_"):
            out.setdefault(parts[0], []).append("/".join(parts[1:]))
    return out


def _experiment_state(moto: MotoServer, prefix: str) -> dict[str, dict]:
    """trial_id -> Tune's runtime state of the trial (num_failures, ...) from the newest
    experiment_state-*.json in the bucket."""
    name = sorted(f for f in moto.files(prefix) if "/experiment_state-" in f)[-1]
    state = json.loads(moto.read(name))
    return {json.loads(t)["trial_id"]: json.loads(r) for t, r in state["trial_data"]}


def test_node_loss_resumes_the_trial_on_a_new_worker(cluster, lost_node_sweep):
    run, moto = lost_node_sweep, cluster.moto
    assert run.driver.returncode == 0, run.driver.stdout[-3000:]
    assert "completed: 2 trials (0 errors)" in run.driver.stdout
    # Tune recorded exactly one failure, of the trial that ran on the lost node.
    failures = {t: s["num_failures"] for t, s in _experiment_state(moto, run.prefix).items()}
    assert sorted(failures.values()) == [0, 1], failures
    lost = next(t for t, n in failures.items() if n == 1)
    # It continued from its last checkpoint: Tune's results hold epoch 1 once (a restart would
    # report it again) and end at the last epoch, in order; at most the epoch in flight when
    # the node was lost is reported twice. Tune's result.json is not the full record: on the
    # restart Tune replaces its copy with the bucket's (JsonLoggerCallback._restore_from_remote),
    # losing the lines it logged after its last upload. The trainer's history.csv is the record
    # (below: every epoch once).
    rows = [
        json.loads(line)
        for line in moto.read(f"{run.prefix}/trial_{lost}/result.json").decode().splitlines()
        if line.strip()
    ]
    epochs = [r["epoch"] for r in rows]
    assert epochs[0] == 1 and epochs.count(1) == 1 and epochs[-1] == EPOCHS, epochs
    assert epochs == sorted(epochs) and len(epochs) - len(set(epochs)) <= 1, epochs
    # Everything that must survive is in the bucket, for both trials.
    trials = _trials(moto, run.prefix)
    assert len(trials) == 2
    for trial, files in trials.items():
        assert {"config.json", "split.json", "history.csv"} <= set(files)
        states = [f for f in files if f.endswith("state.msgpack")]
        assert states and all(f.startswith("checkpoint_") for f in states)
        lines = [
            ln
            for ln in moto.read(f"{run.prefix}/{trial}/history.csv").decode().splitlines()
            if ln.strip()
        ]
        column = lines[0].split(",").index("epoch")
        assert [int(ln.split(",")[column]) for ln in lines[1:]] == list(range(1, EPOCHS + 1))


def test_ranking_best_model_and_resume_need_only_the_bucket(cluster, lost_node_sweep, tmp_path):
    run, moto = lost_node_sweep, cluster.moto
    assert run.driver.returncode == 0, run.driver.stdout[-3000:]
    # No worker is left, and their temp dirs (trial working dirs, scratch) are gone.
    for node in cluster.workers:
        node.stop()
        node.remove()
        assert not node.temp_dir.exists()
    for key in [
        f
        for f in moto.files(run.prefix)
        if f.startswith(f"{run.prefix}/best_model/")
        or f.endswith(("ranking.csv", "ranking.json", "report.md"))
    ]:
        moto.fs.delete_file(f"{moto.bucket}/{key}")

    # The ranking reads the bucket, fetches only the top-k (1) checkpoint, writes back.
    copy = tmp_path / "copy"
    out = cluster.run("dcmtune.rank", run.uri, "--local-copy", str(copy), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "winner: trial" in out.stdout
    fetched = sorted(p.relative_to(copy).as_posix() for p in copy.rglob("state.msgpack"))
    assert len([f for f in fetched if f.startswith("trial_")]) == 1, fetched
    assert (copy / "best_model" / "state.msgpack").is_file()
    in_bucket = moto.files(run.prefix)
    for name in (
        "ranking.csv",
        "ranking.json",
        "report.md",
        "best_model/state.msgpack",
        "best_model/config.json",
        "best_model/evaluation.json",
    ):
        assert f"{run.prefix}/{name}" in in_bucket, name
    evaluation = json.loads(moto.read(f"{run.prefix}/best_model/evaluation.json"))
    assert evaluation["metrics"]["test_esp_rmse"] > 0

    # --resume of the finished experiment, from another directory (a new local copy).
    out = cluster.run(
        "dcmtune.sweep",
        str(run.spec),
        "--resume",
        "--address",
        cluster.head.address,
        "--storage-path",
        moto.uri("exp"),
        "-q",
        cwd=tmp_path / "resume",
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "completed: 2 trials (0 errors)" in out.stdout
    assert "winner: trial" in out.stdout


def test_specs_keep_object_storage_uris_and_resolve_paths(tmp_path, monkeypatch):
    from dcmtune import storage
    from dcmtune.sweep.spec import spec_from_dict

    monkeypatch.chdir(tmp_path)
    uri = "s3://bucket/sweeps?endpoint_override=127.0.0.1:9000&scheme=http"
    spec = spec_from_dict({"name": "n", "run": {"storage_path": uri}}, base_dir=tmp_path)
    assert spec.remote and spec.run.storage_path == uri
    assert spec.experiment_uri == (
        "s3://bucket/sweeps/n?endpoint_override=127.0.0.1:9000&scheme=http"
    )
    # The driver's local copy, its Optuna journal and a node-local compile cache.
    assert tmp_path / "ray_results" in spec.experiment_dir.parents
    assert spec.experiment_dir.parts[-3:] == ("bucket", "sweeps", "n")
    assert spec.study_storage == str(spec.experiment_dir / "optuna.log")
    assert not spec.run.jax_cache_dir.startswith("s3:")
    loc = storage.resolve(spec.experiment_uri)
    assert loc.remote and loc.path == "bucket/sweeps/n"
    # file:// and plain paths stay POSIX experiments, read and written in place.
    spec = spec_from_dict({"name": "n", "run": {"storage_path": f"file://{tmp_path}/r"}})
    assert not spec.remote and spec.experiment_dir == tmp_path / "r" / "n"
    assert spec.run.jax_cache_dir == str(tmp_path / "r" / ".jax_cache")
    assert not storage.resolve(str(spec.experiment_dir)).remote


@pytest.fixture
def silent_endpoint():
    """A TCP port that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


def test_bad_storage_exits_2_with_one_line_before_anything_starts(
    cluster, silent_endpoint, tiny_data_file, tmp_path
):
    moto, port = cluster.moto, cluster.moto.port
    bad = {
        "foo://bucket/x": "not a storage URI",
        "s3://": "names no bucket",
        f"s3://{moto.bucket}/x?endpoint_override=127.0.0.1:{port}&bogus=1": "bogus",
        f"s3://missing-bucket/x?endpoint_override=127.0.0.1:{port}&scheme=http": "does not exist",
        f"s3://{moto.bucket}/x?endpoint_override=127.0.0.1:1&scheme=http": "cannot use",
        f"s3://{moto.bucket}/x?endpoint_override=127.0.0.1:{silent_endpoint}&scheme=http": (
            "did not answer"
        ),
    }
    spec = _spec(tmp_path / "spec", tiny_data_file)
    before = moto.files("")
    for uri, words in bad.items():
        out = cluster.run(
            "dcmtune.sweep",
            str(spec),
            "--address",
            cluster.head.address,
            "--storage-path",
            uri,
            cwd=tmp_path / "run",
        )
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2, (uri, out.stderr[-2000:])
        assert len(lines) == 1 and words in lines[0] and "storage" in lines[0], (uri, lines)
    out = cluster.run(
        "dcmtune.sweep",
        str(spec),
        "--resume",
        "--address",
        cluster.head.address,
        "--storage-path",
        moto.uri("empty"),
        cwd=tmp_path / "run",
    )
    assert out.returncode == 2 and "no experiment to resume" in out.stderr, out.stderr
    out = cluster.run(
        "dcmtune.rank",
        f"s3://missing-bucket/x?endpoint_override=127.0.0.1:{port}&scheme=http",
        cwd=tmp_path / "run",
    )
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert moto.files("") == before  # nothing written to the bucket
    assert not (tmp_path / "run" / "ray_results").exists()  # nor locally
