"""A two-node Ray cluster on loopback and an S3-compatible server (moto) for tests/test_cluster.py,
and waits bounded by progress for every test that starts processes.

Everything here starts its own processes and stops only those, by pid: each Ray node is one
`ray start --block` process (which stops the node's other processes when it ends), each with
its own short --temp-dir and its own ports, apart from the session's pytest Ray (conftest.py).

No wait here guesses the machine's speed. A wait ends when what it waits for is there (a node
registered in the head's GCS, a checkpoint in the bucket, a process exited); it fails when the
work it waits on made no progress (no output, no file, no CPU time spent) for STALL_S seconds,
or after LIMIT_S seconds in all, with a message naming what it waited for and what it saw last.
A loaded machine makes progress more slowly, so it takes longer; a hung one fails.

Ray runs its workers (the trials) at nice 15: next to busy processes of the same session
(autogroup) a trial gets a few percent of a core, and a sweep takes many times longer than on
an idle machine. That is still progress (CpuMeter), so it passes, only later.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psutil

PYTHON = sys.executable
RAY = str(Path(sys.executable).with_name("ray"))
REPO = Path(__file__).resolve().parent.parent

# A wait fails when the work it waits on showed no progress for STALL_S s, or after LIMIT_S s
# in all (a backstop for work that keeps changing without ever finishing).
STALL_S = 600.0
LIMIT_S = 4 * 3600.0
# A process's CPU time is progress once it grew by CPU_STEP_S s: a computing process starved
# to 1% of a core takes that step within STALL_S s; an idle Ray process (heartbeats and
# metrics, ~0.5% of a core, measured) takes about 17 min.
CPU_STEP_S = 5.0

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


# --------------------------------------------------------------------------- waits


def wait_for(
    condition: Callable[[], Any],
    what: str,
    progress: Callable[[], Any] | None = None,
    *,
    stall: float = STALL_S,
    limit: float = LIMIT_S,
    every: float = 0.25,
    progress_every: float = 1.0,
) -> Any:
    """Polls `condition()` every `every` s until it returns a true value, and returns it.

    `progress()` (checked every `progress_every` s) returns a snapshot of what the awaited work
    leaves behind: a log's size, files in a directory, CPU steps of its processes, ... Each
    change restarts the `stall` s allowance, so a slow machine that still works passes. Fails
    with an AssertionError naming `what` and the last snapshot when nothing changed for `stall`
    s (without `progress`: after `stall` s), or after `limit` s in all. `condition` may raise to
    fail at once (a process that should do the work has exited)."""
    t0 = last = time.monotonic()
    seen = progress() if progress is not None else None
    checked = t0
    while True:
        value = condition()
        if value:
            return value
        now = time.monotonic()
        if progress is not None and now - checked >= progress_every:
            checked = now
            snap = progress()
            if snap != seen:
                seen, last = snap, now
        if now - last > stall:
            raise AssertionError(
                f"gave up waiting for {what}: no progress for {stall:g} s "
                f"({now - t0:.0f} s in all); last seen: {seen!r}"
            )
        if now - t0 > limit:
            raise AssertionError(
                f"gave up waiting for {what} after {limit:g} s, still progressing; "
                f"last seen: {seen!r}"
            )
        time.sleep(every)


def processes(pid: int) -> list[psutil.Process]:
    """The process `pid` (one this module started) and its descendants; [] once it is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def exited(p: psutil.Process) -> bool:
    """Whether `p` has exited (a zombie not yet reaped by its parent has)."""
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def ray_workers(pid: int) -> list[psutil.Process]:
    """The Ray worker processes (trials, idle workers; not Ray's agents) under `pid`."""
    out = []
    for p in processes(pid)[1:]:
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if title.startswith("ray::") and "Agent" not in title:
            out.append(p)
    return out


class CpuMeter:
    """Progress of processes by the CPU time they spend. Calling it returns a count that goes
    up whenever one of the processes `procs()` returns has spent CPU_STEP_S CPU seconds since
    the last count, or a new one appeared (the work moved on: a worker, a trial started)."""

    def __init__(self, procs: Callable[[], Iterable[psutil.Process]]):
        self.procs, self.count, self.base = procs, 0, {}

    def __call__(self) -> int:
        now = {}
        for p in self.procs():
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            now[p.pid] = t.user + t.system
        if any(
            pid not in self.base or cpu - self.base[pid] >= CPU_STEP_S for pid, cpu in now.items()
        ):
            self.count, self.base = self.count + 1, now
        else:
            self.base = {pid: self.base[pid] for pid in now}
        return self.count


def files_state(*roots: Path) -> tuple[int, int, int]:
    """(files, bytes, newest mtime in ns) of everything under `roots` (missing roots: 0)."""
    n = size = newest = 0
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except OSError:
                    continue
                n, size, newest = n + 1, size + st.st_size, max(newest, st.st_mtime_ns)
    return n, size, newest


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def run(
    cmd: list[str], what: str, *, cwd: Path, env: dict, progress: Callable[[], Any] | None = None
) -> subprocess.CompletedProcess:
    """Runs `cmd` to its end (text output captured through files, read once it exited). The
    wait is bounded by its progress: its output, the CPU steps of its process tree, and
    `progress()` if given (e.g. files it writes)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err)
        cpu = CpuMeter(lambda: processes(proc.pid))

        def seen():
            sizes = os.fstat(out.fileno()).st_size, os.fstat(err.fileno()).st_size
            extra = progress() if progress is not None else None
            return sizes, cpu(), extra

        try:
            wait_for(lambda: proc.poll() is not None, what, seen)
        finally:
            stop(proc)
        out.seek(0)
        err.seek(0)
        text = [f.read().decode(errors="replace") for f in (out, err)]
    return subprocess.CompletedProcess(cmd, proc.returncode, *text)


def stop(proc: subprocess.Popen | None, what: str = "a process") -> None:
    """Stops a process this module started and its descendants: SIGTERM, then SIGKILL of
    whatever is left once the shutdown made no progress (no process exited, no CPU step) for
    20 s; waits until every one of them has exited."""
    if proc is None or proc.poll() is not None:
        return
    kids = processes(proc.pid)[1:]
    cpu = CpuMeter(lambda: processes(proc.pid))
    proc.send_signal(signal.SIGTERM)
    try:
        wait_for(
            lambda: proc.poll() is not None,
            f"{what} (pid {proc.pid}) to stop on SIGTERM",
            lambda: (len(processes(proc.pid)), cpu()),
            stall=20,
        )
    except AssertionError:
        proc.kill()
    for k in kids:
        try:
            k.kill()
        except psutil.NoSuchProcess:
            pass
    # SIGKILLed processes need no CPU to exit, only the kernel: a fixed, generous bound.
    wait_for(lambda: proc.poll() is not None, f"{what} (pid {proc.pid}) to exit on SIGKILL")
    psutil.wait_procs(kids, timeout=STALL_S)


# --------------------------------------------------------------------------- processes' env


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
            # A node whose raylet is gone is declared dead within a few seconds (default:
            # tens of seconds): its health checks are refused at once, every 0.5 s, three in
            # a row. A raylet that is alive but slow to answer on a loaded machine is not:
            # each check waits up to a minute for the answer (Ray's default is 10 s).
            "RAY_health_check_period_ms": "500",
            "RAY_health_check_timeout_ms": "60000",
            "RAY_health_check_failure_threshold": "3",
            # Worker processes and the GCS port file get ten minutes, not Ray's 60 s / 30 s,
            # on a machine where starting a Python process takes long.
            "RAY_worker_register_timeout_seconds": "600",
            "RAY_gcs_server_port_wait_time_s": "600",
            "TMPDIR": str(tmp),
        }
    )
    return env


# --------------------------------------------------------------------------- S3 (moto)


class MotoServer:
    """moto's S3 server on 127.0.0.1:<free port>, one bucket."""

    def __init__(self, workdir: Path, bucket: str = "sweeps"):
        self.port, self.bucket = free_port(), bucket
        self.log_path = workdir / "moto.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=base_env(workdir),
        )
        self.fs = self._fs()
        cpu = CpuMeter(lambda: processes(self.proc.pid))
        wait_for(
            self._up,
            f"the moto server to listen on 127.0.0.1:{self.port}",
            lambda: (file_size(self.log_path), cpu()),
        )
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
            # The AWS SDK's defaults (1 s to connect, 3 s per request) guess the speed of a
            # server on this machine; the tests' reads of a local server wait a minute.
            connect_timeout=60,
            request_timeout=60,
        )

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"the moto server exited with {self.proc.returncode}: "
                + self.log_path.read_text(errors="replace")[-2000:]
            )
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def uri(self, path: str) -> str:
        return f"s3://{self.bucket}/{path}?endpoint_override=127.0.0.1:{self.port}&scheme=http"

    def _infos(self, prefix: str):
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(f"{self.bucket}/{prefix}", recursive=True, allow_not_found=True)
        return [i for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File]

    def files(self, prefix: str) -> list[str]:
        """Paths (relative to the bucket) of every object under `prefix`."""
        return sorted(i.path[len(self.bucket) + 1 :] for i in self._infos(prefix))

    def state(self, prefix: str) -> tuple[int, int]:
        """(objects, bytes) under `prefix`: progress of whatever writes there."""
        infos = self._infos(prefix)
        return len(infos), sum(i.size or 0 for i in infos)

    def read(self, key: str) -> bytes:
        with self.fs.open_input_stream(f"{self.bucket}/{key}") as f:
            return f.read()

    def close(self) -> None:
        stop(self.proc, "the moto server")
        self.log.close()


# --------------------------------------------------------------------------- Ray nodes

# Asks a cluster's GCS for its node table, from a short-lived process (no Ray client, nothing
# shared with the pytest process's Ray): {node manager port: alive}.
_NODE_TABLE = r"""
import json, sys
from ray._private import services, state
gcs = state.GlobalState()
gcs._initialize_global_state(services._get_gcs_client_options(sys.argv[1]))
print(json.dumps({n["NodeManagerPort"]: n["Alive"] for n in gcs.node_table()}))
"""


def node_table(gcs_address: str, env: dict) -> dict[int, bool]:
    """{node manager port: alive} of every node the GCS at `gcs_address` knows."""
    out = run(
        [PYTHON, "-c", _NODE_TABLE, gcs_address],
        f"the node table of the GCS at {gcs_address}",
        cwd=Path(env["TMPDIR"]),
        env=env,
    )
    if out.returncode != 0:
        return {}  # e.g. the GCS not listening yet: asked again, bounded by the caller
    return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


# What `ray start` prints when its raylet did not register in the GCS within Ray's fixed 30 s
# (ray/_private/node.py: raylet_start_wait_time_s, no setting changes it), or when the node
# could not reach the head's GCS while asking it so. On a loaded machine a node can miss those
# deadlines; start_node starts such a node again, fresh.
_STARTUP_TIMED_OUT = ("timed out during startup", "Failed to connect to GCS")
START_ATTEMPTS = 3


class StartupTimedOut(AssertionError):
    """`ray start` gave up because its raylet did not register within Ray's fixed 30 s."""


class Node:
    """One Ray node: `ray start --block` with its own temp dir and ports."""

    def __init__(
        self, workdir: Path, name: str, num_cpus: int, head_address: str = "", attempt: int = 0
    ):
        self.name = name
        self.env = base_env(workdir)
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"c{name[0]}"))  # short: socket paths
        suffix = f".{attempt}" if attempt else ""  # a failed attempt's log is kept
        self.log_path = workdir / f"ray-{name}{suffix}.log"
        self.log = open(self.log_path, "w")
        self.node_manager_port = free_port()
        ports = [
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
            "--node-manager-port",
            str(self.node_manager_port),
        ]
        for p in ports:
            cmd += [p, str(free_port())]
        if head_address:
            self.gcs_address = head_address
            cmd += ["--address", head_address]
        else:
            self.port = free_port()
            self.gcs_address = self.address
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
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=workdir
        )
        self._cpu = CpuMeter(lambda: processes(self.proc.pid))

    def _text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def started(self) -> bool:
        """Whether `ray start` reports the node up (its log line); raises if it exited."""
        text = self._text()
        if self.proc.poll() is not None:
            timed_out = any(m in text for m in _STARTUP_TIMED_OUT)
            kind = StartupTimedOut if timed_out else AssertionError
            raise kind(
                f"ray start of the {self.name} exited with {self.proc.returncode}: {text[-2000:]}"
            )
        return "Ray runtime started" in text

    def alive_in_gcs(self) -> bool | None:
        """Whether the head's GCS reports this node alive (None: it does not know the node)."""
        return node_table(self.gcs_address, self.env).get(self.node_manager_port)

    def progress(self) -> tuple:
        """What the node's start-up leaves behind: its log, its processes, their CPU time,
        the files in its temp dir (session, sockets, logs)."""
        return file_size(self.log_path), self._cpu(), files_state(self.temp_dir)[0]

    def wait_registered(self) -> None:
        """Until `ray start` reports the node up and the head's GCS lists it alive."""
        wait_for(
            lambda: self.started() and self.alive_in_gcs(),
            f"the {self.name} to register alive in the GCS at {self.gcs_address} "
            f"(node manager port {self.node_manager_port}; log {self.log_path})",
            self.progress,
            every=1.0,
        )

    def wait_dead_in_gcs(self) -> None:
        """Until the head's GCS reports this node dead (after its raylet was killed). Nothing
        on the lost node makes progress any more: the bound is STALL_S s of Ray's health
        checks, which declare a refused node dead in seconds."""
        wait_for(
            lambda: self.alive_in_gcs() is False,
            f"the GCS at {self.gcs_address} to report the {self.name} dead",
            every=1.0,
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def raylet(self) -> psutil.Process:
        """The node's raylet (a descendant of the `ray start` process this test started)."""
        for p in processes(self.proc.pid)[1:]:
            try:
                if "raylet" in p.name():
                    return p
            except psutil.NoSuchProcess:
                continue
        raise AssertionError(f"no raylet under the {self.name}'s ray start process")

    def leftovers(self) -> list[psutil.Process]:
        """Processes of this node that outlived its `ray start` (which stops them when it ends
        normally, not when it gives up during start-up): those whose command line names the
        node's own temp dir, which only processes this node started do."""
        mine = str(self.temp_dir)
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.pid != os.getpid() and any(mine in a for a in p.info["cmdline"] or ()):
                    found.append(p)
            except psutil.NoSuchProcess:
                continue
        return found

    def stop(self) -> None:
        stop(self.proc, f"ray start of the {self.name}")
        left = self.leftovers()
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=STALL_S)
        self.log.close()

    def remove(self) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_node(workdir: Path, name: str, num_cpus: int, head_address: str = "") -> Node:
    """A node registered alive in the head's GCS. A `ray start` that gave up on Ray's fixed 30 s
    start-up deadline (a loaded machine) is stopped with every process it left and started
    again with fresh ports and temp dir, at most START_ATTEMPTS times; any other failure fails
    at once."""
    for attempt in range(START_ATTEMPTS):
        node = Node(workdir, name, num_cpus, head_address, attempt)
        try:
            node.wait_registered()
            return node
        except BaseException as e:
            node.stop()
            node.remove()
            if not isinstance(e, StartupTimedOut) or attempt == START_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")
