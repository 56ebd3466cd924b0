"""Bad input of every kind ends in one line on stderr, exit code 2, and nothing written.

One table: each row is one distinct cause (spec, flags, data, checkpoints, directories), run
in-process through a command's `main()`. Sweep rows never reach Ray (`run_sweep` and Ray's
start are replaced by functions that fail the test). Checkpoint rows restart from one real
one-epoch run trained once for the module.
"""

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from dcmtune.analysis import commands as rank_cli
from dcmtune.data.synthetic import make_synthetic
from dcmtune.sweep import commands as sweep
from dcmtune.train import commands as train_cli

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
    "0.2",
    "--save-every-n-epochs",
    "0",
]


def _arrays(seed=3, **drop_or_set):
    d = make_synthetic(num_molecules=8, conformers=2, max_atoms=5, num_grid=24, seed=seed)
    a = {
        "R": d.R,
        "Z": d.Z,
        "N": d.N,
        "esp": d.esp,
        "vdw_surface": d.grid,
        "n_grid": d.n_grid,
        "mono": d.mono,
        "Dxyz": d.dipole,
        "com": d.com,
        "Q": d.Q,
        "mol_id": d.mol_id,
    }
    for k, v in drop_or_set.items():
        if v is None:
            a.pop(k)
        else:
            a[k] = v(a[k]) if callable(v) else v
    return a


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A good data file and a real run (one epoch) whose checkpoint the restart rows use."""
    root = tmp_path_factory.mktemp("good")
    data = root / "good.npz"
    np.savez(data, **_arrays())
    other = root / "other.npz"
    np.savez(other, **_arrays(seed=4))
    rc = train_cli.main(
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
            "--quiet",
        ]
    )
    assert rc == 0
    return {"data": data, "other": other, "run": root / "runs" / "run"}


@dataclasses.dataclass
class Ctx:
    """What a row's setup gets: its own directory and the module's good inputs."""

    tmp: Path
    good: dict

    def spec(self, edit: Callable[[dict], None] = lambda raw: None, name="spec.yaml") -> str:
        raw = {
            "name": "t",
            "data": {"data_files": [str(self.good["data"])], "num_valid": 4, "num_test": 4},
            "model": {"features": 4, "max_degree": 1, "num_iterations": 1, "n_dcm": 1},
            "training": {"num_epochs": 3, "batch_size": 2, "warmup_epochs": 0},
            "search": {"training.learning_rate": {"loguniform": [1e-4, 1e-2]}},
            "run": {
                "num_samples": 2,
                "storage_path": str(self.tmp / "results"),
                "resources": {"cpu": 1, "gpu": "auto"},
            },
        }
        edit(raw)
        path = self.tmp / name
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return str(path)

    def data(self, **changes) -> str:
        path = self.tmp / "bad.npz"
        np.savez(path, **_arrays(**changes))
        return str(path)

    def run(self, damage: Callable[[Path], None] = lambda ckpt: None) -> str:
        """A copy of the good run, its latest checkpoint damaged by `damage`."""
        run = self.tmp / "runs" / "run"
        shutil.copytree(self.good["run"], run)
        damage(run / "checkpoints" / "latest")
        return str(run)

    def train(self, *flags) -> list:
        return TINY + [
            "--data-files",
            str(self.good["data"]),
            "--output-dir",
            str(self.tmp / "out"),
            "--name",
            "x",
            "--num-epochs",
            "2",
            "--quiet",
            *flags,
        ]

    def restart(self, *flags, damage=lambda ckpt: None) -> list:
        return ["--restart-checkpoint", self.run(damage), "--quiet", *flags]


def _flip_byte(path: Path) -> None:
    """One bit of one digit flipped (the JSON stays valid: 0<->1, 2<->3, ...): a digit after a
    digit or a decimal point, so no number gains a leading zero."""
    b = bytearray(path.read_bytes())
    i = next(
        i
        for i in range(len(b) // 2, len(b))
        if chr(b[i]).isdigit() and b[i] < 0x38 and chr(b[i - 1]) in "0123456789."
    )
    b[i] ^= 0x01
    path.write_bytes(bytes(b))


def _edit_meta(key, value):
    def damage(ckpt):
        meta = json.loads((ckpt / "meta.json").read_text())
        meta[key] = value
        (ckpt / "meta.json").write_text(json.dumps(meta))

    return damage


def _experiment(ctx: Ctx, record: bytes = b"") -> None:
    """A fake earlier experiment under the spec's storage path."""
    exp = ctx.tmp / "results" / "t"
    exp.mkdir(parents=True)
    (exp / "tuner.pkl").write_bytes(b"")
    if record:
        (exp / "sweep_spec.json").write_bytes(record)


def _sweep_resume_changed(ctx: Ctx) -> list:
    path = ctx.spec()
    _experiment(ctx)
    spec = sweep.load_spec(path)
    saved = spec.to_dict()
    saved["run"]["num_samples"] = 7
    (ctx.tmp / "results" / "t" / "sweep_spec.json").write_text(json.dumps(saved))
    return [path, "--resume"]


def _trial_dir_damaged(ctx: Ctx) -> list:
    """An experiment whose only run has every checkpoint damaged."""
    exp = ctx.tmp / "exp"
    exp.mkdir()
    run = exp / "run"
    shutil.copytree(ctx.good["run"], run)
    for d in (run / "checkpoints").iterdir():
        _flip_byte(d / "meta.json")
    return [str(exp)]


def _set(path: str):
    """edit(raw) setting raw[a][b]... = value from "a/b"."""
    *heads, last = path.split("/")

    def setter(value):
        def edit(raw):
            d = raw
            for h in heads:
                d = d.setdefault(h, {})
            d[last] = value

        return edit

    return setter


S, T, R = "sweep", "train", "rank"
CASES = [
    # ---- spec (sweep.main): the file, then its keys
    (
        "spec",
        "spec not UTF-8 (an .npz passed as spec)",
        S,
        lambda c: [str(c.good["data"])],
        "not a text (UTF-8) YAML file",
    ),
    (
        "spec",
        "run.mode max",
        S,
        lambda c: [c.spec(_set("run/mode")("max"))],
        "run.mode: every sweep metric is lower-is-better",
    ),
    (
        "spec",
        "run.metric train_loss",
        S,
        lambda c: [c.spec(_set("run/metric")("train_loss"))],
        "run.metric: train_loss is measured on the training split",
    ),
    (
        "spec",
        "run.metric train_esp_rmse",
        S,
        lambda c: [c.spec(_set("run/metric")("train_esp_rmse"))],
        "run.metric: train_esp_rmse",
    ),
    (
        "spec",
        "run.metric test_esp_rmse",
        S,
        lambda c: [c.spec(_set("run/metric")("test_esp_rmse"))],
        "run.metric: unknown metric",
    ),
    (
        "spec",
        "spec is a YAML list",
        S,
        lambda c: [str(c.tmp / "l.yaml") if (c.tmp / "l.yaml").write_text("- a\n") else ""],
        "expected a mapping of sections",
    ),
    (
        "spec",
        "empty spec",
        S,
        lambda c: [str(c.tmp / "e.yaml") if (c.tmp / "e.yaml").write_text("") == 0 else ""],
        "the spec file is empty",
    ),
    (
        "spec",
        "unknown top-level key",
        S,
        lambda c: [c.spec(lambda r: r.update(epochs=3))],
        "epochs: unknown key",
    ),
    (
        "spec",
        "unknown searched field",
        S,
        lambda c: [c.spec(lambda r: r["search"].update({"training.lr": {"uniform": [0, 1]}}))],
        "search.training.lr: unknown config field",
    ),
    (
        "spec",
        "loguniform lo <= 0",
        S,
        lambda c: [
            c.spec(
                lambda r: r["search"].update({"training.learning_rate": {"loguniform": [0, 1e-2]}})
            )
        ],
        "search.training.learning_rate: loguniform needs lo > 0",
    ),
    (
        "spec",
        "grace period beyond num_epochs",
        S,
        lambda c: [c.spec(_set("scheduler/grace_period")(9))],
        "scheduler.grace_period: 9",
    ),
    (
        "spec",
        "storage is not a URL",
        S,
        lambda c: [c.spec(_set("searcher/storage")("study.db"))],
        "searcher.storage: expected an Optuna storage URL",
    ),
    (
        "spec",
        "point outside the space",
        S,
        lambda c: [c.spec(_set("searcher/points_to_evaluate")([{"training.learning_rate": 0.5}]))],
        "searcher.points_to_evaluate[0].training.learning_rate: 0.5 is outside",
    ),
    (
        "spec",
        "missing data file",
        S,
        lambda c: [c.spec(_set("data/data_files")(["nothere.npz"]))],
        "data.data_files[0]: file not found",
    ),
    (
        "spec",
        "bad YAML",
        S,
        lambda c: [str(c.tmp / "b.yaml") if (c.tmp / "b.yaml").write_text("a: [1\n") else ""],
        "not valid YAML",
    ),
    # ---- flags
    (
        "flags",
        "sweep --num-samples 0",
        S,
        lambda c: [c.spec(), "--num-samples", "0"],
        "--num-samples: expected at least 1",
    ),
    (
        "flags",
        "sweep --debug with --resume",
        S,
        lambda c: [c.spec(), "--debug", "--resume"],
        "--debug: runs one trial in this process",
    ),
    (
        "flags",
        "sweep --name ../x",
        S,
        lambda c: [c.spec(), "--name", "../x"],
        "--name: expected letters",
    ),
    (
        "flags",
        "sweep unknown flag",
        S,
        lambda c: [c.spec(), "--bogus"],
        "unrecognized arguments: --bogus",
    ),
    (
        "flags",
        "sweep --num-samples abc",
        S,
        lambda c: [c.spec(), "--num-samples", "abc"],
        "argument --num-samples: invalid int value",
    ),
    (
        "flags",
        "train --lr-schedule-type linear",
        T,
        lambda c: c.train("--lr-schedule-type", "linear"),
        "training.lr_schedule_type",
    ),
    (
        "flags",
        "train --learning-rate 2",
        T,
        lambda c: c.train("--learning-rate", "2"),
        "training.learning_rate: expected a value in (0, 1)",
    ),
    (
        "flags",
        "train --batch-size abc",
        T,
        lambda c: c.train("--batch-size", "abc"),
        "argument --batch-size: invalid int value",
    ),
    (
        "flags",
        "train --allow-config-change without a restart",
        T,
        lambda c: c.train("--allow-config-change"),
        "--allow-config-change: only used with",
    ),
    (
        "flags",
        "train --name a/b",
        T,
        lambda c: c.train("--name", "a/b"),
        "name: expected a non-empty name",
    ),
    (
        "flags",
        "train warmup beyond num_epochs",
        T,
        lambda c: c.train("--warmup-epochs", "5"),
        "training.warmup_epochs",
    ),
    (
        "flags",
        "train --train-molecules 0",
        T,
        lambda c: c.train("--train-molecules", "0"),
        "data.train_molecules: expected at least 1",
    ),
    (
        "flags",
        "train --train-molecules beyond the training split",
        T,
        lambda c: c.train("--train-molecules", "9"),
        "train_molecules: expected an integer in [1,",
    ),
    (
        "flags",
        "train batch larger than the training split",
        T,
        lambda c: c.train("--batch-size", "64"),
        "training.batch_size: batch_size x",
    ),
    (
        "flags",
        "rank --top-k 0",
        R,
        lambda c: [str(c.good["run"].parent), "--top-k", "0"],
        "top_k: expected at least 1",
    ),
    (
        "flags",
        "rank --split foo",
        R,
        lambda c: [str(c.good["run"].parent), "--split", "foo"],
        "argument --split: invalid choice",
    ),
    # ---- data (train.main --data-files)
    (
        "data",
        "not an npz",
        T,
        lambda c: c.train("--data-files", str(c.good["run"] / "config.json")),
        "not a readable .npz file",
    ),
    (
        "data",
        "missing esp",
        T,
        lambda c: c.train("--data-files", c.data(esp=None)),
        "esp: required key missing",
    ),
    (
        "data",
        "Z of another shape",
        T,
        lambda c: c.train("--data-files", c.data(Z=lambda z: z[:, :-1])),
        "Z: expected shape",
    ),
    (
        "data",
        "N disagrees with Z",
        T,
        lambda c: c.train("--data-files", c.data(N=lambda n: n + 1)),
        "N",
    ),
    (
        "data",
        "non-finite esp",
        T,
        lambda c: c.train(
            "--data-files",
            c.data(esp=lambda e: np.where(np.arange(e.size).reshape(e.shape) == 3, np.nan, e)),
        ),
        "esp",
    ),
    (
        "data",
        "Z above max_atomic_number",
        T,
        lambda c: c.train("--data-files", c.data(), "--max-atomic-number", "1"),
        "Z",
    ),
    (
        "data",
        "n_grid beyond G",
        T,
        lambda c: c.train("--data-files", c.data(n_grid=lambda g: g + 100)),
        "n_grid",
    ),
    (
        "data",
        "object array (pickle)",
        T,
        lambda c: c.train(
            "--data-files", c.data(mol_id=lambda m: np.array([{"x": 1}] * len(m), dtype=object))
        ),
        "pickle",
    ),
    (
        "data",
        "truncated npz",
        T,
        lambda c: c.train("--data-files", _truncated(c)),
        "not a readable .npz file",
    ),
    (
        "data",
        "npz without our arrays",
        T,
        lambda c: c.train("--data-files", _empty_npz(c)),
        "R: required key missing",
    ),
    (
        "data",
        "data file is a directory",
        T,
        lambda c: c.train("--data-files", str(c.tmp)),
        "data file not found",
    ),
    (
        "data",
        "sweep metric needs mono the data lacks",
        S,
        lambda c: [
            c.spec(
                lambda r: (
                    r["data"].update(data_files=[c.data(mono=None)]),
                    r["run"].update(metric="valid_mono_mae"),
                )
            )
        ],
        "run.metric: valid_mono_mae needs reference charges",
    ),
    # ---- checkpoints (train.main --restart-checkpoint; rank)
    (
        "checkpoints",
        "no checkpoint at the path",
        T,
        lambda c: ["--restart-checkpoint", str(c.tmp), "--quiet"],
        "no checkpoint there",
    ),
    (
        "checkpoints",
        "meta.json byte flipped",
        T,
        lambda c: c.restart(damage=lambda d: _flip_byte(d / "meta.json")),
        "checksum mismatch (meta.json altered",
    ),
    (
        "checkpoints",
        "meta.json not UTF-8",
        T,
        lambda c: c.restart(damage=lambda d: (d / "meta.json").write_bytes(b"\xff\xfe{")),
        "meta.json: not UTF-8",
    ),
    (
        "checkpoints",
        "meta.json not JSON",
        T,
        lambda c: c.restart(damage=lambda d: (d / "meta.json").write_text("{")),
        "meta.json: unreadable JSON",
    ),
    (
        "checkpoints",
        "meta.json edited by hand",
        T,
        lambda c: c.restart(damage=_edit_meta("epoch", 1)),
        "checksum mismatch",
    ),
    (
        "checkpoints",
        "state truncated",
        T,
        lambda c: c.restart(
            damage=lambda d: (d / "state.msgpack").write_bytes(
                (d / "state.msgpack").read_bytes()[:100]
            )
        ),
        "state.msgpack: checksum mismatch",
    ),
    (
        "checkpoints",
        "state missing",
        T,
        lambda c: c.restart(damage=lambda d: (d / "state.msgpack").unlink()),
        "missing state.msgpack",
    ),
    (
        "checkpoints",
        "restart toggles use_grad_clip",
        T,
        lambda c: c.restart("--no-use-grad-clip"),
        "training.use_grad_clip = False differs",
    ),
    (
        "checkpoints",
        "restart with another learning rate",
        T,
        lambda c: c.restart("--learning-rate", "0.5"),
        "training.learning_rate = 0.5 differs",
    ),
    (
        "checkpoints",
        "restart with another batch size",
        T,
        lambda c: c.restart("--batch-size", "2"),
        "training.batch_size = 2 differs",
    ),
    (
        "checkpoints",
        "restart with another architecture",
        T,
        lambda c: c.restart("--features", "8"),
        "another architecture: model.features = 8",
    ),
    (
        "checkpoints",
        "restart with another split seed",
        T,
        lambda c: c.restart("--split-seed", "9"),
        "data.split_seed = 9 differs",
    ),
    (
        "checkpoints",
        "restart on other data",
        T,
        lambda c: c.restart("--data-files", str(c.good["other"])),
        "data.checksum",
    ),
    (
        "checkpoints",
        "restart longer under a decaying schedule",
        T,
        lambda c: c.restart("--num-epochs", "5"),
        "training.num_epochs = 5 differs",
    ),
    (
        "checkpoints",
        "restart with accumulation",
        T,
        lambda c: c.restart("--gradient-accumulation-steps", "2"),
        "training.gradient_accumulation_steps = 2 differs",
    ),
    (
        "checkpoints",
        "restart with another schedule",
        T,
        lambda c: c.restart("--lr-schedule-type", "step"),
        "training.lr_schedule_type = 'step'",
    ),
    (
        "checkpoints",
        "rank: every checkpoint damaged",
        R,
        _trial_dir_damaged,
        "no trial can be ranked",
    ),
    # ---- directories
    (
        "directories",
        "storage_path is a file",
        S,
        lambda c: [c.spec(_set("run/storage_path")(str(c.good["data"])))],
        "run.storage_path: ",
    ),
    (
        "directories",
        "storage_path unwritable",
        S,
        lambda c: [c.spec(_set("run/storage_path")("/proc/dcmtune-results"))],
        "run.storage_path: /proc is not writable",
    ),
    (
        "directories",
        "experiment exists without --resume",
        S,
        lambda c: [c.spec()] if _experiment(c) is None else [],
        "already exists; continue it with --resume",
    ),
    (
        "directories",
        "--resume without an experiment",
        S,
        lambda c: [c.spec(), "--resume"],
        "--resume: no experiment to resume",
    ),
    (
        "directories",
        "--resume with a damaged experiment record",
        S,
        lambda c: [c.spec(), "--resume"] if _experiment(c, b"\xff{") is None else [],
        "sweep_spec.json: unreadable",
    ),
    (
        "directories",
        "--resume with another spec",
        S,
        _sweep_resume_changed,
        "run.num_samples: differs from the experiment being resumed",
    ),
    (
        "directories",
        "train output_dir is a file",
        T,
        lambda c: c.train("--output-dir", str(c.good["data"])),
        "output_dir: ",
    ),
    (
        "directories",
        "train output_dir unwritable",
        T,
        lambda c: c.train("--output-dir", "/proc/dcmtune-out"),
        "output_dir: /proc is not writable",
    ),
    (
        "directories",
        "train run dir already holds checkpoints",
        T,
        lambda c: c.train("--output-dir", str(Path(c.run()).parent), "--name", "run"),
        "already holds checkpoints",
    ),
    (
        "directories",
        "rank a missing directory",
        R,
        lambda c: [str(c.tmp / "none")],
        "not found; expected a dcmtune sweep experiment",
    ),
    (
        "directories",
        "rank an empty directory",
        R,
        lambda c: [str(c.tmp / "e")] if (c.tmp / "e").mkdir() is None else [],
        "empty directory",
    ),
    ("directories", "rank a file", R, lambda c: [str(c.good["data"])], "not a directory"),
    (
        "directories",
        "rank a foreign directory",
        R,
        lambda c: (
            [str(c.tmp / "f")]
            if (c.tmp / "f").mkdir() is None and (c.tmp / "f" / "notes.txt").write_text("x")
            else []
        ),
        "no dcmtune trials found",
    ),
]


def _truncated(c: Ctx) -> str:
    path = c.tmp / "trunc.npz"
    blob = Path(c.data()).read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    return str(path)


def _empty_npz(c: Ctx) -> str:
    path = c.tmp / "empty.npz"
    np.savez(path, E=np.zeros(3))  # an mmml-style extra key, none of ours
    return str(path)


def test_the_table_covers_every_kind_of_bad_input():
    kinds = {}
    for kind, _name, *_ in CASES:
        kinds[kind] = kinds.get(kind, 0) + 1
    assert len({c[1] for c in CASES}) == len(CASES) >= 60, len(CASES)
    assert all(n >= 8 for n in kinds.values()) and len(kinds) == 5, kinds


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the sweep reached Ray: the input was accepted")

    monkeypatch.setattr(sweep, "run_sweep", refuse)
    monkeypatch.setattr("dcmtune.sweep.driver._connect", refuse)
    monkeypatch.setattr("dcmtune.sweep.driver.detect_local_gpus", lambda *a, **k: 0)


def _snapshot(root: Path) -> dict:
    """Every path under root, with size and mtime for files (a directory's mtime changes when
    a probe file is created and removed, which writes nothing)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
        for p in root.rglob("*")
    }


MAINS = {S: sweep.main, T: train_cli.main, R: rank_cli.rank_main}


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, good, tmp_path, no_ray, capsys):
    kind, name, command, setup, expected = case
    argv = setup(Ctx(tmp_path, good))
    before, good_before = _snapshot(tmp_path), _snapshot(good["run"].parent.parent)
    try:
        rc = MAINS[command](argv)
    except SystemExit as e:  # argparse usage errors exit from parse_args
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert expected in lines[0], lines[0]
    assert _snapshot(tmp_path) == before, "something was written"
    assert _snapshot(good["run"].parent.parent) == good_before
