"""Accuracy against charges per atom, read from a learning-curve table: the front a
two-objective sweep (`run.objectives: valid_esp_rmse, charges_per_atom`) converges to.

    python bench/pareto_front.py [--table bench/tables/organic_split2_f16.csv] [--json FILE]

The table (`bench/learning_curves.py record`) holds a grid of configurations, each trained for
T epochs with its validation and test ESP RMSE at every epoch. As in a sweep's ranking
(`dcmtune.analysis.rank`), every configuration competes at its best validation epoch; the front
of (validation ESP RMSE, charges per atom = model.n_dcm) is decided on validation by the
library's `dcmtune.analysis.pareto.front`, and the test ESP RMSE of the same epoch is printed
beside it (reported, never used to choose). The models `rank.select` would pick
(`most_accurate`, `knee`: the cheapest within 5% of the best validation error) are named, and,
per n_dcm, the best configuration at that cost. `--smoke` is the same on the shipped table
(it reads a CSV; nothing is trained).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dcmtune.analysis.pareto import describe_rule, front, select
from dcmtune.sweep.replay import CurveTable

TABLE = Path(__file__).resolve().parent / "tables" / "organic_split2_f16.csv"
COST_KEY = "model.n_dcm"
OBJECTIVES = ("valid_esp_rmse", "charges_per_atom")


def best_epochs(table: CurveTable) -> list[dict]:
    """One row per configuration: its settings, best validation epoch, and the validation and
    test ESP RMSE at that epoch (kcal/mol/e)."""
    rows = []
    for c in range(table.num_configs):
        e = int(np.nanargmin(table.valid[c]))
        rows.append(
            {
                **table.config(c),
                "epoch": e + 1,
                "valid_esp_rmse": float(table.valid[c, e]),
                "test_esp_rmse": float(table.test[c, e]),
            }
        )
    return rows


def front_of(rows: list[dict]) -> tuple[list[dict], dict[str, dict]]:
    """(the front, cheapest first; {rule: the row rank.select picks by it})."""
    points = [[r["valid_esp_rmse"], r[COST_KEY]] for r in rows]
    members = [rows[i] for i in front(points)]
    members.sort(key=lambda r: (r[COST_KEY], r["valid_esp_rmse"]))
    member_points = [[r["valid_esp_rmse"], r[COST_KEY]] for r in members]
    chosen = {
        rule: members[select(member_points, rule, OBJECTIVES)] for rule in ("most_accurate", "knee")
    }
    return members, chosen


def _line(r: dict, keys: tuple[str, ...]) -> str:
    settings = "  ".join(f"{k.split('.')[-1]} {r[k]:g}" for k in keys if k != COST_KEY)
    return (
        f"  {int(r[COST_KEY]):>3}  {r['valid_esp_rmse']:>10.4f}  {r['test_esp_rmse']:>10.4f}  "
        f"{r['epoch']:>5}  {settings}"
    )


def report(table: CurveTable, name: str) -> tuple[list[str], dict]:
    rows = best_epochs(table)
    members, chosen = front_of(rows)
    head = "  n_dcm  valid RMSE   test RMSE  epoch  settings   (ESP RMSE in kcal/mol/e)"
    lines = [
        f"{name}: {table.num_configs} configurations x {table.num_epochs} epochs; each at its "
        "best validation epoch",
        f"front of (valid ESP RMSE, charges per atom), decided on validation: {len(members)} of "
        f"{len(rows)} configurations",
        head,
        *(_line(r, table.keys) for r in members),
    ]
    for rule, r in chosen.items():
        lines.append(
            f"rank.select {describe_rule(rule, OBJECTIVES)}: n_dcm {int(r[COST_KEY])}, "
            f"valid {r['valid_esp_rmse']:.4f}, test {r['test_esp_rmse']:.4f}"
        )
    lines += ["best configuration per n_dcm (the front's candidates at each cost):", head]
    for n in sorted({r[COST_KEY] for r in rows}):
        at = [r for r in rows if r[COST_KEY] == n]
        lines.append(_line(min(at, key=lambda r: r["valid_esp_rmse"]), table.keys))
    record = {"table": name, "front": members, "chosen": chosen}
    return lines, record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", type=Path, default=TABLE, help="a learning-curve table (CSV)")
    p.add_argument("--json", type=Path, help="also write the front and the choices here")
    p.add_argument("--smoke", action="store_true", help="the same on the shipped table")
    args = p.parse_args(argv)
    table_path = TABLE if args.smoke else args.table
    table = CurveTable.read_csv(table_path)
    if COST_KEY not in table.keys:
        p.error(f"--table: {table_path} does not vary {COST_KEY}; expected a grid over n_dcm")
    lines, record = report(table, table_path.name)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
