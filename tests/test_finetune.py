"""Fine-tuning (issue 23 item 2): `training.init_from` / `--init-from` start a run from another
model's weights with a fresh optimizer and step count; `--freeze` keeps parameter groups
bit-identical; a mismatched architecture is refused with one line before anything is written."""

import json

import jax
import numpy as np
import pytest
from conftest import TINY_PREDICT

from dcmtune.analysis.checkpoints import open_checkpoint
from dcmtune.config import ConfigError, ExperimentConfig, ModelConfig, TrainingConfig
from dcmtune.model.groups import param_group
from dcmtune.models import model_dir
from dcmtune.sweep.spec import SpecError, spec_from_dict
from dcmtune.train import checkpoints as ckpt
from dcmtune.train import finetune
from dcmtune.train.commands import main as train_main
from dcmtune.train.loop import fit
from dcmtune.train.step import evaluate_params, init_state


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True)
    )


def _config(source, **training) -> ExperimentConfig:
    t = dict(num_epochs=1, batch_size=4, warmup_epochs=0, save_every_n_epochs=0)
    t.update(training)
    return ExperimentConfig(
        name="ft",
        random_seed=3,
        model=ModelConfig(**TINY_PREDICT),
        training=TrainingConfig(init_from=str(source), **t),
    )


def _state(checkpoint):
    meta = ckpt.read_meta(checkpoint)
    state, _ = ckpt.load_checkpoint(
        checkpoint, template=init_state(ExperimentConfig.from_dict(meta["config"]))
    )
    return state, meta


def test_param_groups_partition_the_model(small_model):
    _, params = small_model  # conftest.SMALL: 2 message passes, n_dcm 2
    groups = {k: param_group(k, 2) for k in params}
    assert {k for k, g in groups.items() if g == "embedding"} == {"Embed_0"}
    assert {k for k, g in groups.items() if g == "message_passing"} == {
        "MessagePass_0",
        "MessagePass_1",
        "Dense_0",
        "Dense_1",
        "Dense_2",
        "Dense_3",
    }
    heads = {k for k, g in groups.items() if g == "head"}
    assert heads == {"Dense_4", "Dense_5", "Dense_6"}
    # The heads are the read-outs: the displacement and charge layers end in n_dcm outputs.
    assert params["Dense_4"]["0+"]["kernel"].shape[-1] == 2
    assert params["Dense_6"]["kernel"].shape[-1] == 2
    for bad in ("Dense_7", "MessagePass_2", "Foo_0"):
        with pytest.raises(ValueError, match=bad):
            param_group(bad, 2)


def test_the_first_weights_are_the_sources_with_a_fresh_optimizer(tiny_predict_run, synthetic):
    source = open_checkpoint(tiny_predict_run)  # evaluates its EMA weights
    cfg = _config(tiny_predict_run)
    src = finetune.open_source(cfg.training.init_from, cfg.model)
    state = finetune.start_from(init_state(cfg), src, use_ema=True)
    assert _leaves_equal(state.ema_params, source.params)
    assert int(state.step) == 0
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state.opt_state))
    # Before its first update the model predicts exactly what the source predicts.
    assert evaluate_params(state.ema_params, synthetic, cfg.model) == evaluate_params(
        source.params, synthetic, cfg.model
    )
    # A run without EMA evaluates its parameters: they start from the source's evaluated ones.
    plain = finetune.start_from(init_state(cfg), src, use_ema=False)
    assert _leaves_equal(plain.params, source.params)


def test_a_fine_tuned_run_counts_from_zero_and_records_its_source(
    tiny_predict_run, synthetic, tmp_path
):
    cfg = _config(tiny_predict_run)
    result = fit(cfg, synthetic, run_dir=tmp_path / "ft")
    assert result.status == "completed" and len(result.history) == 1
    _, source_meta = _state(tiny_predict_run / "checkpoints" / "best")
    _, meta = _state(tmp_path / "ft" / "checkpoints" / "latest")
    assert meta["epoch"] == 1
    assert meta["step"] == result.history[0]["step"] == source_meta["step"]  # one epoch each
    rec = meta["init_from"]
    assert rec["checkpoint"] == str((tiny_predict_run / "checkpoints" / "best").resolve())
    assert rec["state_sha256"] == source_meta["state_sha256"] and rec["frozen"] == []
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert saved["training"]["init_from"] == str(tiny_predict_run)


def test_freezing_keeps_the_frozen_groups_bit_identical(tiny_predict_run, synthetic, tmp_path):
    cfg = _config(tiny_predict_run, freeze=["embedding", "message_passing"])
    assert fit(cfg, synthetic, run_dir=tmp_path / "ft").status == "completed"
    before, _ = _state(tiny_predict_run / "checkpoints" / "best")
    after, meta = _state(tmp_path / "ft" / "checkpoints" / "latest")
    assert meta["init_from"]["frozen"] == ["embedding", "message_passing"]
    n = cfg.model.num_iterations
    for key in before.params:
        same = _leaves_equal(before.params[key], after.params[key])
        same_ema = _leaves_equal(before.ema_params[key], after.ema_params[key])
        if param_group(key, n) == "head":
            assert not same and not same_ema, key  # the heads trained
        else:
            assert same and same_ema, key


def test_config_refuses_freeze_without_a_source_and_unknown_groups():
    with pytest.raises(ConfigError, match=r"training\.freeze: expected \[\] without init_from"):
        TrainingConfig(freeze=["embedding"])
    with pytest.raises(ConfigError, match=r"training\.freeze\[0\]: expected embedding or"):
        TrainingConfig(init_from="x", freeze=["heads"])


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--features", "12"], "another architecture: model.features = 12 here, 8"),
        (["--init-from", "no-such-model"], "not a shipped model"),
    ],
)
def test_a_source_that_does_not_fit_exits_2_and_writes_nothing(
    tiny_predict_run, tiny_data_file, tmp_path, capsys, flags, expected
):
    tiny = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_PREDICT.items()]
    tiny += ["--data-files", str(tiny_data_file), "--init-from", str(tiny_predict_run)]
    code = train_main(
        [*tiny, "--output-dir", str(tmp_path / "out")] + ["--name", "ft", "--quiet", *flags]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "out").exists()


def test_a_shipped_model_is_a_source_by_name():
    src = finetune.open_source("organic-v1", ModelConfig())  # the defaults: its model
    assert src.path == model_dir("organic-v1") and src.meta["epoch"] >= 1


def test_a_spec_resolves_its_source_and_keeps_the_model_fixed(tiny_predict_run, tmp_path):
    raw = {
        "name": "ft",
        "model": dict(TINY_PREDICT),
        "training": {"init_from": "run", "num_epochs": 4},
        "search": {"training.learning_rate": {"loguniform": [1e-3, 1e-2]}},
    }
    (tmp_path / "run").symlink_to(tiny_predict_run, target_is_directory=True)
    spec = spec_from_dict(raw, base_dir=tmp_path)
    assert spec.base.training.init_from == str(tiny_predict_run.resolve())
    with pytest.raises(SpecError, match=r"search\.model\.d_max: a sweep that fine-tunes"):
        spec_from_dict({**raw, "search": {"model.d_max": {"choice": [0.4, 0.5]}}}, tmp_path)
    with pytest.raises(SpecError, match=r"another architecture: model\.n_dcm = 3"):
        spec_from_dict({**raw, "model": {**TINY_PREDICT, "n_dcm": 3}}, tmp_path)
