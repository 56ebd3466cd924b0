"""Size buckets and streaming: same losses and gradients as padding, every conformer once per
epoch in a seeded order, streamed data trains exactly like device-resident data, and old
checkpoints (trained padded) are recognised on restart."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcmtune.config import DataConfig, ExperimentConfig, ModelConfig, TrainingConfig
from dcmtune.data import batches as batching
from dcmtune.data import bucket_bounds, concatenate, group_by_bucket, make_batch, size_bucket
from dcmtune.data.synthetic import make_synthetic
from dcmtune.model.dcmnet import build_model, init_params
from dcmtune.model.loss import finalize_metrics
from dcmtune.train import checkpoints as ckpt
from dcmtune.train.loop import fit
from dcmtune.train.restart import check_resume_config as _check_resume_config
from dcmtune.train.step import accumulated_grads, hparams_of

TINY = ModelConfig(n_dcm=2, features=4, max_degree=1, num_iterations=1, num_basis_functions=4)


@pytest.fixture(scope="module")
def mixed():
    """Small (3-4 atoms, <= 30 grid points) and larger (8-9 atoms, <= 60) molecules."""
    small = make_synthetic(
        num_molecules=6, conformers=4, min_atoms=3, max_atoms=4, num_grid=30, seed=1
    )
    large = make_synthetic(
        num_molecules=5, conformers=4, min_atoms=8, max_atoms=9, num_grid=60, seed=2
    )
    return concatenate([small, large])


def test_bounds_follow_the_data_and_group_by_bucket_uses_them():
    # Two size clusters: two buckets, each bound the largest size in it.
    sizes = np.array([3] * 40 + [4] * 40 + [11] * 40 + [12] * 40)
    bounds = bucket_bounds(
        sizes, sizes * 10, lambda a, g: a * a, slots=8, max_buckets=4, min_members=32
    )
    assert bounds[-1] == 12 and 4 in bounds and len(bounds) <= 4
    assert bucket_bounds(sizes, sizes, lambda a, g: a * a, 8, max_buckets=1) == [12]
    assert size_bucket(5, bounds=[4, 9, 12]) == 9
    groups = group_by_bucket([3, 12, 5, 9], bounds=[4, 9, 12])
    assert {k: v.tolist() for k, v in groups.items()} == {4: [0], 9: [2, 3], 12: [1]}
    with pytest.raises(ValueError, match="above the largest bound"):
        size_bucket(13, bounds=[4, 12])


def test_epoch_uses_every_conformer_once_in_a_seeded_order(mixed):
    buckets = batching.plan_buckets(mixed, batch_size=2, accumulation=2, max_buckets=4)
    assert len(buckets) >= 2
    assert buckets[0].num_atoms < buckets[-1].num_atoms
    assert buckets[0].num_grid < buckets[-1].num_grid  # grids trimmed per bucket

    def visited(key):
        ups = batching.epoch_updates(buckets, 2, 2, key)
        seen = [buckets[i].members[p] for i, pos in ups for p in pos.reshape(-1) if p >= 0]
        return ups, np.asarray(seen)

    key = jax.random.PRNGKey(0)
    ups, seen = visited(jax.random.fold_in(key, 1))
    assert sorted(seen.tolist()) == list(range(mixed.num_conformers))
    assert len(ups) == batching.num_updates(buckets, 4)
    assert all(pos.shape == (2, 2) for _, pos in ups)
    _, again = visited(jax.random.fold_in(key, 1))
    _, other = visited(jax.random.fold_in(key, 2))
    np.testing.assert_array_equal(seen, again)  # seeded: a resumed epoch repeats it
    assert not np.array_equal(seen, other)
    assert len({i for i, _ in ups[:4]}) > 1 or len({i for i, _ in ups[-4:]}) > 1  # mixed order


def test_bucketed_batch_has_the_loss_and_gradients_of_the_padded_batch(mixed):
    cfg = ExperimentConfig(model=TINY)
    hp = hparams_of(cfg.training, 1)
    params = jax.jit(lambda k: init_params(build_model(TINY), k))(jax.random.PRNGKey(1))
    buckets = batching.plan_buckets(mixed, batch_size=2, accumulation=2, max_buckets=4)
    small = buckets[0]
    idx = small.members[:3]  # 3 molecules + 1 dummy in a (2, 2) update

    def stacked(batch):
        return {k: jnp.asarray(v.reshape((2, 2) + v.shape[1:])) for k, v in batch.items()}

    bucketed = stacked(make_batch(mixed, idx, 4, small.num_atoms, small.num_grid))
    padded = stacked(make_batch(mixed, idx, 4))
    assert bucketed["R"].shape[2] < padded["R"].shape[2]
    assert bucketed["esp"].shape[2] < padded["esp"].shape[2]
    grads = jax.jit(accumulated_grads, static_argnums=3)
    g_b, s_b = grads(params, bucketed, hp, TINY)
    g_p, s_p = grads(params, padded, hp, TINY)
    for a, b in zip(jax.tree.leaves(g_b), jax.tree.leaves(g_p), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-9)
    for k in s_p:  # q_sum of neutral molecules is ~0: an absolute floor
        np.testing.assert_allclose(float(s_b[k]), float(s_p[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    w = hp
    loss_b, loss_p = finalize_metrics(s_b, w)["loss"], finalize_metrics(s_p, w)["loss"]
    assert loss_b > 0
    np.testing.assert_allclose(loss_b, loss_p, rtol=1e-5)
    assert float(s_b["n_mol"]) == 3.0  # the dummy molecule counts nowhere


def _config(tmp_path, name, budget):
    return ExperimentConfig(
        name=name,
        output_dir=str(tmp_path),
        random_seed=5,
        model=TINY,
        data=DataConfig(
            valid_fraction=0.2, test_fraction=0.0, max_buckets=2, device_data_budget_mb=budget
        ),
        training=TrainingConfig(
            num_epochs=2, batch_size=2, learning_rate=3e-3, warmup_epochs=0, save_every_n_epochs=0
        ),
    )


def test_streamed_data_trains_like_device_resident_data(mixed, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(batching, "COMPILE_COST", 0.0)  # two buckets even for two epochs
    caplog.set_level("INFO", logger="dcmtune.train")
    resident = fit(_config(tmp_path, "resident", 1024.0), mixed)
    assert "device-resident" in caplog.text and "streamed" not in caplog.text
    streamed = fit(_config(tmp_path, "streamed", 0.0), mixed)
    assert "streamed from host memory" in caplog.text
    assert len(streamed.history) == 2
    # The same batches through the same compiled programs: equal to the last bit.
    for a, b in zip(
        jax.tree.leaves(resident.params), jax.tree.leaves(streamed.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(resident.history) == len(streamed.history) == 2
    for ra, rb in zip(resident.history, streamed.history, strict=True):
        for k in ("step", "train_loss", "valid_loss", "valid_esp_rmse", "train_esp_rmse"):
            assert rb[k] == ra[k], k


def test_restart_names_batching_of_checkpoints_from_before_buckets(tmp_path):
    now = ExperimentConfig()
    old = now.to_dict()
    for key in ("batching", "max_buckets", "device_data_budget_mb"):
        del old["data"][key]  # a checkpoint written before these keys existed
    meta = {"config": old}
    with pytest.raises(
        ckpt.CheckpointError,
        match="data.batching = 'bucketed' differs from the checkpoint's 'padded'",
    ):
        _check_resume_config(meta, now, tmp_path)
    padded = now.replace(**{"data.batching": "padded", "data.device_data_budget_mb": 5.0})
    assert _check_resume_config(meta, padded, tmp_path) == {
        "data.device_data_budget_mb": [1024.0, 5.0]
    }
