"""Shared fixtures: one small model and one synthetic dataset for the whole session."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcmtune.data import make_batch, make_synthetic
from dcmtune.model import DCMNet, init_params

SMALL = dict(n_dcm=2, features=8, max_degree=2, num_iterations=2, num_basis_functions=8,
             cutoff=4.0, max_atomic_number=36, d_max=0.5)


@pytest.fixture(scope="session")
def synthetic():
    """Eight small random molecules, two conformers each, exact ESP."""
    return make_synthetic(num_molecules=8, conformers=2, max_atoms=8, num_grid=64, seed=0)


@pytest.fixture(scope="session")
def small_model():
    """(model, params) of a small DCMNet, built once."""
    model = DCMNet(**SMALL)
    params = jax.jit(lambda k: init_params(model, k))(jax.random.PRNGKey(0))
    return model, params


@pytest.fixture(scope="session")
def apply_fn(small_model):
    model, _ = small_model
    return jax.jit(lambda p, b: model.apply({"params": p}, b["Z"], b["R"], b["atom_mask"],
                                            b["Q"]))


def to_device(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()}


def batch_of(data, idx=None, batch_size=None):
    idx = np.arange(data.num_conformers) if idx is None else np.asarray(idx)
    return to_device(make_batch(data, idx, batch_size))
