"""Throughput of the jitted update on the bundled demo set, and the cost of accumulation.

Prints milliseconds per optimizer update and per molecule for k = 1, 2, 4 micro-batches of
`--batch-size` molecules (one dispatch per update; the micro-batches are a lax.scan inside it),
and the ratio of per-molecule cost to k = 1. A ratio near 1 means accumulation adds no overhead
beyond the extra molecules.

  python bench/train_step.py [--batch-size 8] [--repeats 20]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from dcmtune.config import ExperimentConfig
from dcmtune.data import load_dataset, make_batch
from dcmtune.train.step import StepConfig, _update, hparams_of, init_state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    data = load_dataset()
    dev = jax.device_put(make_batch(data, np.arange(data.num_conformers)))
    cfg = ExperimentConfig()
    base = None
    print(f"{'k':>3} {'ms/update':>10} {'ms/molecule':>12} {'ratio':>7}")
    for k in (1, 2, 4):
        tcfg = cfg.training
        state = init_state(cfg)
        static = StepConfig(cfg.model, True, True)
        hp = hparams_of(tcfg, 10)
        idx = jnp.arange(k * args.batch_size).reshape(k, args.batch_size)
        state, _ = _update(state, dev, idx, hp, static)  # compile
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            state, s = _update(state, dev, idx, hp, static)
        jax.block_until_ready(state)
        ms = (time.perf_counter() - t0) / args.repeats * 1e3
        per_mol = ms / (k * args.batch_size)
        base = base or per_mol
        print(f"{k:>3} {ms:>10.2f} {per_mol:>12.3f} {per_mol / base:>7.2f}")


if __name__ == "__main__":
    main()
