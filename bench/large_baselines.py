"""The test errors of finished runs per size group, without training again: reads each run's
recorded split (split.json) and scores its best checkpoint (`model`) and, unless `--model-only`,
the split-only baselines of `accuracy.py generalise --by-size` (MMFF94, Gasteiger, AM1-BCC,
EspalomaCharge, GFN2-xTB, Mulliken, element, LSQ, RESP and `mono`) on its test molecules, all of
them and per size group (<= 9 and >= 10 heavy atoms), as `accuracy.py` does. A run directory or a
checkpoint directory with the run's config.json and split.json beside it (a shipped model's).

  python bench/large_baselines.py RUN_DIR [RUN_DIR ...] [--model-only] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import types
from pathlib import Path

from accuracy import GENERALISE_COLS, _element, _splits, _test_baselines, size_groups

from dcmtune.config import ExperimentConfig
from dcmtune.data import load_dataset
from dcmtune.data.dataset import ESPData
from dcmtune.train import checkpoints as ckpt
from dcmtune.train.step import evaluate_params


def model_rmse(run: Path, cfg: ExperimentConfig, test: ESPData) -> tuple[int, float]:
    """(epoch, test ESP RMSE) of the run's best checkpoint (EMA weights when the run kept them);
    `run` may be the checkpoint directory itself."""
    where = run if (run / "state.msgpack").is_file() else run / "checkpoints" / "best"
    state, meta = ckpt.load_checkpoint(where)
    params = state["ema_params"] if cfg.training.use_ema else state["params"]
    return int(meta["epoch"]), evaluate_params(params, test, cfg.model)["esp_rmse"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--model-only", action="store_true", help="score the checkpoints only")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    rows = []
    for run in args.runs:
        cfg = ExperimentConfig.from_dict(json.loads((run / "config.json").read_text()))
        files = list(cfg.data.data_files)
        data = load_dataset(files)
        idx = json.loads((run / "split.json").read_text())["indices"]
        s = _splits(run, data)
        ns = types.SimpleNamespace(data_files=files)
        for label, test, test_idx in size_groups(s["test"], idx["test"]):
            epoch, rmse = model_rmse(run, cfg, test)
            row = {
                "run": str(run),
                "split_seed": cfg.data.split_seed,
                "train_molecules": int(len(set(s["train"].mol_id))),
                "group": label,
                "test_molecules": int(len(set(test.mol_id))),
                "best_epoch": epoch,
                "model": rmse,
            }
            if not args.model_only:
                row["element"] = _element(s["train"], test)
                row.update(_test_baselines(ns, data, test, test_idx))
            rows.append(row)
            cells = "  ".join(f"{c} {row[c]:.3f}" for c in GENERALISE_COLS if c in row)
            print(
                f"seed {row['split_seed']} train {row['train_molecules']} mol, {label} "
                f"({row['test_molecules']} mol): {cells}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
