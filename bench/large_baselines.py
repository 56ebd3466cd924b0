"""The split-only baselines of `accuracy.py generalise --by-size` for finished runs, without
training again: reads each run's recorded split (split.json) and scores MMFF94, Gasteiger,
AM1-BCC, EspalomaCharge, GFN2-xTB, Mulliken, element, LSQ, RESP and `mono` on its test molecules,
all of them and per size group (<= 9 and >= 10 heavy atoms), as `accuracy.py` does.

  python bench/large_baselines.py RUN_DIR [RUN_DIR ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import types
from pathlib import Path

from accuracy import GENERALISE_COLS, _element, _splits, _test_baselines, size_groups

from dcmtune.data import load_dataset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    rows = []
    for run in args.runs:
        cfg = json.loads((run / "config.json").read_text())
        files = list(cfg["data"]["data_files"])
        data = load_dataset(files)
        idx = json.loads((run / "split.json").read_text())["indices"]
        s = _splits(run, data)
        ns = types.SimpleNamespace(data_files=files)
        for label, test, test_idx in size_groups(s["test"], idx["test"]):
            row = {
                "run": str(run),
                "split_seed": cfg["data"]["split_seed"],
                "group": label,
                "test_molecules": int(len(set(test.mol_id))),
                "element": _element(s["train"], test),
                **_test_baselines(ns, data, test, test_idx),
            }
            rows.append(row)
            cells = "  ".join(f"{c} {row[c]:.3f}" for c in GENERALISE_COLS if c in row)
            print(
                f"seed {row['split_seed']} {label} ({row['test_molecules']} mol): {cells}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
