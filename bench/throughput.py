"""Training conformers/s: commit dd26223 vs today's padded path vs size buckets; and streaming.

Throughput: each variant trains the same model (16 features, n_dcm 2, max_degree 2, 2
iterations, batch 8) for `--epochs` epochs in its own process and reports training conformers
per second of the training updates of epochs 2.. (epoch 1 compiles; the first runs share a
fresh persistent compile cache, so repeats measure the same programs warm); a run's figure is
the median over its epochs 2.. of the epoch's conformers / its training time:

  dd26223   the trainer at commit dd26223, extracted with `git archive` into a temporary
            directory and run with PYTHONPATH pointing there
  padded    this tree, data.batching = padded (one shape, remainder dropped)
  bucketed  this tree, data.batching = bucketed (the default), buckets planned for the
            default 200-epoch run
  bucketed-long  the same, planned for a 2,000-epoch run (as many buckets as max_buckets)

Runs are interleaved (variant order rotated per repeat) so machine load hits all alike; the
median of `--repeats` runs per variant and the ratios are printed. Sets: the bundled demo set,
and with `--qm9` a QM9-like synthetic set (5-29 atoms, up to 3,200 grid points).

Streaming (`--streaming`): epoch time of the bucketed path with data streamed from host memory
(device_data_budget_mb = 0) vs device-resident, in one process, interleaved.

  python bench/throughput.py [--epochs 4] [--repeats 3] [--qm9] [--streaming] [--only-streaming]

`--smoke`: no other commit (dd26223 is not extracted, its lines are left out): the padded and
bucketed variants of this tree on the demo set with a tiny model (4 features, degree 1,
1 iteration, 1 charge per atom, 4 basis functions), 2 epochs (the ratios compare epoch 2), one
repeat, each variant's worker run in this process (the same `worker` a variant process runs) and
the buckets planned for a 2-epoch run (one bucket shape); then streaming vs resident, once.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BASE_COMMIT = "dd26223"
VARIANTS = ("dd26223", "padded", "bucketed", "bucketed-long")
# Run lengths the bucket planner sees (it adds a bucket only where the run's saved work pays
# for its compile): the default 200 epochs, and a long run, where it takes data.max_buckets.
RUN_EPOCHS = {"bucketed-long": 2000}
DEFAULT_RUN_EPOCHS = 200


class _Stop(Exception):
    """Raised by the worker's reporter to end a run after the measured epochs."""


MODEL = dict(features=16, n_dcm=2, max_degree=2, num_iterations=2)
SMOKE_MODEL = dict(features=4, n_dcm=1, max_degree=1, num_iterations=1, num_basis_functions=4)
SMOKE_VARIANTS = ("padded", "bucketed")
BATCH = 8


# --------------------------------------------------------------------------- worker


def worker(data_file: str, mode: str, epochs: int, out: str, smoke: bool = False) -> dict:
    """One training run in this process (whichever dcmtune PYTHONPATH provides); `smoke`: the
    tiny model, buckets planned for a run of `epochs` epochs."""
    import dcmtune
    from dcmtune.config import DataConfig, ExperimentConfig, ModelConfig, TrainingConfig

    data = {"data_files": [data_file]}
    if mode != BASE_COMMIT:
        data["batching"] = mode.split("-")[0]
    cfg = ExperimentConfig(
        name=f"{mode}",
        output_dir=out,
        random_seed=0,
        model=ModelConfig(**(SMOKE_MODEL if smoke else MODEL)),
        data=DataConfig(**data),
        training=TrainingConfig(
            num_epochs=epochs if smoke else RUN_EPOCHS.get(mode, DEFAULT_RUN_EPOCHS),
            batch_size=BATCH,
            warmup_epochs=1,
            save_every_n_epochs=0,
        ),
    )
    hist, cpu = train_epochs(cfg, epochs)
    n_train = len(json.loads((Path(out) / mode / "split.json").read_text())["indices"]["train"])
    rates, cpu_rates = [], []  # per epoch after the first (median: robust to load spikes)
    for e, (prev, row) in enumerate(zip(hist[:-1], hist[1:], strict=True), start=1):
        updates = row["step"] - prev["step"]
        conformers = n_train if mode.startswith("bucketed") else updates * BATCH
        rates.append(conformers / (row["batch_time"] * updates))
        cpu_rates.append(conformers / (cpu[e + 1] - cpu[e]))
    return {
        "library": str(Path(dcmtune.__file__).parent),
        "conformers_per_s": statistics.median(rates),
        "conformers_per_cpu_s": statistics.median(cpu_rates),
        "first_epoch_s": hist[0]["epoch_time"],
        "epoch_s": statistics.median(r["epoch_time"] for r in hist[1:]),
        "updates_per_epoch": int(hist[1]["step"] - hist[0]["step"]),
        "n_train": n_train,
    }


def train_epochs(cfg, epochs: int) -> tuple[list[dict], list[float]]:
    """`fit(cfg)` stopped after `epochs` epochs: its history rows (step, batch_time,
    epoch_time) and the process CPU time at the start and after each epoch."""
    from dcmtune.train.loop import fit

    cpu = [time.process_time()]

    def reporter(epoch, *_):
        cpu.append(time.process_time())
        if epoch >= epochs:
            raise _Stop

    try:
        fit(cfg, reporter=reporter)
    except _Stop:
        pass
    with open(Path(cfg.output_dir) / cfg.name / "history.csv") as fh:
        keys = ("step", "batch_time", "epoch_time")
        return [{k: float(row[k]) for k in keys} for row in csv.DictReader(fh)], cpu


def run_variant(
    variant: str,
    data_file: Path,
    epochs: int,
    base_tree: Path | None,
    out: Path,
    cache: Path,
    smoke: bool = False,
) -> dict:
    """`worker` in a subprocess with the variant's library on PYTHONPATH (`smoke`: in this
    process, this tree's library)."""
    root = base_tree if variant == BASE_COMMIT and base_tree is not None else REPO
    if smoke:
        got = worker(str(data_file), variant, epochs, str(out), smoke=True)
        if not got["library"].startswith(str(root)):
            sys.exit(f"{variant}: ran the library at {got['library']}, expected {root}")
        return got
    env = dict(
        os.environ,
        PYTHONPATH=str(root),
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        str(data_file),
        variant,
        str(epochs),
        str(out),
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        sys.exit(f"{variant} failed:\n{res.stderr[-3000:]}")
    got = json.loads(res.stdout.strip().splitlines()[-1])
    if not got["library"].startswith(str(root)):
        sys.exit(f"{variant}: ran the library at {got['library']}, expected {root}")
    return got


def throughput(
    name: str,
    data_file: Path,
    epochs: int,
    repeats: int,
    base_tree: Path | None,
    tmp: Path,
    smoke: bool = False,
) -> None:
    cache = tmp / f"jax-cache-{name}"
    variants = SMOKE_VARIANTS if smoke else VARIANTS
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(repeats):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            got = run_variant(
                v, data_file, epochs, base_tree, tmp / f"{name}-{v}-{r}", cache, smoke
            )
            runs[v].append(got)
            print(
                f"  [{name}] repeat {r + 1} {v:>9}: {got['conformers_per_s']:7.1f} "
                f"conformers/s, epoch {got['epoch_s']:.2f} s, first epoch "
                f"{got['first_epoch_s']:.1f} s, {got['conformers_per_cpu_s']:.1f} conformers "
                f"per CPU-s, {got['updates_per_epoch']} updates of "
                f"{got['n_train']} training conformers",
                flush=True,
            )
    med = {v: statistics.median(x["conformers_per_s"] for x in runs[v]) for v in variants}
    rng = {
        v: (
            min(x["conformers_per_s"] for x in runs[v]),
            max(x["conformers_per_s"] for x in runs[v]),
        )
        for v in variants
    }
    print(f"{name}: training conformers/s, median of {repeats} (range)")
    for v in variants:
        print(f"  {v:>9}: {med[v]:8.1f}  ({rng[v][0]:.1f}-{rng[v][1]:.1f})")
    cpu = {v: statistics.median(x["conformers_per_cpu_s"] for x in runs[v]) for v in variants}
    base = BASE_COMMIT in variants  # left out by --smoke
    print(
        "  (conformers per CPU-second of whole epochs, load-independent: "
        + ", ".join(f"{v} {cpu[v]:.1f}" for v in variants)
        + (f"; bucketed / dd26223 {cpu['bucketed'] / cpu[BASE_COMMIT]:.2f})" if base else ")")
    )
    if base:
        ratios = [
            b["conformers_per_s"] / a["conformers_per_s"]
            for a, b in zip(runs[BASE_COMMIT], runs["bucketed"], strict=True)
        ]
        print(
            f"  bucketed / dd26223: {med['bucketed'] / med[BASE_COMMIT]:.2f}  (per repeat "
            f"{', '.join(f'{x:.2f}' for x in ratios)}; target >= 2)"
        )
        print(f"  bucketed-long / dd26223: {med['bucketed-long'] / med[BASE_COMMIT]:.2f}")
    print(f"  bucketed / padded:  {med['bucketed'] / med['padded']:.2f}")
    if base:
        print(f"  padded / dd26223:   {med['padded'] / med[BASE_COMMIT]:.2f}")
    print(
        "  first epoch (compiles; repeat 1 cold): "
        + ", ".join(f"{v} {runs[v][0]['first_epoch_s']:.1f} s" for v in variants),
        flush=True,
    )


# --------------------------------------------------------------------------- streaming


def streaming(epochs: int, repeats: int, tmp: Path, smoke: bool = False) -> None:
    """Epoch time of streamed vs device-resident data (bucketed path, demo set); `smoke`: the
    tiny model, buckets planned for a run of `epochs` epochs."""
    from dcmtune.config import DataConfig, ExperimentConfig, ModelConfig, TrainingConfig

    times = {"resident": [], "streamed": []}
    for r in range(repeats):
        order = ("resident", "streamed") if r % 2 == 0 else ("streamed", "resident")
        for how in order:
            cfg = ExperimentConfig(
                name=f"{how}{r}",
                output_dir=str(tmp),
                random_seed=0,
                model=ModelConfig(**(SMOKE_MODEL if smoke else MODEL)),
                data=DataConfig(device_data_budget_mb=0.0 if how == "streamed" else 1024.0),
                training=TrainingConfig(
                    num_epochs=epochs if smoke else DEFAULT_RUN_EPOCHS,
                    batch_size=BATCH,
                    warmup_epochs=1,
                    save_every_n_epochs=0,
                ),
            )
            hist, _ = train_epochs(cfg, epochs)
            t = statistics.median(row["epoch_time"] for row in hist[1:])
            times[how].append(t)
            print(f"  repeat {r + 1} {how:>8}: epoch {t * 1e3:.0f} ms", flush=True)
    ratios = [s / d for s, d in zip(times["streamed"], times["resident"], strict=True)]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"streaming: epoch time streamed {med['streamed'] * 1e3:.0f} ms, resident "
        f"{med['resident'] * 1e3:.0f} ms (medians of {repeats}); ratio "
        f"{med['streamed'] / med['resident']:.3f} (per repeat "
        f"{', '.join(f'{x:.3f}' for x in ratios)}; target <= 1.10)"
    )


# --------------------------------------------------------------------------- main


def qm9_like(path: Path, molecules: int, seed: int = 0) -> Path:
    """A QM9-like synthetic set: 5-29 atoms, 200 grid points per atom up to 3,200."""
    from dcmtune.data import to_arrays
    from dcmtune.data.synthetic import make_synthetic

    data = make_synthetic(
        num_molecules=molecules,
        conformers=4,
        min_atoms=5,
        max_atoms=29,
        num_grid=3200,
        grid_per_atom=200,
        seed=seed,
    )
    np.savez(path, **to_arrays(data))
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--worker":
        data_file, mode, epochs, out = argv[1:5]
        print(json.dumps(worker(data_file, mode, int(epochs), out)))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4, help="epochs per run (>= 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--qm9", action="store_true", help="also the QM9-like synthetic set")
    p.add_argument("--no-demo", action="store_true", help="skip the demo set")
    p.add_argument("--qm9-molecules", type=int, default=60, help="molecules (4 conformers each)")
    p.add_argument("--streaming", action="store_true", help="also streamed vs resident")
    p.add_argument("--only-streaming", action="store_true")
    p.add_argument(
        "--git-dir", default=str(REPO), help="the repository holding dd26223 (default: this tree's)"
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="this tree only, tiny model, 2 epochs, 1 repeat, in this process; and streaming",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs, args.repeats, args.streaming = 2, 1, True
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.only_streaming:
            base = None
            if not args.smoke:
                base = tmp / BASE_COMMIT
                base.mkdir()
                archive = subprocess.run(
                    ["git", "-C", args.git_dir, "archive", BASE_COMMIT],
                    capture_output=True,
                    check=True,
                ).stdout
                subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
            from dcmtune.data import bundled_dataset_path

            if not args.no_demo:
                throughput(
                    "demo", bundled_dataset_path(), args.epochs, args.repeats, base, tmp, args.smoke
                )
            if args.qm9:
                path = qm9_like(tmp / "qm9_like.npz", args.qm9_molecules)
                throughput("qm9-like", path, args.epochs, args.repeats, base, tmp, args.smoke)
        if args.streaming or args.only_streaming:
            streaming(args.epochs, args.repeats, tmp, args.smoke)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
