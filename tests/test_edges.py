"""Edges only within the cutoff: neighbour lists, equality with all pairs, cache-sized steps."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMALL
from conftest import loss_weights as LossWeights

from dcmtune.config import ExperimentConfig, ModelConfig
from dcmtune.data import Bucket, concatenate, make_batch, neighbor_pairs, pair_capacity, pair_counts
from dcmtune.data.synthetic import make_synthetic
from dcmtune.model.dcmnet import DCMNet, init_params
from dcmtune.model.loss import finalize_metrics
from dcmtune.train.feed import step_molecules
from dcmtune.train.step import accumulated_grads

CUTOFF = SMALL["cutoff"]
# Two message passes of a small model: edges reach second neighbours' features too.
TINY = dict(SMALL, features=4, max_degree=1, num_basis_functions=4)


def test_pair_lists_hold_exactly_the_pairs_within_the_cutoff():
    # Atom 0-1: 1 A; 1-2: 4.0005 A (inside the 1e-3 A margin, kept); 0-2: 5 A; 3: padding.
    R = np.array([[[0, 0, 0], [1, 0, 0], [5, 0, 0], [0, 0, 0]]], float)
    R[0, 2, 0] = 5.0005
    real = np.array([[True, True, True, False]])
    pairs = neighbor_pairs(np.concatenate([R, R]), np.concatenate([real, ~real | ~real]), 4.0, 6)
    np.testing.assert_array_equal(pairs[0, :4], [[0, 1], [1, 0], [1, 2], [2, 1]])
    np.testing.assert_array_equal(pairs[0, 4:], 3)  # free slots: the self pair
    np.testing.assert_array_equal(pairs[1], 3)  # a molecule without atoms has no pairs
    assert pair_counts(R, real, 4.0).tolist() == [4]
    with pytest.raises(ValueError, match="more than the 3 slots"):
        neighbor_pairs(R, real, 4.0, 3)
    assert [pair_capacity(n) for n in (1, 9, 600, 936)] == [8, 10, 640, 1024]
    assert [pair_capacity(n, exact=True) for n in (0, 9, 936)] == [1, 9, 936]


@pytest.fixture(scope="module")
def spread():
    """Mixed small molecules plus two whose halves lie 8 A apart (pairs beyond the cutoff)."""
    small = make_synthetic(num_molecules=3, conformers=2, max_atoms=9, num_grid=40, seed=5)
    wide = make_synthetic(
        num_molecules=1, conformers=2, min_atoms=10, max_atoms=10, num_grid=40, seed=6
    )
    R = wide.R.copy()
    R[:, 5:10, 0] += 8.0
    return concatenate([small, dataclasses.replace(wide, R=R, com=wide.com + 4.0)])


def _params64(model, seed=0):
    """Parameters with every weight non-zero (at init, zero-initialised residual layers make
    message passing a no-op), in float64."""
    with jax.enable_x64(False):  # the model's float32 parameters, as trained
        params = jax.jit(lambda k: init_params(model, k))(jax.random.PRNGKey(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    noisy = [
        np.asarray(x, np.float64) + 0.3 * np.asarray(jax.random.normal(k, x.shape), np.float64)
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(tree, noisy)


def _stack(batch, k):
    """A batch as k micro-batches (scan steps), floats in float64."""
    return {
        key: jnp.asarray(v.astype(np.float64) if v.dtype.kind == "f" else v).reshape(
            (k, -1) + v.shape[1:]
        )
        for key, v in batch.items()
    }


def test_pruned_edges_give_the_all_pairs_loss_gradients_and_metrics(spread):
    model_config, model = ModelConfig(**TINY), DCMNet(**TINY)
    idx = np.arange(spread.num_conformers)
    B = len(idx) + 2  # two padded dummy molecules
    full = make_batch(spread, idx, B)
    pruned = make_batch(spread, idx, B, cutoff=CUTOFF, num_pairs=96)
    counts = (pruned["pairs"][..., 0] != pruned["pairs"][..., 1]).sum(1)
    n = full["atom_mask"].sum(1)
    assert (counts[-4:-2] < n[-4:-2] * (n[-4:-2] - 1)).all()  # the wide ones lose pairs
    assert (counts[-2:] == 0).all()
    lonely = dict(pruned, pairs=np.full_like(pruned["pairs"], full["R"].shape[1] - 1))
    hp = LossWeights(1000.0, 1.0, 0.1)
    p64 = _params64(model)
    with jax.enable_x64(True):
        grads = jax.jit(accumulated_grads, static_argnums=3)
        # All pairs in one step; the pairs within the cutoff, one molecule per scan step
        # (as the trainer feeds large molecules on a CPU).
        g_all, s_all = grads(p64, _stack(full, 1), hp, model_config)
        g, s = grads(p64, _stack(pruned, B), hp, model_config)
        for a, b in zip(jax.tree.leaves(g_all), jax.tree.leaves(g), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12 * np.abs(a).max())
        m_all, m = finalize_metrics(s_all, hp), finalize_metrics(s, hp)
        for key in s_all:
            np.testing.assert_allclose(s[key], s_all[key], rtol=1e-9, atol=1e-12, err_msg=key)
        for key in m_all:  # loss, esp_rmse, mono_mae, ...
            np.testing.assert_allclose(m[key], m_all[key], rtol=1e-9, atol=1e-12, err_msg=key)
        # The edges matter: without them the loss differs.
        _, s_none = grads(p64, _stack(lonely, B), hp, model_config)
        assert abs(finalize_metrics(s_none, hp)["loss"] / m_all["loss"] - 1) > 1e-3


def test_steps_hold_few_enough_edges_for_the_cache():
    model = ModelConfig()  # 16 features, degree 2: 576 bytes of features per edge
    big, small = Bucket(63, 1200, np.arange(3), 936, 4.0), Bucket(12, 1200, np.arange(3), 120)
    assert step_molecules(big, 8, model, backend="cpu") == 1
    assert step_molecules(Bucket(23, 1200, np.arange(3), 312), 8, model, backend="cpu") == 2
    assert step_molecules(small, 8, model, backend="cpu") == 8
    assert step_molecules(Bucket(12, 1200, np.arange(3)), 8, model, backend="cpu") == 4
    assert step_molecules(big, 6, ModelConfig(features=4), backend="cpu") == 3
    assert step_molecules(big, 8, model, backend="gpu") == 8


def test_prediction_uses_the_pairs(spread, monkeypatch):
    from dcmtune.predict.predictor import Predictor
    from dcmtune.train import step

    seen = []
    real = step.predict_batch
    monkeypatch.setattr(step, "predict_batch", lambda p, b, *a: seen.append(b) or real(p, b, *a))
    config = ExperimentConfig(model=ModelConfig(**TINY))
    model = DCMNet(**TINY)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _params64(model, 3))
    wide = [(spread.Z[i, :10], spread.R[i, :10]) for i in (6, 7)]  # halves 8 A apart
    preds = Predictor(None, config, params).predict(wide, batch_size=2)
    [batch] = seen
    assert (batch["pairs"][..., 0] != batch["pairs"][..., 1]).sum() < 2 * 10 * 9
    apply = jax.jit(lambda Z, R: model.apply({"params": params}, Z, R, Z > 0, jnp.zeros(2)))
    q, _ = apply(np.stack([Z for Z, _ in wide]), np.stack([R for _, R in wide]))
    for j, p in enumerate(preds):
        np.testing.assert_allclose(p.charges, q[j], rtol=1e-5, atol=1e-6)
