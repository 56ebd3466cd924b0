"""A two-node Ray cluster on loopback and an S3-compatible server (moto) for tests/test_cluster.py.

Everything here starts its own processes and stops only those, by pid: each Ray node is one
`ray start --block` process (which stops the node's other processes when it ends), each with
its own short --temp-dir and its own ports, apart from the session's pytest Ray (conftest.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

PYTHON = sys.executable
RAY = str(Path(sys.executable).with_name("ray"))
REPO = Path(__file__).resolve().parent.parent

# Every process of the cluster, the driver and the S3 server get dummy credentials; no
# process may ask an EC2 metadata endpoint for real ones.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], bool], timeout: float, what: str, every: float = 0.25) -> None:
    """Polls `condition` until it holds; AssertionError naming `what` after `timeout` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def base_env(tmp: Path) -> dict:
    """The environment of every process the tests start (no RAY_TMPDIR of the pytest Ray)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(S3_ENV)
    env.update(
        {
            "RAY_AUTH_MODE": "disabled",
            "PYTHONPATH": str(REPO),
            "RAY_USAGE_STATS_ENABLED": "0",
            "JAX_PLATFORMS": "cpu",
            # Node death noticed within a few seconds (default: tens of seconds).
            "RAY_health_check_period_ms": "500",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
            "TMPDIR": str(tmp),
        }
    )
    return env


def stop(proc: subprocess.Popen | None, grace: float = 20.0) -> None:
    """SIGTERM to a process this module started, then SIGKILL of it and its descendants."""
    if proc is None or proc.poll() is not None:
        return
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    for k in kids:
        try:
            k.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(kids, timeout=10)


class MotoServer:
    """moto's S3 server on 127.0.0.1:<free port>, one bucket."""

    def __init__(self, workdir: Path, bucket: str = "sweeps"):
        self.port, self.bucket = free_port(), bucket
        self.log = open(workdir / "moto.log", "w")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=base_env(workdir),
        )
        self.fs = self._fs()
        wait_for(self._up, 30, "the moto server")
        self.fs.create_dir(bucket)

    def _fs(self):
        import pyarrow.fs as pafs

        for k, v in S3_ENV.items():  # the test process reads the bucket too
            os.environ.setdefault(k, v)
        return pafs.S3FileSystem(
            access_key="testing",
            secret_key="testing",
            endpoint_override=f"127.0.0.1:{self.port}",
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
        )

    def _up(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def uri(self, path: str) -> str:
        return f"s3://{self.bucket}/{path}?endpoint_override=127.0.0.1:{self.port}&scheme=http"

    def files(self, prefix: str) -> list[str]:
        """Paths (relative to the bucket) of every object under `prefix`."""
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(f"{self.bucket}/{prefix}", recursive=True, allow_not_found=True)
        return sorted(
            i.path[len(self.bucket) + 1 :]
            for i in self.fs.get_file_info(sel)
            if i.type == pafs.FileType.File
        )

    def read(self, key: str) -> bytes:
        with self.fs.open_input_stream(f"{self.bucket}/{key}") as f:
            return f.read()

    def close(self) -> None:
        stop(self.proc, grace=5)
        self.log.close()


class Node:
    """One Ray node: `ray start --block` with its own temp dir and ports."""

    def __init__(self, workdir: Path, name: str, num_cpus: int, head_address: str = ""):
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"c{name[0]}"))  # short: socket paths
        self.log = open(workdir / f"ray-{name}.log", "w")
        ports = [
            "--node-manager-port",
            "--object-manager-port",
            "--metrics-export-port",
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port",
        ]
        cmd = [
            RAY,
            "start",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            str(num_cpus),
            "--num-gpus",
            "0",
            "--temp-dir",
            str(self.temp_dir),
            "--disable-usage-stats",
            "--object-store-memory",
            str(100 * 2**20),
        ]
        for p in ports:
            cmd += [p, str(free_port())]
        if head_address:
            cmd += ["--address", head_address]
        else:
            self.port = free_port()
            cmd += [
                "--head",
                "--port",
                str(self.port),
                "--include-dashboard",
                "false",
                "--ray-client-server-port",
                str(free_port()),
            ]
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=base_env(workdir), cwd=workdir
        )

    def started(self) -> bool:
        """Whether `ray start` reports the node up (its log line; no Ray client needed)."""
        self.log.flush()
        text = Path(self.log.name).read_text(errors="replace")
        if self.proc.poll() is not None:
            raise AssertionError(f"ray start exited with {self.proc.returncode}: {text[-2000:]}")
        return "Ray runtime started" in text

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def raylet(self) -> psutil.Process:
        """The node's raylet (a descendant of the `ray start` process this test started)."""
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if "raylet" in p.name():
                    return p
            except psutil.NoSuchProcess:
                continue
        raise AssertionError("no raylet under the node's ray start process")

    def stop(self) -> None:
        stop(self.proc)
        self.log.close()

    def remove(self) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)
