"""Fine-tuning on a few molecules of a new kind, against training from scratch on the same few.

    python bench/finetune.py [--class heterocycles] [--sizes 5 10 20] [--draws 3] [--valid 5]
                             [--test 15] [--epochs 200] [--finetune-lr 1e-2] [--seed 0]
                             [--data-files organic ...] [--output-dir experiments/finetune]
                             [--json FILE] [--smoke]
    python bench/finetune.py --class peptides --data-files organic large   (the dipeptide study)

1. The molecules of the data (`--data-files`, bundled names or generated files; the bundled
   organic set by default) in one functional class (`--class`, by SMARTS:
   dcmtune.qm.conformers.functional_classes of each molecule's SMILES in the files'
   provenance; "peptides" = capped amino acids and dipeptides) are shuffled with
   --seed into test (--test molecules), validation (--valid) and a draw pool (the rest, at
   least max(--sizes)). Every other molecule of the data is the pretraining data.
2. Pretrain: the default model on the other molecules (90% train, 10% validation by molecule,
   --seed), --epochs epochs; its best-validation checkpoint is the source.
3. For every size n in --sizes and draw d < --draws: n molecules drawn from the pool (seeded by
   --seed, n and d), all their conformers. Fine-tuned: `training.init_from` the source, learning
   rate --finetune-lr (the training default 1e-2; 1e-3 was worse at every size, docs/model.md);
   from scratch: the defaults. Both --epochs epochs on
   the n molecules, validated on the class's validation molecules, training seed d.
4. Each best-validation checkpoint (EMA weights) is evaluated on the class's test molecules:
   ESP RMSE in kcal/mol/e, and so is the source itself (no fine-tuning: "pretrained only").

Prints, per size, the median [min - max] over the draws for fine-tuned and from-scratch runs
and their ratio. `--smoke`: a tiny model, 1 epoch, size 2, one draw.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from _smoke import SMOKE_MODEL

from dcmtune.analysis.breakdown import smiles_from_provenance
from dcmtune.analysis.checkpoints import open_checkpoint
from dcmtune.config import ExperimentConfig, ModelConfig, TrainingConfig
from dcmtune.data import ESPData, load_dataset
from dcmtune.qm.conformers import functional_classes
from dcmtune.train.environment import use_compilation_cache


def _class_molecules(data: ESPData, name: str, files: list[str]) -> tuple[list[str], list[str]]:
    """(molecules of class `name`, every other molecule), sorted, among the data's mol_ids."""
    smiles = smiles_from_provenance(files)
    ids = sorted(set(data.mol_id.tolist()))
    inside = [m for m in ids if m in smiles and name in functional_classes(smiles[m])]
    if not inside:
        raise SystemExit(f"--class {name}: no molecule of {' '.join(files)} is in that class")
    return inside, [m for m in ids if m not in inside]


def _conformers(data: ESPData, molecules: list[str]) -> np.ndarray:
    return np.flatnonzero(np.isin(data.mol_id, molecules))


def _fit(config: ExperimentConfig, data: ESPData, splits: dict, run_dir: Path) -> float:
    """Trains `config` on `splits` of `data`; returns its best checkpoint's test ESP RMSE."""
    from dcmtune.train.loop import fit

    history = run_dir / "history.csv"
    done = (
        history.is_file()
        and len(history.read_text().splitlines()) == config.training.num_epochs + 1
    )
    if not done:  # a finished run is reused; an unfinished one is refused by fit
        result = fit(config, data, run_dir=run_dir, splits=splits)
        if result.status != "completed":
            raise SystemExit(f"{run_dir}: training {result.status}")
    return _test_rmse(run_dir, data, splits["test"])


def _test_rmse(run_dir: Path, data: ESPData, test: np.ndarray) -> float:
    from dcmtune.train.step import evaluate_params

    c = open_checkpoint(run_dir)
    return float(evaluate_params(c.params, data.subset(test), c.config.model)["esp_rmse"])


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f} - {max(values):.3f}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--class", dest="cls", default="heterocycles")
    p.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--valid", type=int, default=5)
    p.add_argument("--test", type=int, default=15)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--finetune-lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-files", nargs="+", default=["organic"], help="bundled names or .npz")
    p.add_argument(
        "--output-dir",
        type=Path,
        default=Path("experiments/finetune"),
        help="finished runs here are reused (same --epochs and --seed expected)",
    )
    p.add_argument("--json", type=Path)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    model = ModelConfig(**SMOKE_MODEL) if args.smoke else ModelConfig()
    if args.smoke:
        args.sizes, args.draws, args.valid, args.test, args.epochs = [2], 1, 1, 2, 1
    out = args.output_dir.resolve()
    use_compilation_cache(out / ".jax_cache")
    data = load_dataset(args.data_files)

    # 1. The class's molecules: test, validation, pool; the others pretrain.
    inside, others = _class_molecules(data, args.cls, args.data_files)
    order = list(np.random.default_rng(args.seed).permutation(inside))
    test, valid, pool = (
        order[: args.test],
        order[args.test : args.test + args.valid],
        order[args.test + args.valid :],
    )
    if len(pool) < max(args.sizes):
        raise SystemExit(
            f"--class {args.cls}: {len(inside)} molecules leave {len(pool)} to draw from "
            f"(need {max(args.sizes)} after --test {args.test} and --valid {args.valid})"
        )
    test_idx, valid_idx = _conformers(data, test), _conformers(data, valid)
    print(
        f"class {args.cls}: {len(inside)} molecules (test {len(test)}, validation {len(valid)}, "
        f"pool {len(pool)}); pretraining on the other {len(others)}"
    )

    def config(name: str, seed: int, **training) -> ExperimentConfig:
        t = TrainingConfig(num_epochs=args.epochs, save_every_n_epochs=0, **training)
        return ExperimentConfig(
            name=name, random_seed=seed, output_dir=str(out), model=model, training=t
        )

    # 2. Pretraining on the other molecules.
    t0 = time.perf_counter()
    shuffled = list(np.random.default_rng(args.seed + 1).permutation(others))
    n_valid = max(1, len(others) // 10)
    pre_splits = {
        "train": _conformers(data, shuffled[n_valid:]),
        "valid": _conformers(data, shuffled[:n_valid]),
        "test": test_idx,
    }
    pre_dir = out / f"pretrain_{args.cls}_s{args.seed}"
    zero_shot = _fit(config("pretrain", args.seed), data, pre_splits, pre_dir)
    print(
        f"pretrained on {len(others)} molecules: class test ESP RMSE {zero_shot:.3f} "
        f"({time.perf_counter() - t0:.0f} s)"
    )

    # 3-4. Fine-tuned against from scratch on the same draws.
    rows = []
    for n in args.sizes:
        for d in range(args.draws):
            drawn = list(np.random.default_rng([args.seed, n, d]).choice(pool, n, replace=False))
            splits = {"train": _conformers(data, drawn), "valid": valid_idx, "test": test_idx}
            lr = args.finetune_lr
            ft = config(f"ft_lr{lr:g}_n{n}_d{d}", d, init_from=str(pre_dir), learning_rate=lr)
            sc = config(f"scratch_n{n}_d{d}", d)
            row = {
                "size": n,
                "draw": d,
                "molecules": sorted(drawn),
                "finetuned": _fit(ft, data, splits, out / ft.name),
                "scratch": _fit(sc, data, splits, out / sc.name),
            }
            rows.append(row)
            print(
                f"n {n:3d} draw {d}: fine-tuned {row['finetuned']:.3f}, "
                f"from scratch {row['scratch']:.3f}",
                flush=True,
            )

    print(
        f"\ntest ESP RMSE (kcal/mol/e) on {len(test)} {args.cls} molecules "
        f"({len(test_idx)} conformers), median [min - max] over {args.draws} draws"
    )
    print(f"pretrained only (no {args.cls} seen): {zero_shot:.3f}")
    print(f"{'molecules':>9}  {'fine-tuned':>24}  {'from scratch':>24}  ratio of medians")
    table = []
    for n in args.sizes:
        f = [r["finetuned"] for r in rows if r["size"] == n]
        s = [r["scratch"] for r in rows if r["size"] == n]
        ratio = statistics.median(f) / statistics.median(s)
        table.append({"size": n, "finetuned": f, "scratch": s, "ratio": ratio})
        print(f"{n:9d}  {_summary(f):>24}  {_summary(s):>24}  {ratio:.2f}")
    print(f"wall time {time.perf_counter() - t0:.0f} s")
    if args.json:
        record = {
            "command": "python bench/finetune.py " + " ".join(argv or []),
            "class": args.cls,
            "data_files": list(args.data_files),
            "test_molecules": sorted(test),
            "valid_molecules": sorted(valid),
            "pretrain_molecules": len(others),
            "pretrained_only": zero_shot,
            "finetune_lr": args.finetune_lr,
            "epochs": args.epochs,
            "runs": rows,
            "table": table,
        }
        args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
