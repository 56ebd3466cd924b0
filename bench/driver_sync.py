"""The driver's experiment sync against one trial checkpoint upload, on an S3 server.

Ray Tune's driver uploads its whole staging directory (experiment state, and params/result/
progress files of every trial) at each experiment snapshot, one file at a time; a trial uploads
one checkpoint (state.msgpack + meta.json). This builds a staging directory shaped like that of
a 64-trial sweep late in its run (file sizes measured by bench/cluster_traffic.py and read from
the cluster test's bucket) and times Ray's own upload function for it and for one default-model
checkpoint, interleaved, against moto's S3 server on 127.0.0.1 (the `test` extra). Prints the
ratio: how many checkpoint uploads one driver sync costs. Against a real object store every
request also pays the network round trip, which raises the ratio further (the sync has ~50x
more requests).

  python bench/driver_sync.py [--trials 64] [--rows 27] [--repeats 3]

The upload function is Ray's own (`ray.train._internal.storage._upload_to_fs_path`, a private
name of Ray, not of dcmtune: it is what Tune's driver sync calls, which no public Ray API
exposes).

`--smoke`: the same path (moto server, staging directory, interleaved uploads) for a staging
directory of 2 trials with 2 result rows each, once.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
from ray.train._internal.storage import _upload_to_fs_path


def _staging(root: Path, trials: int, rows: int) -> Path:
    d = root / "staging"
    d.mkdir()
    (d / "experiment_state-x.json").write_bytes(os.urandom(35_000 * trials))
    for name, size in (
        ("tuner.pkl", 14_400),
        ("searcher-state-x.pkl", 13_200),
        ("search_gen_state-x.json", 2_900),
    ):
        (d / name).write_bytes(os.urandom(size))
    for i in range(trials):
        t = d / f"trial_{i:08x}"
        t.mkdir()
        for name, size in (
            ("params.json", 53),
            ("params.pkl", 49),
            ("result.json", 1_300 * rows),
            ("progress.csv", 730 * rows),
        ):
            (t / name).write_bytes(os.urandom(size))
    return d


def _checkpoint(root: Path) -> Path:
    d = root / "checkpoint"
    d.mkdir()
    (d / "state.msgpack").write_bytes(os.urandom(103_616))
    (d / "meta.json").write_bytes(os.urandom(7_722 + 963 * 26))
    return d


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=64)
    p.add_argument("--rows", type=int, default=27, help="result rows per trial (1700 / 64)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="2 trials of 2 rows, once")
    args = p.parse_args(argv)
    if args.smoke:
        args.trials, args.rows, args.repeats = 2, 2, 1
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(k, v)
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            fs = pafs.S3FileSystem(
                endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True
            )
            _wait(fs)
            staging, ckpt = _staging(Path(tmp), args.trials, args.rows), _checkpoint(Path(tmp))
            n_files = sum(1 for f in staging.rglob("*") if f.is_file())
            size = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
            ckpt_size = sum(f.stat().st_size for f in ckpt.iterdir())
            sync, one = [], []
            for r in range(args.repeats):  # interleaved: load on the machine hits both alike
                t0 = time.perf_counter()
                _upload_to_fs_path(str(staging), fs, f"bench/exp{r}")
                sync.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                _upload_to_fs_path(str(ckpt), fs, f"bench/ckpt{r}")
                one.append(time.perf_counter() - t0)
        finally:
            server.terminate()
            server.wait(10)
    s, c = min(sync), min(one)
    print(
        f"driver sync: {n_files} files, {size / 1e6:.2f} MB; one checkpoint: 2 files, "
        f"{ckpt_size / 1e6:.2f} MB"
    )
    print(
        f"best of {args.repeats}: driver sync {s:.2f} s, one checkpoint {c:.3f} s, "
        f"ratio {s / c:.0f}"
    )
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(fs) -> None:
    for _ in range(120):
        try:
            fs.create_dir("bench")
            return
        except OSError:
            time.sleep(0.25)
    raise SystemExit("moto server did not start")


if __name__ == "__main__":
    raise SystemExit(main())
