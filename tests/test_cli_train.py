"""`python -m dcmtune.train`: flags, clipping switch, and clean failures (exit 2, nothing
written)."""

import numpy as np
import optax
import pytest

from dcmtune.cli import format_epoch_table
from dcmtune.data.synthetic import make_synthetic
from dcmtune.train import checkpoints as ckpt
from dcmtune.train.commands import build_train_parser
from dcmtune.train.commands import main as train_main

TINY = [
    "--n-dcm",
    "2",
    "--features",
    "8",
    "--max-degree",
    "1",
    "--num-iterations",
    "1",
    "--num-basis-functions",
    "8",
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
]


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    d = make_synthetic(
        num_molecules=12, conformers=2, min_atoms=3, max_atoms=7, num_grid=48, seed=11
    )
    path = tmp_path_factory.mktemp("data") / "syn.npz"
    np.savez(
        path,
        R=d.R,
        Z=d.Z,
        N=d.N,
        esp=d.esp,
        vdw_surface=d.grid,
        n_grid=d.n_grid,
        mono=d.mono,
        Dxyz=d.dipole,
        com=d.com,
        Q=d.Q,
        mol_id=d.mol_id,
    )
    return path


def test_every_config_field_has_a_flag():
    p = build_train_parser()
    flags = {a for action in p._actions for a in action.option_strings}
    for f in (
        "--name",
        "--output-dir",
        "--random-seed",
        "--data-files",
        "--num-train",
        "--num-valid",
        "--n-dcm",
        "--features",
        "--max-degree",
        "--num-iterations",
        "--num-epochs",
        "--batch-size",
        "--learning-rate",
        "--gradient-accumulation-steps",
        "--esp-w",
        "--chg-w",
        "--use-grad-clip",
        "--no-use-grad-clip",
        "--grad-clip-norm",
        "--use-lr-schedule",
        "--no-use-lr-schedule",
        "--lr-schedule-type",
        "--warmup-epochs",
        "--min-lr-factor",
        "--use-ema",
        "--no-use-ema",
        "--ema-decay",
        "--save-every-n-epochs",
        "--keep-top-k-checkpoints",
        "--restart-checkpoint",
        "--config",
        "--include-pseudotensors",
        "--d-max",
        "--split-seed",
    ):
        assert f in flags, f


def _mu_norm(run_dir):
    state, _ = ckpt.load_checkpoint(run_dir / "checkpoints" / "latest")
    # opt_state = (clip state?, adam state, schedule state); find Adam's first moment.
    adam = [s for s in state["opt_state"].values() if isinstance(s, dict) and "mu" in s][0]
    return float(optax.tree.norm(adam["mu"]))


def test_no_use_grad_clip_really_disables_clipping(npz, tmp_path, capsys):
    common = TINY + [
        "--data-files",
        str(npz),
        "--output-dir",
        str(tmp_path),
        "--num-epochs",
        "1",
        "--grad-clip-norm",
        "1e-6",
        "--quiet",
    ]
    assert train_main(common + ["--name", "clip"]) == 0
    assert train_main(common + ["--name", "noclip", "--no-use-grad-clip"]) == 0
    clipped, free = _mu_norm(tmp_path / "clip"), _mu_norm(tmp_path / "noclip")
    assert clipped <= 1e-6  # every accumulated gradient was clipped to norm 1e-6
    assert free > 1e-3


def test_table_is_printed(npz, tmp_path, capsys):
    assert (
        train_main(
            TINY
            + [
                "--data-files",
                str(npz),
                "--output-dir",
                str(tmp_path),
                "--num-epochs",
                "2",
                "--name",
                "table",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Epoch 2/2" in out and "Metric" in out and "% Diff" in out
    assert "esp_rmse [kcal/mol/e]" in out and "avg batch time" in out


def test_missing_data_file_exits_2_and_writes_nothing(tmp_path, capsys):
    out_dir = tmp_path / "out"
    code = train_main(
        TINY
        + [
            "--data-files",
            str(tmp_path / "missing.npz"),
            "--output-dir",
            str(out_dir),
            "--name",
            "x",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "missing.npz" in err
    assert not out_dir.exists()


def test_restart_from_another_architecture_exits_2_and_writes_nothing(npz, tmp_path, capsys):
    base = TINY + [
        "--data-files",
        str(npz),
        "--output-dir",
        str(tmp_path),
        "--num-epochs",
        "1",
        "--quiet",
    ]
    assert train_main(base + ["--name", "small"]) == 0
    capsys.readouterr()
    code = train_main(
        base
        + ["--name", "big", "--features", "12", "--restart-checkpoint", str(tmp_path / "small")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "architecture" in err
    assert not (tmp_path / "big").exists()


def test_bad_flag_value_exits_2(capsys):
    assert train_main(["--lr-schedule-type", "linear"]) == 2
    assert "training.lr_schedule_type" in capsys.readouterr().err


def test_epoch_table_format():
    m = {"epoch": 3, "step": 30, "lr": 1e-3, "best_epoch": 3, "batch_time": 0.01, "epoch_time": 1.0}
    for split, v in (("train", 1.0), ("valid", 1.5)):
        for k in (
            "loss",
            "esp_rmse",
            "esp_mae",
            "mono_mae",
            "mono_rmse",
            "mono_mean",
            "mono_std",
            "dipole_mae",
        ):
            m[f"{split}_{k}"] = v
    table = format_epoch_table(3, 10, m)
    assert "*best*" in table and "50.0%" in table
