"""The trainer: exact accumulation, schedules, EMA, no recompiles, exact resume, top-k."""

import csv
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dcmtune.config import ExperimentConfig, ModelConfig, TrainingConfig
from dcmtune.data import load_dataset, make_batch, split_dataset
from dcmtune.data.baselines import element_charge_array, element_charges, esp_rmse_of_atom_charges
from dcmtune.data.synthetic import make_synthetic
from dcmtune.train import checkpoints as ckpt
from dcmtune.train.hparams import Hparams
from dcmtune.train.loop import TIMING_KEYS, fit
from dcmtune.train.schedules import learning_rate_at, lr_factor, lr_factor_schedule, make_optimizer
from dcmtune.train.step import (
    StepConfig,
    _init_state,
    _update,
    accumulated_grads,
    ema_decay_at,
    evaluate_params,
    hparams_of,
    init_state,
    predict_batch,
    train_step,
)

TINY = dict(n_dcm=2, features=8, max_degree=1, num_iterations=1, num_basis_functions=8)


@pytest.fixture(scope="module")
def data():
    return make_synthetic(
        num_molecules=12, conformers=2, min_atoms=3, max_atoms=7, num_grid=48, seed=11
    )


def _config(tmp_path, name="run", **training):
    t = dict(num_epochs=4, batch_size=4, learning_rate=3e-3, warmup_epochs=1, save_every_n_epochs=0)
    t.update(training)
    t["warmup_epochs"] = min(t["warmup_epochs"], t["num_epochs"] - 1)
    return ExperimentConfig(
        name=name,
        output_dir=str(tmp_path),
        random_seed=3,
        model=ModelConfig(**TINY),
        training=TrainingConfig(**t),
    ).replace(**{"data.valid_fraction": 0.25, "data.test_fraction": 0.0})


def _stack(data, idx, k):
    b = make_batch(data, np.asarray(idx))
    return {key: jnp.asarray(v.reshape((k, -1) + v.shape[1:])) for key, v in b.items()}


def test_accumulation_equals_one_big_batch(data, tmp_path):
    cfg = _config(tmp_path, learning_rate=1e-2, grad_clip_norm=0.05)
    idx = np.arange(8)  # molecules of different sizes end up in different micro-batches
    assert len(set(data.N[idx].tolist())) > 1
    hp = hparams_of(cfg.training, 10)
    state = init_state(cfg)
    # The gradients in float64, so that float32 summation order cannot hide a real difference.
    with jax.enable_x64(True):

        def f64(x):
            return x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x

        grads = jax.jit(accumulated_grads, static_argnums=3)
        p64 = jax.tree.map(f64, state.params)
        g1, s1 = grads(p64, jax.tree.map(f64, _stack(data, idx, 1)), hp, cfg.model)
        g4, s4 = grads(p64, jax.tree.map(f64, _stack(data, idx, 4)), hp, cfg.model)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-12)
        for k in s1:
            np.testing.assert_allclose(s4[k], s1[k], rtol=1e-5, atol=1e-12, err_msg=k)
        # One Adam update with clipping active (the gradient norm exceeds 0.05).
        assert float(optax.tree.norm(g1)) > 0.05
    static = StepConfig(cfg.model, True, True)
    step = jax.jit(train_step, static_argnums=3)
    p1 = step(state, _stack(data, idx, 1), hp, static)[0].params
    p4 = step(state, _stack(data, idx, 4), hp, static)[0].params
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-3 * 1e-2)


@pytest.mark.parametrize("k", [1, 4])
def test_schedules_closed_form(k):
    n_train, b, epochs, warm = 64, 4, 10, 2
    upe = n_train // (b * k)
    total, w, last = epochs * upe, warm * upe, epochs * upe - 1
    base = dict(
        num_epochs=epochs,
        batch_size=b,
        gradient_accumulation_steps=k,
        warmup_epochs=warm,
        min_lr_factor=0.1,
    )
    f = lr_factor_schedule(Hparams.of(TrainingConfig(lr_schedule_type="cosine", **base), upe))
    np.testing.assert_allclose(f(0), 1.0 / w, rtol=1e-6)
    np.testing.assert_allclose(f(w - 1), 1.0, rtol=1e-6)  # warmup end
    mid = w + (last - w) / 2
    np.testing.assert_allclose(f(mid), 0.1 + 0.9 * 0.5, rtol=1e-5)
    np.testing.assert_allclose(f(last), 0.1, rtol=1e-5)  # the last update reaches the floor
    f = lr_factor_schedule(Hparams.of(TrainingConfig(lr_schedule_type="exponential", **base), upe))
    np.testing.assert_allclose(f(w - 1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(f(mid), 0.1**0.5, rtol=1e-5)
    np.testing.assert_allclose(f(last), 0.1, rtol=1e-5)
    f = lr_factor_schedule(
        Hparams.of(
            TrainingConfig(lr_schedule_type="step", step_every_epochs=3, step_factor=0.5, **base),
            upe,
        )
    )
    for boundary, value in ((3, 0.5), (6, 0.25), (9, 0.125)):
        np.testing.assert_allclose(f(boundary * upe - 1), value * 2, rtol=1e-6)
        np.testing.assert_allclose(f(boundary * upe), value, rtol=1e-6)
    assert total == {1: 160, 4: 40}[k]


def test_optimizer_counts_updates_not_batches():
    # Adam's first steps on a constant gradient move each parameter by ~ -lr(t): the applied
    # learning rates follow the schedule update by update.
    hp = Hparams.for_schedule("cosine", 3, 12, 0.1, learning_rate=0.01, grad_clip_norm=1.0)
    tx = make_optimizer(hp, use_grad_clip=False)
    p = {"w": jnp.zeros(())}
    s = tx.init(p)
    for t in range(12):
        u, s = tx.update({"w": jnp.ones(())}, s, p)
        np.testing.assert_allclose(-u["w"], learning_rate_at(hp, t), rtol=1e-4)


def test_ema_closed_form_and_used_for_evaluation(data, tmp_path):
    cfg = _config(tmp_path, ema_decay=0.5)
    static = StepConfig(cfg.model, True, True)
    hp = hparams_of(cfg.training, 10)
    state = init_state(cfg)
    ema = state.params
    step = jax.jit(train_step, static_argnums=3)
    for t in range(3):
        state, _ = step(state, _stack(data, np.arange(4 * t, 4 * t + 4), 1), hp, static)
        d = min(0.5, (1 + t) / (10 + t))
        np.testing.assert_allclose(ema_decay_at(hp, float(t)), d, rtol=1e-6)
        ema = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * p, ema, state.params)
    for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(ema), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

    res = fit(cfg, data)
    last = res.history[-1]
    valid = data.subset(
        np.asarray(
            __import__("json").loads((res.run_dir / "split.json").read_text())["indices"]["valid"]
        )
    )
    m_ema = evaluate_params(res.ema_params, valid, cfg.model, batch_size=4)
    m_raw = evaluate_params(res.params, valid, cfg.model, batch_size=4)
    np.testing.assert_allclose(last["valid_esp_rmse"], m_ema["esp_rmse"], rtol=1e-5)
    assert abs(m_raw["esp_rmse"] - m_ema["esp_rmse"]) > 1e-6


def test_no_recompile_when_only_traced_values_change(data, tmp_path):
    # Every number of the training config is traced: loss weights, EMA, clipping, and every
    # schedule setting (type, warmup, floor, step settings, run length).
    before = _update._cache_size()
    res = fit(_config(tmp_path, "a"), data)
    n_update, n_eval = _update._cache_size(), predict_batch._cache_size()
    # At most 2 edge-count shapes per atom-size bucket (one today: a bucket's pair slots).
    bounds = ckpt.read_meta(res.run_dir / "checkpoints" / "latest")["bucket_bounds"]
    assert n_update - before <= 2 * len(bounds)
    n_init = _init_state._cache_size()
    variants = [
        dict(learning_rate=1e-4, esp_w=10.0, chg_w=3.0, ema_decay=0.9, grad_clip_norm=0.5),
        dict(num_epochs=3, warmup_epochs=2, min_lr_factor=0.3),
        dict(num_epochs=2, warmup_epochs=0, lr_schedule_type="exponential", min_lr_factor=0.05),
        dict(
            num_epochs=3,
            lr_schedule_type="step",
            step_every_epochs=1,
            step_factor=0.7,
            min_lr_factor=0.2,
        ),
        dict(num_epochs=2, use_lr_schedule=False),
    ]
    for i, v in enumerate(variants):
        cfg = _config(tmp_path, f"b{i}", **v)
        res = fit(cfg, data)
        upe = res.history[0]["step"]
        spec = Hparams.of(cfg.training, upe)
        for row in res.history:  # the logged rate is the closed form at the epoch's last update
            np.testing.assert_allclose(
                row["lr"],
                cfg.training.learning_rate * float(lr_factor(spec, row["step"] - 1, xp=np)),
                rtol=1e-6,
            )
    # One program each for all six runs (counted after the first: other tests add others).
    assert _update._cache_size() == n_update
    assert predict_batch._cache_size() == n_eval
    assert _init_state._cache_size() == n_init


def test_traced_schedule_matches_its_closed_form_inside_jit():
    # One jitted function serves every schedule; its values equal the host-side (numpy) ones.
    traces = []

    def factor(spec, c):
        traces.append(spec.schedule)  # runs once per trace (a new program), not per call
        return lr_factor(spec, c)

    f = jax.jit(factor)
    for kind in ("constant", "cosine", "exponential", "step"):
        spec = Hparams.for_schedule(kind, 4, 40, 0.1, 6, 0.5)
        counts = np.arange(45)
        np.testing.assert_allclose(f(spec, counts), lr_factor(spec, counts, xp=np), rtol=2e-6)
    assert len(traces) == 1
    w, last = 4, 39
    spec = Hparams.for_schedule("cosine", w, 40, 0.1)
    np.testing.assert_allclose(f(spec, np.arange(w)), (np.arange(w) + 1) / w, rtol=1e-6)
    np.testing.assert_allclose(f(spec, last), 0.1, rtol=1e-5)
    np.testing.assert_allclose(f(spec, last + 5), 0.1, rtol=1e-5)  # stays at the floor
    np.testing.assert_allclose(
        f(Hparams.for_schedule("exponential", 0, 11, 0.01), 5), 0.1, rtol=1e-5
    )
    np.testing.assert_allclose(
        f(Hparams.for_schedule("step", 0, 40, 0.2, 6, 0.5), [5, 6, 12, 18]),
        [1.0, 0.5, 0.25, 0.2],
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="lr_schedule_type"):
        Hparams.for_schedule("linear", 0, 10)


def _close_trees(a, b, atol=1e-6):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol)


def test_resume_is_exact(data, tmp_path):
    straight = fit(_config(tmp_path, "straight"), data)
    with pytest.raises(_Interrupt):  # stopped after epoch 2, like a killed process
        fit(_config(tmp_path, "resumed"), data, reporter=_StopAfter(2))
    latest = tmp_path / "resumed" / "checkpoints" / "latest"
    assert ckpt.read_meta(latest)["epoch"] == 2
    resumed = fit(_config(tmp_path, "resumed"), data, resume_from=latest)
    s_state, _ = ckpt.load_checkpoint(tmp_path / "straight" / "checkpoints" / "latest")
    r_state, _ = ckpt.load_checkpoint(tmp_path / "resumed" / "checkpoints" / "latest")
    _close_trees(s_state, r_state)  # params, opt_state, ema_params, step, rng
    assert len(resumed.history) == len(straight.history) == 4
    for a, b in zip(straight.history, resumed.history, strict=True):
        for k in a:
            if k not in TIMING_KEYS:
                np.testing.assert_allclose(b[k], a[k], atol=1e-6, err_msg=k)
    assert resumed.best_epoch == straight.best_epoch


class _StopAfter:
    """A reporter that interrupts the run after `n` epochs."""

    def __init__(self, n):
        self.n = n

    def __call__(self, epoch, metrics, checkpoint_dir):
        if epoch == self.n:
            raise _Interrupt


class _Interrupt(Exception):
    pass


def test_top_k_keeps_best_periodic_plus_best_and_latest(data, tmp_path):
    res = fit(
        _config(tmp_path, "topk", num_epochs=6, save_every_n_epochs=1, keep_top_k_checkpoints=2),
        data,
    )
    names = sorted(p.name for p in (res.run_dir / "checkpoints").iterdir())
    ranked = sorted(res.history, key=lambda r: r["valid_loss"])[:2]
    expected = sorted(["best", "latest"] + [f"epoch_{r['epoch']}" for r in ranked])
    assert names == expected
    with open(res.run_dir / "history.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]


def test_altered_or_truncated_state_is_refused(data, tmp_path):
    res = fit(_config(tmp_path, "corrupt", num_epochs=1), data)
    latest = res.run_dir / "checkpoints" / "latest"
    state_file = latest / ckpt.STATE_FILE
    blob = state_file.read_bytes()
    state_file.write_bytes(blob[:-10])
    with pytest.raises(ckpt.CheckpointError, match="checksum mismatch"):
        ckpt.load_checkpoint(latest)
    altered = bytearray(blob)
    altered[len(altered) // 2] ^= 0xFF
    state_file.write_bytes(bytes(altered))
    with pytest.raises(ckpt.CheckpointError, match="checksum mismatch"):
        ckpt.load_checkpoint(latest)
    state_file.write_bytes(blob)
    state, meta = ckpt.load_checkpoint(latest)
    assert meta["epoch"] == 1 and "ema_params" in state


def test_fresh_run_refuses_to_overwrite_checkpoints(data, tmp_path):
    fit(_config(tmp_path, "keep", num_epochs=1), data)
    with pytest.raises(ckpt.CheckpointError, match="already holds checkpoints"):
        fit(_config(tmp_path, "keep", num_epochs=1), data)


def test_train_molecules_is_trained_on_and_recorded(data, tmp_path):
    cfg = _config(tmp_path, "few", num_epochs=1).replace(**{"data.train_molecules": 4})
    res = fit(cfg, data)
    split = __import__("json").loads((res.run_dir / "split.json").read_text())
    assert split["settings"]["train_molecules"] == 4 and len(split["mol_ids"]["train"]) == 4
    assert len(split["indices"]["train"]) == 8  # both conformers of each of the 4 molecules
    full = split_dataset(data, dataclasses.replace(cfg.data, train_molecules=None))
    assert split["indices"]["valid"] == full["valid"].tolist()
    assert len(full["train"]) > 8 and len(res.history) == 1


def test_learning_is_real_on_unseen_molecules(tmp_path):
    syn = make_synthetic(num_molecules=40, conformers=4, max_atoms=8, num_grid=64, seed=0)
    cfg = ExperimentConfig(
        name="learn",
        output_dir=str(tmp_path),
        random_seed=0,
        model=ModelConfig(
            n_dcm=1, features=32, max_degree=1, num_iterations=2, num_basis_functions=8
        ),
        training=TrainingConfig(
            num_epochs=40,
            batch_size=8,
            learning_rate=5e-3,
            chg_w=1.0,
            warmup_epochs=0,
            ema_decay=0.99,
            save_every_n_epochs=0,
        ),
    ).replace(**{"data.valid_fraction": 0.2, "data.test_fraction": 0.0})
    res = fit(cfg, syn)
    split = __import__("json").loads((res.run_dir / "split.json").read_text())
    train, valid = (syn.subset(np.asarray(split["indices"][k])) for k in ("train", "valid"))
    assert not set(train.mol_id) & set(valid.mol_id)
    model_rmse = res.history[-1]["valid_esp_rmse"]
    ref_rms = (
        math.sqrt(
            np.mean(
                [np.mean(valid.esp[i, : valid.n_grid[i]] ** 2) for i in range(valid.num_conformers)]
            )
        )
        * 627.509474
    )
    table = element_charges(train)
    baseline = esp_rmse_of_atom_charges(valid, element_charge_array(valid, table))
    print(
        f"valid ESP RMSE {model_rmse:.3f}, reference RMS {ref_rms:.3f}, "
        f"per-element baseline {baseline:.3f} kcal/mol/e"
    )
    assert model_rmse <= 0.1 * ref_rms
    assert model_rmse < baseline


def test_default_training_beats_atom_centred_charges_on_lone_pairs(tmp_path):
    # H2O and NH3 from the demo set: their lone pairs put charge off the atoms, so no set of
    # atom-centred charges fits their ESP well (the stored per-conformer least-squares `mono`
    # charges leave 1.5 kcal/mol/e). The default training (a narrower default model, for
    # speed) with two charges per atom must fit the conformers it trained on better than that.
    demo = load_dataset()
    d = demo.subset(np.flatnonzero(np.isin(demo.mol_id, ["H2O", "NH3"])))
    A, G = int(d.N.max()), int(d.n_grid.max())
    d = dataclasses.replace(
        d, R=d.R[:, :A], Z=d.Z[:, :A], mono=d.mono[:, :A], esp=d.esp[:, :G], grid=d.grid[:, :G]
    )
    cfg = ExperimentConfig(
        name="lone_pairs",
        output_dir=str(tmp_path),
        random_seed=0,
        model=ModelConfig(features=8),
        training=TrainingConfig(num_epochs=30, batch_size=2, save_every_n_epochs=0),
    ).replace(
        **{"data.split_by": "conformer", "data.valid_fraction": 0.1, "data.test_fraction": 0.0}
    )
    res = fit(cfg, d)
    split = __import__("json").loads((res.run_dir / "split.json").read_text())
    train = d.subset(np.asarray(split["indices"]["train"]))
    model_rmse = evaluate_params(res.ema_params, train, cfg.model)["esp_rmse"]
    mono_rmse = esp_rmse_of_atom_charges(train, train.mono)
    print(f"train ESP RMSE {model_rmse:.3f}, stored mono charges {mono_rmse:.3f} kcal/mol/e")
    assert model_rmse < 0.8 * mono_rmse
