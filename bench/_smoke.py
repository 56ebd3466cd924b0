"""The smallest DCMNet the bench smokes train (a model section; no Ray, no JAX imported)."""

SMOKE_MODEL = {
    "features": 4,
    "max_degree": 1,
    "num_iterations": 1,
    "n_dcm": 1,
    "num_basis_functions": 4,
}
