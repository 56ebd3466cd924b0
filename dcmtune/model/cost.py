"""What a DCMNet model costs in a simulation, computed from its config: the cost metrics of the
registry (`dcmtune.metrics.COST_METRICS`) that a multi-objective sweep trades against accuracy.

  charges_per_atom      `n_dcm`: every extra charge per atom adds Coulomb interactions to every
                        step of an MD run (the cost chemists read off the accuracy-cost curve)
  n_params              trainable parameters
  flops_per_molecule    XLA's FLOP count of one prediction (charges and their positions) for one
                        molecule of `num_atoms` atoms, every atom pair an edge

All three are deterministic: the same config (and JAX version) gives the same numbers on every
run, so a resumed sweep and the ranking compute what the trials reported. The FLOPs are XLA's
cost analysis of the lowered program, before the compiler's optimisation passes (which differ
between backends and versions); nothing is compiled or run. Prediction time is not a cost here:
it is noisy and would break --resume.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dcmtune.config import ModelConfig

__all__ = ["model_costs", "reference_num_atoms"]


def reference_num_atoms(num_atoms: np.ndarray) -> int:
    """The molecule size FLOPs are counted at: the median real atom count of the data's
    conformers (`ESPData.N`), rounded up."""
    n = np.asarray(num_atoms).reshape(-1)
    if n.size == 0:
        raise ValueError("reference_num_atoms: expected at least one conformer, got none")
    return max(1, math.ceil(float(np.median(n))))


def model_costs(config: ModelConfig, num_atoms: int, names: Sequence[str]) -> dict[str, float]:
    """The cost metrics `names` of the model `config` (see the module docstring).

    Args:
      config: The model's config.
      num_atoms: The molecule size of `flops_per_molecule` (`reference_num_atoms`).
      names: Which costs to compute, each in `dcmtune.metrics.COST_METRICS`.

    Returns:
      {name: value}, floats (as Tune and the ranking store them).

    Raises:
      ValueError: a name that is not a cost metric.
    """
    out: dict[str, float] = {}
    for name in names:
        if name == "charges_per_atom":
            out[name] = float(config.n_dcm)
        elif name == "n_params":
            out[name] = float(_num_params(config))
        elif name == "flops_per_molecule":
            out[name] = _flops(config, int(num_atoms))
        else:
            raise ValueError(
                f"{name}: not a cost metric; expected charges_per_atom, n_params or "
                "flops_per_molecule"
            )
    return out


def _param_shapes(model) -> dict:
    from dcmtune.model.dcmnet import init_params

    return jax.eval_shape(lambda k: init_params(model, k), jax.random.PRNGKey(0))


@functools.lru_cache(maxsize=64)
def _num_params(config: ModelConfig) -> int:
    from dcmtune.model.dcmnet import build_model

    shapes = _param_shapes(build_model(config))
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)))


@functools.lru_cache(maxsize=64)
def _flops(config: ModelConfig, num_atoms: int) -> float:
    from dcmtune.model.dcmnet import build_model

    model = build_model(config)
    shapes = _param_shapes(model)

    def predict(params, Z, R):
        return model.apply({"params": params}, Z, R, Z > 0, jnp.zeros(1, R.dtype))

    lowered = jax.jit(predict).lower(
        shapes,
        jax.ShapeDtypeStruct((1, num_atoms), jnp.int32),
        jax.ShapeDtypeStruct((1, num_atoms, 3), jnp.float32),
    )
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older JAX: one per device
    if not isinstance(cost, dict) or "flops" not in cost:
        raise RuntimeError(f"XLA gave no FLOP count for the model ({cost!r})")
    return float(cost["flops"])
