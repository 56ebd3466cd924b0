"""Restarts cannot drift, and a damaged or half-swapped checkpoint is never loaded silently.

Refused restarts (one line, exit 2) are rows of tests/test_bad_input.py; here: what a restart
may change, how an accepted change is recorded, and checkpoint recovery, including a process
SIGKILLed between the two renames of `_io.atomic_directory`.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dcmtune import _io
from dcmtune.data.synthetic import make_synthetic
from dcmtune.sweep import trainable
from dcmtune.train import checkpoints as ckpt
from dcmtune.train.commands import main as train_main
from dcmtune.train.restart import set_aside_stale as _set_aside_stale

REPO = Path(__file__).resolve().parent.parent
TINY = [
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
    "--valid-fraction",
    "0.25",
    "--test-fraction",
    "0",
    "--save-every-n-epochs",
    "0",
    "--no-use-lr-schedule",
    "--quiet",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-epoch run under a constant learning rate."""
    root = tmp_path_factory.mktemp("restart")
    d = make_synthetic(num_molecules=8, conformers=2, max_atoms=5, num_grid=24, seed=5)
    data = root / "d.npz"
    np.savez(
        data,
        R=d.R,
        Z=d.Z,
        N=d.N,
        esp=d.esp,
        vdw_surface=d.grid,
        n_grid=d.n_grid,
        mono=d.mono,
        mol_id=d.mol_id,
    )
    assert (
        train_main(
            TINY
            + [
                "--data-files",
                str(data),
                "--output-dir",
                str(root / "runs"),
                "--name",
                "run",
                "--num-epochs",
                "2",
            ]
        )
        == 0
    )
    return root / "runs" / "run"


def _copy(run, tmp_path, name="run"):
    target = tmp_path / name
    shutil.copytree(run, target)
    return target


def test_restart_takes_the_checkpoint_config_and_may_extend_a_constant_schedule(run, tmp_path):
    r = _copy(run, tmp_path)
    assert train_main(["--restart-checkpoint", str(r), "--num-epochs", "3", "--quiet"]) == 0
    hist = pd.read_csv(r / "history.csv")
    assert hist["epoch"].tolist() == [1, 2, 3]  # each epoch once
    meta = ckpt.read_meta(r / "checkpoints" / "latest")
    assert meta["epoch"] == 3
    assert meta["config"]["training"]["num_epochs"] == 3
    # Everything else is the checkpoint's, though no flag repeated it.
    saved = json.loads((run / "config.json").read_text())
    assert meta["config"]["training"]["learning_rate"] == saved["training"]["learning_rate"]
    assert meta["config"]["data"] == saved["data"]
    (entry,) = meta["restarts"]
    assert entry["from_epoch"] == 2 and entry["allow_config_change"] is False
    assert entry["changes"] == {"training.num_epochs": [2, 3]}


def test_allowed_config_change_is_recorded(run, tmp_path):
    r = _copy(run, tmp_path)
    assert (
        train_main(
            [
                "--restart-checkpoint",
                str(r / "checkpoints" / "latest"),
                "--learning-rate",
                "0.02",
                "--num-epochs",
                "3",
                "--allow-config-change",
                "--quiet",
            ]
        )
        == 0
    )
    (entry,) = json.loads((r / "restarts.json").read_text())
    assert entry["allow_config_change"] is True
    assert entry["changes"]["training.learning_rate"][1] == 0.02
    assert ckpt.read_meta(r / "checkpoints" / "latest")["restarts"] == [entry]
    assert json.loads((r / "config.json").read_text())["training"]["learning_rate"] == 0.02


# --------------------------------------------------------------------------- recovery


def _save(directory, epoch):
    return ckpt.save_checkpoint(
        directory, {"w": np.full(3, float(epoch))}, {"epoch": epoch, "metrics": {}, "history": []}
    )


def test_meta_checksum_covers_meta_and_state(tmp_path):
    d = _save(tmp_path / "c", 1)
    assert ckpt.verify_checkpoint(d)["epoch"] == 1
    meta = (d / "meta.json").read_text()
    (d / "meta.json").write_text(meta.replace('"epoch": 1', '"epoch": 7'))
    with pytest.raises(ckpt.CheckpointError, match="meta.json altered or damaged"):
        ckpt.read_meta(d)
    (d / "meta.json").write_text(meta)
    (d / "state.msgpack").write_bytes((d / "state.msgpack").read_bytes()[:-3])
    with pytest.raises(ckpt.CheckpointError, match="state.msgpack: checksum mismatch"):
        ckpt.load_checkpoint(d)


def test_checkpoints_record_package_versions_and_callers_cannot_alter_them(tmp_path):
    d = _save(tmp_path / "c", 1)
    versions = ckpt.read_meta(d)["versions"]
    assert versions["jax"] and versions["flax"] and versions == ckpt.package_versions()
    ckpt.package_versions()["jax"] = "altered"  # the per-process lookup hands out copies
    assert ckpt.package_versions() == versions
    assert ckpt.read_meta(_save(tmp_path / "d", 2))["versions"] == versions


def test_a_failure_between_the_renames_puts_the_old_copy_back(tmp_path, monkeypatch):
    d = _save(tmp_path / "latest", 1)
    real = os.replace
    calls = []

    def second_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(_io.os, "replace", second_fails)
    with pytest.raises(OSError):
        _save(d, 2)
    monkeypatch.setattr(_io.os, "replace", real)
    assert ckpt.verify_checkpoint(d)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]  # nothing left over


KILL_BETWEEN_RENAMES = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from dcmtune.train import checkpoints as ckpt

    target = sys.argv[1]
    def save(epoch):
        ckpt.save_checkpoint(target, {"w": np.full(3, float(epoch))},
                             {"epoch": epoch, "metrics": {}, "history": []})
    save(1)
    real = os.replace
    def replace(src, dst):  # this process only: die right after the first rename of a swap
        real(src, dst)
        if str(dst).endswith(".old"):
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
    save(2)
    print("not killed")
""")


def test_a_kill_between_the_renames_leaves_the_previous_checkpoint_recoverable(tmp_path):
    script = tmp_path / "kill.py"
    script.write_text(KILL_BETWEEN_RENAMES)
    target = tmp_path / "run" / "checkpoints" / "latest"
    out = subprocess.run(
        [sys.executable, str(script), str(target)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert not target.exists()  # killed between the renames: only hidden copies remain
    assert [p.name.endswith(".old") for p in target.parent.iterdir()].count(True) == 1
    # Every reader finds it: the trainer's run-dir lookup, a trial retry, the ranking.
    assert ckpt.find_checkpoint(tmp_path / "run") == target
    state, meta = ckpt.load_checkpoint(target)
    assert meta["epoch"] == 1 and state["w"].tolist() == [1.0, 1.0, 1.0]  # never a mix


def test_trial_retry_uses_the_newest_valid_checkpoint(tmp_path):
    tune_copy = _save(tmp_path / "checkpoint_000001", 1)
    latest = _save(tmp_path / "checkpoints" / "latest", 3)
    assert trainable._newest(trainable._verified([tune_copy, latest]))[0] == latest
    (latest / "state.msgpack").write_bytes(b"truncated")
    assert trainable._newest(trainable._verified([tune_copy, latest]))[0] == tune_copy
    (tune_copy / "meta.json").write_bytes(b"\xff\xfe")
    assert trainable._newest(trainable._verified([tune_copy, latest])) == (None, None)


def test_a_restart_from_an_older_checkpoint_sets_aside_newer_best_and_periodic(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root / "best", 5)  # written by the abandoned attempt after the restart point
    _save(root / "epoch_4", 4)
    _save(root / "epoch_2", 2)
    _set_aside_stale(root, {"epoch": 3, "best_epoch": 2})
    names = sorted(p.name for p in root.iterdir())
    assert names == [".stale-best", ".stale-epoch_4", "epoch_2"]
