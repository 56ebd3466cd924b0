"""DCMNet behaviour: padding inert, E(3) equivariance, permutation, bounds, neutrality."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMALL, batch_of
from conftest import loss_weights as LossWeights
from scipy.spatial.transform import Rotation

from dcmtune.data import pad_to
from dcmtune.data.synthetic import make_synthetic
from dcmtune.model.dcmnet import DCMNet, init_params
from dcmtune.model.loss import loss_and_sums, predict_observables

CHG = dict(rtol=1e-5, atol=1e-6)
ESP = dict(rtol=1e-5, atol=1e-7)
W = LossWeights(1000.0, 1.0, 0.1)


@pytest.fixture(scope="module")
def pseudo_model():
    model = DCMNet(**dict(SMALL, include_pseudotensors=True))
    params = jax.jit(lambda k: init_params(model, k))(jax.random.PRNGKey(1))
    return model, params


def _outputs(fn, params, batch):
    q, pos = fn(params, batch)
    esp, mono, dip = predict_observables(q, pos, batch)
    loss, _ = loss_and_sums(q, pos, batch, W)
    return q, pos, esp, loss


def _outputs64(model, params, batch):
    """Outputs computed in float64, for comparisons at the ESP tolerance (rtol 1e-5, atol 1e-7)
    after moves of 10 Angstrom, where float32 rounding of coordinates alone is ~1e-6 A."""
    with jax.enable_x64(True):

        def f64(x):
            x = jnp.asarray(x)
            return x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x

        p64 = jax.tree.map(f64, params)
        b64 = {k: f64(v) for k, v in batch.items()}
        fn = jax.jit(
            lambda p, b: model.apply({"params": p}, b["Z"], b["R"], b["atom_mask"], b["Q"])
        )
        return [np.asarray(o) for o in _outputs(fn, p64, b64)]


def test_padding_atoms_and_grid_points_change_nothing(small_model):
    model, params = small_model
    data = make_synthetic(num_molecules=3, conformers=1, max_atoms=8, num_grid=150, seed=3)
    results = []
    for A, G in ((12, 200), (30, 500)):
        b = batch_of(pad_to(data, A, G))
        results.append((b, *_outputs64(model, params, b)))
    (b1, q1, p1, e1, l1), (b2, q2, p2, e2, l2) = results
    n = 12
    np.testing.assert_allclose(q1, q2[:, :n], **CHG)
    np.testing.assert_array_equal(q2[:, n:], 0.0)
    real = np.asarray(b1["atom_mask"])
    np.testing.assert_allclose(p1[real], p2[:, :n][real], **CHG)
    np.testing.assert_allclose(e1, e2[:, :200], **ESP)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)


def _transform(batch, M, t):
    """Rotates/reflects by M and translates by t, in float64 numpy (exact inputs for
    `_outputs64`)."""
    batch = {
        k: (np.asarray(v, np.float64) if np.asarray(v).dtype.kind == "f" else np.asarray(v))
        for k, v in batch.items()
    }
    M, t = np.asarray(M, np.float64), np.asarray(t, np.float64)
    R = np.where(batch["atom_mask"][..., None], batch["R"] @ M.T + t, 0.0)
    return dict(
        batch,
        R=R,
        grid=batch["grid"] @ M.T + t,
        com=batch["com"] @ M.T + t,
        dipole=batch["dipole"] @ M.T,
    )


@pytest.mark.parametrize("pseudo", [False, True], ids=["tensors", "pseudotensors"])
@pytest.mark.parametrize("kind", ["rotation", "reflection"])
def test_e3_equivariance(kind, pseudo, synthetic, small_model, apply_fn, pseudo_model):
    model, params = pseudo_model if pseudo else small_model
    b = batch_of(synthetic)
    M = Rotation.random(random_state=7).as_matrix()
    if kind == "reflection":
        M = M @ np.diag([1.0, -1.0, 1.0])
    t = np.asarray([10.0, -6.0, 4.0])
    q, pos, esp, loss = _outputs64(model, params, b)
    b2 = _transform(b, M, t)
    q2, pos2, esp2, loss2 = _outputs64(model, params, b2)
    real = np.asarray(b["atom_mask"])
    np.testing.assert_allclose(q2, q, **CHG)
    np.testing.assert_allclose(np.asarray(pos2)[real], (pos @ M.T + t)[real], **CHG)
    np.testing.assert_allclose(esp2, esp, **ESP)
    np.testing.assert_allclose(loss2, loss, rtol=1e-5)


def test_translation_only(synthetic, small_model):
    model, params = small_model
    b = batch_of(synthetic)
    q, pos, esp, loss = _outputs64(model, params, b)
    t = np.asarray([-10.0, 10.0, 10.0])
    q2, pos2, esp2, loss2 = _outputs64(model, params, _transform(b, np.eye(3), t))
    real = np.asarray(b["atom_mask"])
    np.testing.assert_allclose(q2, q, **CHG)
    np.testing.assert_allclose(np.asarray(pos2)[real], (pos + t)[real], **CHG)
    np.testing.assert_allclose(esp2, esp, **ESP)
    np.testing.assert_allclose(loss2, loss, rtol=1e-5)


def test_permuting_atoms_permutes_outputs(synthetic, small_model):
    model, params = small_model
    b = batch_of(synthetic, [0])
    n = int(b["atom_mask"].sum())
    perm = np.concatenate([np.random.default_rng(0).permutation(n), np.arange(n, b["Z"].shape[1])])
    b2 = dict(
        b,
        R=b["R"][:, perm],
        Z=b["Z"][:, perm],
        atom_mask=b["atom_mask"][:, perm],
        mono=b["mono"][:, perm],
    )
    q, pos, esp, loss = _outputs64(model, params, b)
    q2, pos2, esp2, loss2 = _outputs64(model, params, b2)
    np.testing.assert_allclose(q2, q[:, perm], **CHG)
    np.testing.assert_allclose(pos2, pos[:, perm], **CHG)
    np.testing.assert_allclose(esp2, esp, **ESP)
    np.testing.assert_allclose(loss2, loss, rtol=1e-5)


def test_displacements_not_trivial_at_init(synthetic, small_model, apply_fn):
    _, params = small_model
    b = batch_of(synthetic)
    _, pos = apply_fn(params, b)
    d = np.linalg.norm(np.asarray(pos - b["R"][:, :, None, :]), axis=-1)
    assert d[np.asarray(b["atom_mask"])].mean() > 1e-3


def test_cutoff_locality_on_uncorrected_charges(small_model, apply_fn):
    # Two far-apart fragments in one molecule: moving fragment B (beyond the cutoff of atom 0)
    # leaves atom 0's charges (up to the shared neutrality shift) unchanged, while moving an
    # atom within the cutoff changes them.
    model, params = small_model

    def charges(R):
        Z = jnp.asarray([[6, 8, 1, 1]])
        q, _ = apply_fn(
            params, {"Z": Z, "R": jnp.asarray([R]), "atom_mask": Z > 0, "Q": jnp.zeros(1)}
        )
        return q[0, 0] - q[0, 0].mean()  # atom 0's charges minus their mean: shift-free

    base = [[0.0, 0.0, 0.0], [1.2, 0.0, 0.0], [20.0, 0.0, 0.0], [20.0, 1.0, 0.0]]
    far_moved = [base[0], base[1], [20.0, 2.0, 1.0], [21.0, 1.0, 0.5]]
    near_moved = [base[0], [1.0, 0.6, 0.2], base[2], base[3]]
    np.testing.assert_allclose(charges(far_moved), charges(base), atol=1e-6)
    assert float(jnp.abs(charges(near_moved) - charges(base)).max()) > 1e-5


def test_displacements_bounded_even_with_huge_parameters(synthetic, small_model, apply_fn):
    _, params = small_model
    big = jax.tree.map(lambda x: x * 1e3, params)
    b = batch_of(synthetic)
    q, pos = apply_fn(big, b)
    d = np.linalg.norm(np.asarray(pos - b["R"][:, :, None, :]), axis=-1)
    assert np.all(np.isfinite(d)) and np.all(np.isfinite(np.asarray(q)))
    assert d.max() <= SMALL["d_max"] * (1 + 1e-6)
    assert d.max() > 0.5 * SMALL["d_max"]  # the bound is reached, not trivially satisfied


@pytest.mark.parametrize("Q", [0.0, 1.0, -1.0])
def test_charges_sum_to_total_charge(Q, synthetic, small_model, apply_fn):
    _, params = small_model
    b = batch_of(synthetic)
    b = dict(b, Q=jnp.full_like(b["Q"], Q))
    q, _ = apply_fn(params, b)
    np.testing.assert_allclose(q.sum(axis=(1, 2)), Q, atol=1e-5)


def test_heavy_elements_up_to_krypton(small_model, apply_fn):
    _, params = small_model
    Z = jnp.asarray([[36, 35, 17, 6]])
    R = jnp.asarray([[[0.0, 0.0, 0.0], [2.5, 0.0, 0.0], [0.0, 2.4, 0.0], [0.0, 0.0, 2.0]]])
    q, pos = apply_fn(params, {"R": R, "Z": Z, "atom_mask": Z > 0, "Q": jnp.zeros(1)})
    assert np.all(np.isfinite(np.asarray(q))) and np.all(np.isfinite(np.asarray(pos)))


def test_loss_gradients_finite(synthetic, small_model):
    model, params = small_model
    b = batch_of(synthetic)

    def loss(p):
        q, pos = model.apply({"params": p}, b["Z"], b["R"], b["atom_mask"], b["Q"])
        return loss_and_sums(q, pos, b, W)[0]

    grads = jax.jit(jax.grad(loss))(params)
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0
