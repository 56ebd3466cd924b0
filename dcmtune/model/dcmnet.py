"""DCMNet: an E(3)-equivariant message-passing network placing distributed point charges.

Each atom gets `n_dcm` charges at bounded displacements from it, so that their Coulomb potential
reproduces the reference ESP (Unke et al., "Distributed charge models from equivariant neural
networks"; the DCM idea: Devereux, Raghunathan, Fedorov, Meuwly, JCTC 10, 4229 (2014)).

Correct by construction where the reference implementation was not:
  * padding atoms have no edges, carry no charge and change no real output;
  * displacements are truly bounded: d = d_max * tanh(|v|) * v / |v| has |d| < d_max and keeps
    rotation equivariance (a function of |v| times v);
  * charges per molecule sum exactly to Q;
  * `max_atomic_number` sizes the embedding (data above it is refused at load).
"""

from __future__ import annotations

import functools

import e3x
import flax.linen as nn
import jax
import jax.numpy as jnp

from dcmtune.config import ModelConfig

__all__ = ["DCMNet", "build_model"]

# Masked edges get this displacement: far beyond any cutoff, and never zero (no 0/0 in norms).
_FAR = 1e3


class DCMNet(nn.Module):
    """Distributed charge model network.

    Attributes:
      n_dcm: Charges per atom.
      features: Feature channels.
      max_degree: Highest degree of the equivariant features (>= 1).
      num_iterations: Message-passing steps.
      num_basis_functions: Radial basis functions.
      cutoff: Neighbour cutoff (Angstrom).
      max_atomic_number: Largest atomic number the embedding accepts.
      include_pseudotensors: Carry features of both parities.
      d_max: Displacement bound (Angstrom).

    The defaults are `ModelConfig`'s (one place holds them).
    """

    n_dcm: int = ModelConfig.n_dcm
    features: int = ModelConfig.features
    max_degree: int = ModelConfig.max_degree
    num_iterations: int = ModelConfig.num_iterations
    num_basis_functions: int = ModelConfig.num_basis_functions
    cutoff: float = ModelConfig.cutoff
    max_atomic_number: int = ModelConfig.max_atomic_number
    include_pseudotensors: bool = ModelConfig.include_pseudotensors
    d_max: float = ModelConfig.d_max

    @nn.compact
    def __call__(self, Z, R, atom_mask, Q, pairs=None):
        """Predicts charges and charge positions.

        Args:
          Z: Shape (B, A) int, atomic numbers (0 = padding).
          R: Shape (B, A, 3), Angstrom.
          atom_mask: Shape (B, A) bool, real atoms.
          Q: Shape (B,), total charge of each molecule (e).
          pairs: Optional shape (B, K, 2) int, each molecule's (destination, source) atom pairs
            within the cutoff (`dcmtune.data.neighbors.neighbor_pairs`; self pairs fill free
            slots and are no edges). None: every pair of atoms is an edge. Both give the same
            outputs: a pair beyond the cutoff carries an exactly zero message.

        Returns:
          charges: Shape (B, A, n_dcm), e; zero on padding atoms; sum over real atoms = Q.
          positions: Shape (B, A, n_dcm, 3), Angstrom; |positions - R| < d_max.
        """
        B, A = Z.shape
        num_nodes = B * A
        dtype = R.dtype

        # 1. Flatten the batch into one graph; its edges are the molecules' pairs within the
        #    cutoff (or all intra-molecular pairs), indices offset by each molecule's first node.
        z = jnp.where(atom_mask, Z, 0).reshape(num_nodes)  # Shape (B*A,).
        r = R.reshape(num_nodes, 3)  # Shape (B*A, 3).
        node_mask = atom_mask.reshape(num_nodes)  # Shape (B*A,).
        if pairs is None:
            dst, src = e3x.ops.sparse_pairwise_indices(A)  # Shape (A*(A-1),) each.
            dst, src = jnp.broadcast_to(dst, (B, dst.size)), jnp.broadcast_to(src, (B, src.size))
        else:
            dst, src = pairs[..., 0], pairs[..., 1]  # Shape (B, K) each.
        offsets = (jnp.arange(B) * A)[:, None]  # Shape (B, 1).
        dst = (dst + offsets).reshape(-1)  # Shape (E,), E = B*K (all pairs: K = A*(A-1)).
        src = (src + offsets).reshape(-1)  # Shape (E,).
        edge_mask = (dst != src) & node_mask[dst] & node_mask[src]  # Shape (E,).

        # 2. Edge vectors; padded edges pushed far away so no NaN can arise from them.
        far = jnp.asarray([_FAR, 0.0, 0.0], dtype)
        disp = jnp.where(edge_mask[:, None], r[src] - r[dst], far)  # Shape (E, 3).
        basis = e3x.nn.basis(
            disp,
            num=self.num_basis_functions,
            max_degree=self.max_degree,
            radial_fn=e3x.nn.reciprocal_bernstein,
            cutoff_fn=functools.partial(e3x.nn.smooth_cutoff, cutoff=self.cutoff),
        )  # Shape (E, 1, (max_degree+1)**2, num_basis_functions).
        edge_weight = edge_mask.astype(dtype)[:, None, None, None]  # Shape (E, 1, 1, 1).

        # 3. Embed, then message passing with residual MLPs.
        x = e3x.nn.Embed(num_embeddings=self.max_atomic_number + 1, features=self.features)(z)
        # Shape (B*A, 1, 1, features).
        for _ in range(self.num_iterations):
            y = e3x.nn.MessagePass(
                include_pseudotensors=self.include_pseudotensors, max_degree=self.max_degree
            )(x, basis, edge_weight, dst_idx=dst, src_idx=src, num_segments=num_nodes)
            x = e3x.nn.add(x, y)  # Shape (B*A, P, (max_degree+1)**2, features).
            y = e3x.nn.silu(e3x.nn.Dense(self.features)(x))
            y = e3x.nn.Dense(self.features)(y)
            x = e3x.nn.add(x, y)

        # 4. Per atom: n_dcm charges and n_dcm displacement vectors.
        #    Displacements: a linear (equivariant) read-out of the RMS-normalised degree-0/1
        #    features; the invariant normalisation keeps them finite however large the features
        #    grow, and the bound in step 5 does the rest.
        #    Charges: an MLP on the raw (un-normalised) invariant features, which keeps the
        #    per-atom feature magnitude the normalisation discards (1 kcal/mol/e of ESP at the
        #    grid is ~0.005 e of charge). On the demo set it gave a 10% lower validation ESP
        #    error than the linear head, at the same cost (docs/model.md).
        s = x[:, 0, 0, :]  # Shape (B*A, features): the invariant (scalar) features.
        x = e3x.nn.change_max_degree_or_type(x, max_degree=1, include_pseudotensors=False)
        x = e3x.nn.Dense(self.n_dcm)(_rms_normalize(x))
        # Shape (B*A, 1, 4, n_dcm): index 1:4 the (x, y, z) vectors (index 0 is unused).
        h = nn.silu(nn.Dense(self.features)(s))  # Shape (B*A, features).
        q = nn.Dense(self.n_dcm)(h).reshape(B, A, self.n_dcm)  # Shape (B, A, n_dcm).
        v = jnp.swapaxes(x[:, 0, 1:4, :], -1, -2).reshape(B, A, self.n_dcm, 3)

        # 5. Bounded displacement d = d_max * tanh(|v|) / |v| * v; |d| < d_max.
        norm = jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True) + 1e-12)  # Shape (B, A, n_dcm, 1).
        d = self.d_max * jnp.tanh(norm) / norm * v  # Shape (B, A, n_dcm, 3).
        mask3 = atom_mask[:, :, None, None]
        positions = R[:, :, None, :] + jnp.where(mask3, d, 0.0)  # Shape (B, A, n_dcm, 3).

        # 6. Exact total charge: spread the excess evenly over the real charges.
        mask = atom_mask[:, :, None]  # Shape (B, A, 1).
        q = jnp.where(mask, q, 0.0)
        n_real = jnp.maximum(jnp.sum(atom_mask, axis=1) * self.n_dcm, 1).astype(dtype)  # (B,)
        excess = (jnp.sum(q, axis=(1, 2)) - Q.astype(dtype)) / n_real  # Shape (B,).
        charges = jnp.where(mask, q - excess[:, None, None], 0.0)  # Shape (B, A, n_dcm).
        return charges, positions


def _rms_normalize(x, eps=1e-6):
    """x / sqrt(mean(x^2) + eps) per atom over all (parity, degree, feature) components.

    mean(x^2) is rotation invariant (each degree block's squared norm is). It is evaluated
    after dividing by the largest |component| so huge features cannot overflow x^2.

    Args:
      x: Shape (N, P, L, F). Returns the same shape.
    """
    m = jnp.max(jnp.abs(x), axis=(-3, -2, -1), keepdims=True)  # Shape (N, 1, 1, 1).
    m = jnp.maximum(jax.lax.stop_gradient(m), 1e-30)
    xs = x / m
    ms = jnp.mean(xs * xs, axis=(-3, -2, -1), keepdims=True)  # Shape (N, 1, 1, 1).
    return xs / jnp.sqrt(ms + eps / (m * m))


def build_model(config: ModelConfig) -> DCMNet:
    """The DCMNet described by `config`."""
    return DCMNet(**config.to_dict())


def init_params(model: DCMNet, key: jax.Array, num_atoms: int = 3) -> dict:
    """Parameters for `model` from `key` (shapes do not depend on batch or padding sizes)."""
    Z = jnp.ones((1, num_atoms), jnp.int32)
    R = jnp.asarray([[[0.0, 0.0, 0.0], [1.0, 0.1, 0.0], [0.2, 1.1, 0.3]][:num_atoms]])
    return model.init(key, Z, R, Z > 0, jnp.zeros(1))["params"]
