"""Throughput of the jitted update on the bundled demo set, and the cost of accumulation.

Prints milliseconds per optimizer update and per molecule for k = 1, 2, 4 micro-batches of
`--batch-size` molecules (one dispatch per update; the micro-batches are a lax.scan inside it),
and the ratio of per-molecule cost to k = 1. A ratio near 1 means accumulation adds no overhead
beyond the extra molecules.

The update is the public pure step `dcmtune.train.step.train_step` after a gather of the
micro-batches from the device-resident data, jitted here with `jax.jit` (what the trainer's own
kept program computes).

  python bench/train_step.py [--batch-size 8] [--repeats 20]

`--smoke`: the same path at its smallest: a tiny model (4 features, degree 1, 1 iteration,
1 charge per atom, 4 basis functions), batch size 2, k = 1 and 2 only, one timed update per k.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from dcmtune.config import ExperimentConfig, ModelConfig
from dcmtune.data import load_dataset, make_batch
from dcmtune.train.step import StepConfig, hparams_of, init_state, train_step

SMOKE_MODEL = ModelConfig(
    n_dcm=1, features=4, max_degree=1, num_iterations=1, num_basis_functions=4
)


def _gathered_step(state, data, idx, hparams, static: StepConfig):
    """Gathers micro-batches `idx` (k, b) from device-resident `data` and applies one update."""
    batch = jax.tree.map(lambda x: x[idx], data)
    return train_step(state, batch, hparams, static)


update = jax.jit(_gathered_step, static_argnames=("static",))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="tiny model, batch 2, k 1 2, 1 repeat")
    args = p.parse_args(argv)
    cfg, ks = ExperimentConfig(), (1, 2, 4)
    if args.smoke:
        args.batch_size, args.repeats, ks = 2, 1, (1, 2)
        cfg = ExperimentConfig(model=SMOKE_MODEL)
    data = load_dataset()
    idx_all = np.arange(data.num_conformers)  # with their neighbour pairs, as the trainer
    dev = jax.device_put(make_batch(data, idx_all, cutoff=cfg.model.cutoff))
    base = None
    print(f"{'k':>3} {'ms/update':>10} {'ms/molecule':>12} {'ratio':>7}")
    for k in ks:
        state = init_state(cfg)
        static = StepConfig(cfg.model, True, True)
        hp = hparams_of(cfg.training, 10)
        idx = jnp.arange(k * args.batch_size).reshape(k, args.batch_size)
        state, _ = update(state, dev, idx, hp, static)  # compile
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            state, _ = update(state, dev, idx, hp, static)
        jax.block_until_ready(state)
        ms = (time.perf_counter() - t0) / args.repeats * 1e3
        per_mol = ms / (k * args.batch_size)
        base = base or per_mol
        print(f"{k:>3} {ms:>10.2f} {per_mol:>12.3f} {per_mol / base:>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
