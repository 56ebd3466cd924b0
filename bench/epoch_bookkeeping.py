"""What a sweep trial spends per epoch outside its updates and validation (a profile).

Trains one quick.yaml trial in this process (the point learning_rate 5e-3, chg_w 1,
n_dcm 2, features 16; `--epochs` epochs) with the trial's TensorBoard reporter, under cProfile,
and prints the wall time, the trainer's own epoch times summed (updates + validation), and the
cumulative time of the bookkeeping done around every epoch: the trainer's checkpoints (and
inside them fsync, the JSON of the growing history, package_versions), history.csv, and the
TensorBoard events. Tune's own share (tune.report and the checkpoint copy it makes at every
improvement) is not in here: `bench/sweep_overhead.py` sees it as trial time.

  python bench/epoch_bookkeeping.py [--epochs 100] [--output-dir experiments/bench_bookkeeping]

`--smoke`: the same trial and profile for 2 epochs of a tiny model (4 features, 4 basis
functions, 1 charge per atom; quick.yaml's degree 1 and 1 iteration) on the default split
(valid and test 10 %).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pathlib import Path

from dcmtune.train.environment import use_compilation_cache

POINT = {
    "training.learning_rate": 5e-3,
    "training.chg_w": 1.0,
    "model.n_dcm": 2,
    "model.features": 16,
}
SMOKE_POINT = {**POINT, "model.n_dcm": 1, "model.features": 4}
# The default split (valid and test 10 %): the programs other smoke runs compiled fit it.
SMOKE_EXTRA = {
    "model.num_basis_functions": 4,
    "data.valid_fraction": 0.1,
    "data.test_fraction": 0.1,
}
# (label, pstats function-name match): cumulative seconds of the first matching function.
PARTS = (
    ("save_checkpoint", ("checkpoints.py", "save_checkpoint")),
    ("  fsync (all files)", ("~", "<built-in method posix.fsync>")),
    ("  json.dumps", ("json/__init__.py", "dumps")),
    ("  _io.jsonable", ("_io.py", "jsonable")),
    ("  package_versions", ("checkpoints.py", "package_versions")),
    ("history.csv", ("_io.py", "write_csv")),
    ("TensorBoard events", ("tensorboard.py", "__call__")),
)


def cumulative(stats: pstats.Stats, file_part: str, name: str) -> float:
    for (file, _, func), (_, _, _, ct, _) in stats.stats.items():
        if func == name and file.endswith(file_part) or (file == "~" and func == name):
            return ct
    return 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--output-dir", default="experiments/bench_bookkeeping")
    p.add_argument("--smoke", action="store_true", help="2 epochs of a tiny model")
    args = p.parse_args(argv)
    point, extra = (SMOKE_POINT, SMOKE_EXTRA) if args.smoke else (POINT, {})
    if args.smoke:
        args.epochs = 2
    out = Path(args.output_dir).resolve()
    use_compilation_cache(out / ".jax_cache")
    from dcmtune.sweep.spec import find_spec, load_spec
    from dcmtune.train.loop import fit
    from dcmtune.train.tensorboard import EventReporter

    spec = load_spec(find_spec("quick"), storage_path=out)
    name = f"bookkeeping_{int(time.time())}"
    cfg = spec.config_for(
        point, **{"training.num_epochs": args.epochs, "name": name, "output_dir": str(out), **extra}
    )
    run_dir = out / name
    events = EventReporter(run_dir, hparams=point)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    result = fit(cfg, reporter=events, run_dir=run_dir)
    prof.disable()
    wall = time.perf_counter() - t0
    events.close()
    stats = pstats.Stats(prof)
    epochs = sum(r["epoch_time"] for r in result.history)
    n = len(result.history)
    print(
        f"{n} epochs: wall {wall:.2f} s, epochs (updates + validation) {epochs:.2f} s, "
        f"first epoch {result.history[0]['epoch_time']:.2f} s (compiles)"
    )
    print(f"{'part':<22}{'total s':>9}{'ms/epoch':>10}{'of wall':>9}")
    for label, (file_part, func) in PARTS:
        s = cumulative(stats, file_part, func)
        print(f"{label:<22}{s:>9.2f}{s / n * 1e3:>10.1f}{s / wall:>9.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
