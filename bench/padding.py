"""Epoch time of the demo set in mmml layout (60 atoms x 3,200 grid points) vs compact.

The loader trims padding to the data's real maxima, so a file stored in mmml's layout should
train as fast as the compact file (ratio ~1; the acceptance bound is 1.2). `--stored-padding`
also times the padding as stored (what loading did before compaction; slow).

Both runs read their file through `DataConfig.data_files` (the mmml file with
`dipole_units="e_bohr"`), train the same tiny model for `--epochs` epochs, and report the
median epoch time over epochs 2.. (epoch 1 includes compilation); repeats alternate which layout
runs first.

  python bench/padding.py [--epochs 5] [--repeats 1] [--stored-padding]

`--smoke`: both files written and loaded, one pair of runs of 2 epochs each (the ratio then
compares one epoch of each) of a tinier model (4 features and 4 basis functions) in batches of
8, the files keeping the demo set's mol_id (so both split as the demo set does by default, and
the runs reuse the programs other runs of that model on the demo set compiled); no
--stored-padding.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from dcmtune.config import DataConfig, ExperimentConfig, ModelConfig, TrainingConfig
from dcmtune.data import bundled_dataset_path, load_npz, pad_to, to_arrays
from dcmtune.train.loop import fit

TINY = ModelConfig(n_dcm=1, features=8, max_degree=1, num_iterations=1, num_basis_functions=8)
SMOKE_MODEL = ModelConfig(
    n_dcm=1, features=4, max_degree=1, num_iterations=1, num_basis_functions=4
)


def write_files(directory: Path, keep_mol_id: bool = False) -> tuple[Path, Path]:
    """The demo set as a compact file and in mmml layout (no mol_id in either unless
    `keep_mol_id`, so both are grouped by bond graph and split alike)."""
    demo = load_npz(bundled_dataset_path())
    compact = to_arrays(demo)
    mmml = to_arrays(pad_to(demo, 60, 3200), dipole_units="e_bohr")
    mmml["N"] = mmml["N"][:, None]
    mmml["esp_grid"] = mmml.pop("vdw_surface")
    if not keep_mol_id:
        del compact["mol_id"], mmml["mol_id"]
    paths = directory / "compact.npz", directory / "mmml.npz"
    for path, arrays in zip(paths, (compact, mmml), strict=True):
        np.savez(path, **arrays)
    return paths


def epoch_time(
    path: Path,
    units: str,
    epochs: int,
    out: Path,
    name: str,
    data=None,
    model: ModelConfig = TINY,
    batch_size: int = 16,
) -> float:
    """Median seconds per epoch after the first, training the tiny model (or `model`) on
    `path`."""
    cfg = ExperimentConfig(
        name=name,
        output_dir=str(out),
        random_seed=0,
        model=model,
        data=DataConfig(data_files=[str(path)], dipole_units=units),
        training=TrainingConfig(
            num_epochs=epochs, batch_size=batch_size, warmup_epochs=1, save_every_n_epochs=0
        ),
    )
    hist = fit(cfg, data).history
    return statistics.median(r["epoch_time"] for r in hist[1:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5, help="epochs per run (>= 2)")
    p.add_argument("--repeats", type=int, default=1, help="pairs of runs (median ratio)")
    p.add_argument(
        "--stored-padding",
        action="store_true",
        help="also time the padding as stored (60 x 3,200; slow)",
    )
    p.add_argument("--smoke", action="store_true", help="1 pair of 2-epoch runs")
    args = p.parse_args(argv)
    model, batch_size = TINY, 16
    if args.smoke:
        args.epochs, args.repeats, args.stored_padding = 2, 1, False
        model, batch_size = SMOKE_MODEL, 8
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        compact, mmml = write_files(tmp, keep_mol_id=args.smoke)
        for path, units in ((compact, "debye"), (mmml, "e_bohr")):
            t0 = time.perf_counter()
            d = load_npz(path, dipole_units=units)
            print(
                f"load {path.name}: {time.perf_counter() - t0:.2f} s -> {d.num_conformers} "
                f"conformers, {d.num_atoms} atoms x {d.num_grid} grid points, "
                f"{len(set(d.mol_id))} molecules ({d.mol_id_source})"
            )
        ratios = []
        for r in range(args.repeats):
            # Alternate which layout runs first: the second run reuses the compiled program.
            runs = [("compact", compact, "debye"), ("mmml", mmml, "e_bohr")][:: 1 - 2 * (r % 2)]
            times = {
                name: epoch_time(
                    path, units, args.epochs, tmp, f"{name}{r}", model=model, batch_size=batch_size
                )
                for name, path, units in runs
            }
            tc, tm = times["compact"], times["mmml"]
            ratios.append(tm / tc)
            print(
                f"epoch time: compact {tc * 1e3:.0f} ms, mmml layout {tm * 1e3:.0f} ms, "
                f"ratio {tm / tc:.3f}"
            )
        print(
            f"ratio mmml layout / compact (median of {args.repeats}): "
            f"{statistics.median(ratios):.3f}  (acceptance: <= 1.2)"
        )
        if args.stored_padding:
            padded = pad_to(load_npz(mmml, dipole_units="e_bohr"), 60, 3200)
            ts = epoch_time(mmml, "e_bohr", args.epochs, tmp, "stored", data=padded)
            print(
                f"padding as stored (60 x 3,200): {ts * 1e3:.0f} ms per epoch, "
                f"{ts / tc:.1f}x the compact file"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
