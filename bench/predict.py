"""Prediction throughput on the bundled demo molecules: conformers per second by batch size.

Runs `Predictor.predict` on all demo conformers (24 molecules x 10 conformers, 3-12 atoms) as
(Z, R) arrays (charges, monopoles, dipoles; no ESP) and again on the data file's own grids
(also the ESP at up to 1200 points per conformer), at batch sizes 1, 8 (the CPU default) and
256. Each setting is called once to compile (the warm-up), then timed over `--repeats` calls.
Prints the figures and the ratio to batch size 1; nothing is asserted.

  python bench/predict.py [--model DIR] [--repeats 3] [--batch-sizes 1 8 256]

Without --model the default-size DCMNet (dcmtune.config.ModelConfig(), untrained) is timed:
throughput depends on the architecture, not on the weights.

`--smoke`: the same two inputs for the first 2 conformers of the first demo molecule through
an untrained tiny model (4 features, degree 1, 1 iteration, 1 charge per atom, 4 basis
functions) at batch sizes 1 and 8 (a batch holds at most the 2 conformers), one timed call
each. (The predictor compiles one program per distinct grid size of a batch, so more
conformers cost more compiles than their number suggests.)
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from dcmtune.config import ExperimentConfig, ModelConfig
from dcmtune.data import load_dataset
from dcmtune.predict import Predictor, load_model
from dcmtune.train.step import init_state

SMOKE_MODEL = ModelConfig(
    n_dcm=1, features=4, max_degree=1, num_iterations=1, num_basis_functions=4
)


def _predictor(path, smoke: bool = False) -> Predictor:
    if path:
        return load_model(path)
    cfg = ExperimentConfig(model=SMOKE_MODEL) if smoke else ExperimentConfig()
    # A fresh training state's parameters (the trainer's init program, shared with any training
    # of the same model in this process or compile cache).
    return Predictor(path=None, config=cfg, params=init_state(cfg).params)


def _rate(fn, n: int, repeats: int) -> float:
    fn()  # warm-up: compiles every program the call needs
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return n * repeats / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a checkpoint, run dir or best_model/ (default: untrained)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 256])
    p.add_argument(
        "--smoke", action="store_true", help="2 conformers, tiny model, batch sizes 1 8, 1 repeat"
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.repeats, args.batch_sizes = 1, [1, 8]
    predictor = _predictor(args.model, args.smoke)
    data = load_dataset(max_atomic_number=predictor.max_atomic_number)
    if args.smoke:
        data = data.subset(np.flatnonzero(data.mol_id == data.mol_id[0])[:2])
    m = predictor.config.model
    name = args.model or ("untrained tiny" if args.smoke else "untrained default")
    print(
        f"model: {name} (n_dcm {m.n_dcm}, features "
        f"{m.features}, max_degree {m.max_degree}, iterations {m.num_iterations}); "
        f"{data.num_conformers} demo conformers, {jax.devices()[0].platform}"
    )
    print(f"{'input':<22}{'batch':>6}{'conformers/s':>14}{'ratio':>8}")
    for label, inputs in (("charges + dipole", (data.Z, data.R)), ("+ ESP on data grid", data)):
        base = None
        for bs in args.batch_sizes:
            rate = _rate(
                lambda inputs=inputs, bs=bs: predictor.predict(inputs, batch_size=bs),
                data.num_conformers,
                args.repeats,
            )
            base = base or rate
            print(f"{label:<22}{bs:>6}{rate:>14.1f}{rate / base:>8.1f}")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    raise SystemExit(main())
