"""Loss masks and per-molecule weighting."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import batch_of
from conftest import loss_weights as LossWeights

from dcmtune.data.synthetic import make_synthetic
from dcmtune.model.loss import finalize_metrics, loss_and_sums
from dcmtune.units import HARTREE_TO_KCAL

W = LossWeights(1000.0, 1.0, 0.5)


def _reference_charges(batch, n_dcm=2):
    """Charges = reference monopoles split over n_dcm charges sitting on the atoms, slightly
    perturbed so every term is non-zero."""
    mono = np.asarray(batch["mono"])
    q = np.repeat(mono[..., None] / n_dcm, n_dcm, axis=-1) + 0.01
    pos = np.repeat(np.asarray(batch["R"])[:, :, None, :], n_dcm, axis=2) + 0.05
    return jnp.asarray(q), jnp.asarray(pos)


def test_exact_charges_give_zero_loss(synthetic):
    b = batch_of(synthetic)
    q = jnp.asarray(np.asarray(b["mono"])[..., None])
    pos = jnp.asarray(np.asarray(b["R"])[:, :, None, :])
    loss, sums = loss_and_sums(q, pos, b, W)
    assert float(loss) < 1e-9
    m = finalize_metrics(sums, W)
    assert m["esp_rmse"] < 1e-3 and m["mono_mae"] < 1e-7 and m["dipole_mae"] < 1e-4


def test_values_beyond_n_grid_and_padding_atoms_change_nothing(synthetic):
    b = batch_of(synthetic)
    q, pos = _reference_charges(b)
    loss, sums = loss_and_sums(q, pos, b, W)
    gm, am = np.asarray(b["grid_mask"]), np.asarray(b["atom_mask"])
    assert (~gm).any() and (~am).any()  # the fixture really has padding
    rng = np.random.default_rng(0)
    b2 = dict(
        b,
        esp=jnp.where(gm, b["esp"], rng.normal(size=gm.shape) * 1e3),
        grid=jnp.where(gm[..., None], b["grid"], rng.normal(size=gm.shape + (3,))),
        R=jnp.where(am[..., None], b["R"], 0.0),  # padding atoms at the origin
        mono=jnp.where(am, b["mono"], 7.0),
    )
    pos2 = jnp.where(am[..., None, None], pos, rng.normal(size=pos.shape))
    q2 = jnp.where(am[..., None], q, 3.0)
    loss2, sums2 = loss_and_sums(q2, pos2, b2, W)
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    for k in sums:
        np.testing.assert_allclose(sums2[k], sums[k], rtol=1e-6, err_msg=k)


def test_every_molecule_weighs_the_same():
    # Two molecules with very different atom and grid counts: the loss is the plain mean of
    # their per-molecule terms, not a mean over pooled grid points or atoms.
    data = make_synthetic(
        num_molecules=2, conformers=1, min_atoms=3, max_atoms=8, num_grid=64, seed=5
    )
    b = batch_of(data)
    q, pos = _reference_charges(b)
    loss, _ = loss_and_sums(q, pos, b, W)
    singles = [
        loss_and_sums(q[i : i + 1], pos[i : i + 1], batch_of(data, [i]), W)[0] for i in range(2)
    ]
    assert data.N[0] != data.N[1]
    np.testing.assert_allclose(loss, np.mean(singles), rtol=1e-6)


def test_metric_sums_are_batching_invariant(synthetic):
    b = batch_of(synthetic)
    q, pos = _reference_charges(b)
    _, whole = loss_and_sums(q, pos, b, W)
    parts = [
        loss_and_sums(q[s], pos[s], batch_of(synthetic, np.arange(16)[s]), W)[1]
        for s in (slice(0, 5), slice(5, 16))
    ]
    summed = {k: sum(p[k] for p in parts) for k in whole}
    m1, m2 = finalize_metrics(whole, W), finalize_metrics(summed, W)
    for k in m1:
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, err_msg=k)


def test_padding_molecules_are_ignored(synthetic):
    b = batch_of(synthetic, np.arange(5))
    bp = batch_of(synthetic, np.arange(5), batch_size=8)
    q, pos = _reference_charges(b)
    qp, posp = _reference_charges(bp)
    l1, s1 = loss_and_sums(q, pos, b, W)
    l2, s2 = loss_and_sums(qp, posp, bp, W)
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
    assert float(s2["n_mol"]) == 5.0


def test_metric_units():
    # One molecule, one grid point, error of exactly 0.001 Hartree/e -> 0.6275 kcal/mol/e.
    sums = {
        "n_mol": 1.0,
        "n_mono": 0.0,
        "n_dip": 0.0,
        "esp_mse": 1e-6,
        "esp_mae": 1e-3,
        "mono_mse": 0.0,
        "mono_mae": 0.0,
        "dip_mse": 0.0,
        "dip_mae": 0.0,
        "n_atoms": 2.0,
        "q_sum": 0.0,
        "q2_sum": 0.5,
    }
    m = finalize_metrics(sums, LossWeights(1000.0, 1.0, 0.0))
    np.testing.assert_allclose(m["esp_rmse"], 1e-3 * HARTREE_TO_KCAL)
    np.testing.assert_allclose(m["esp_mae"], 1e-3 * HARTREE_TO_KCAL)
    np.testing.assert_allclose(m["loss"], 1e-3)
    np.testing.assert_allclose(m["mono_std"], 0.5)
    assert np.isnan(m["dipole_mae"]) and np.isnan(m["mono_mae"])


def test_a_present_non_finite_term_makes_the_loss_nan():
    """A weighted term with a reference that is inf/NaN must not drop out of the loss (the
    run would look healthy while its charges blow up)."""
    base = {k: 0.0 for k in ("esp_mae", "mono_mae", "dip_mae", "n_atoms", "q_sum", "q2_sum")}
    ok = dict(base, n_mol=2.0, n_mono=2.0, n_dip=0.0, esp_mse=2e-6, mono_mse=0.02, dip_mse=0.0)
    w = LossWeights(1000.0, 1.0, 1.0)
    assert finalize_metrics(ok, w)["loss"] == pytest.approx(1000.0 * 1e-6 + 0.01)  # no dipoles
    for term in ("mono_mse", "esp_mse"):
        bad = dict(ok, **{term: float("inf")})
        assert np.isnan(finalize_metrics(bad, w)["loss"]), term
    bad = dict(ok, n_dip=2.0, dip_mse=float("nan"))
    assert np.isnan(finalize_metrics(bad, w)["loss"])
    assert np.isfinite(finalize_metrics(bad, LossWeights(1000.0, 1.0, 0.0))["loss"])  # unweighted
