"""Closed-form electrostatics: ESP of a unit charge, dipoles, and masking before division."""

import jax
import jax.numpy as jnp
import numpy as np

from dcmtune.model.physics import dipole_from_charges, esp_from_charges
from dcmtune.units import BOHR, HARTREE_TO_KCAL


def test_unit_charge_at_one_angstrom():
    v = esp_from_charges(
        jnp.ones((1, 1)),
        jnp.zeros((1, 1, 3)),
        jnp.ones((1, 1), bool),
        jnp.asarray([[[1.0, 0.0, 0.0]]]),
        jnp.ones((1, 1), bool),
    )
    np.testing.assert_allclose(v[0, 0], 0.529177, rtol=1e-5)
    np.testing.assert_allclose(v[0, 0] * HARTREE_TO_KCAL, 332.06, rtol=1e-4)
    assert abs(BOHR - 0.529177210903) < 1e-12


def test_two_charge_dipole_textbook_value():
    # +1 e and -1 e 1 Angstrom apart: 4.8032 Debye along the axis (1 e*A = 4.80320 D).
    q = jnp.asarray([[1.0, -1.0]])
    p = jnp.asarray([[[0.5, 0.0, 0.0], [-0.5, 0.0, 0.0]]])
    mu = dipole_from_charges(q, p, jnp.ones((1, 2), bool), jnp.zeros((1, 3)))
    np.testing.assert_allclose(mu[0], [4.80320, 0.0, 0.0], rtol=1e-5, atol=1e-6)
    # A neutral pair's dipole does not depend on the origin.
    mu2 = dipole_from_charges(q, p, jnp.ones((1, 2), bool), jnp.asarray([[3.0, -2.0, 1.0]]))
    np.testing.assert_allclose(mu2, mu, atol=1e-5)


def test_superposition_against_numpy_float64():
    rng = np.random.default_rng(0)
    q, p, g = rng.normal(size=(2, 5)), rng.normal(size=(2, 5, 3)), 4 * rng.normal(size=(2, 7, 3))
    ref = (q[:, None, :] / (np.linalg.norm(g[:, :, None] - p[:, None], axis=-1) / BOHR)).sum(-1)
    v = esp_from_charges(
        jnp.asarray(q, jnp.float32),
        jnp.asarray(p, jnp.float32),
        jnp.ones((2, 5), bool),
        jnp.asarray(g, jnp.float32),
        jnp.ones((2, 7), bool),
    )
    np.testing.assert_allclose(v, ref, rtol=1e-5, atol=1e-7)


def test_grid_point_on_padding_atom_is_finite_with_finite_gradient():
    # A real charge at the origin (a CH4 carbon), a padding charge also at the origin, and a
    # padded grid point exactly on both: values and gradients must stay finite.
    q = jnp.asarray([[0.3, 0.0]])
    p = jnp.zeros((1, 2, 3))
    cmask = jnp.asarray([[True, False]])
    grid = jnp.asarray([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    gmask = jnp.asarray([[False, True]])

    def f(q, p):
        return jnp.sum(esp_from_charges(q, p, cmask, grid, gmask) ** 2)

    val = f(q, p)
    gq, gp = jax.grad(f, argnums=(0, 1))(q, p)
    assert np.isfinite(val) and np.all(np.isfinite(gq)) and np.all(np.isfinite(gp))
    v = esp_from_charges(q, p, cmask, grid, gmask)
    np.testing.assert_allclose(v[0], [0.0, 0.3 * BOHR], rtol=1e-6)
    # The padded charge sitting on the padded grid point contributes nothing either.
    gmask_all = jnp.asarray([[False, True]])
    v2 = esp_from_charges(jnp.asarray([[0.3, 5.0]]), p, cmask, grid, gmask_all)
    np.testing.assert_allclose(v2, v, rtol=1e-6)
