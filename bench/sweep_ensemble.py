"""What a sweep's best few models are worth together: top-k ensembles of a sweep against the
defaults, on the test molecules of `bench/sweep_value.py` records.

    python bench/sweep_ensemble.py bench/tables/sweep_value_split0.json [more records ...]
                                   [--top-k 1 3 5] [--json FILE]

For each record (one sweep and its default runs on one split; nothing is trained here):
1. The sweep's top-k trials by validation ESP RMSE (`dcmtune.analysis.top_checkpoints`, the
   ranking's rule: each trial at its best-validation checkpoint), for every k in --top-k.
2. The ensemble's ESP at every test grid point is the mean of its members' (members may differ
   in n_dcm: the ESP is defined for all of them); its test ESP RMSE (kcal/mol/e) is the root of
   the mean over conformers of their mean squared errors, as the trainer's `esp_rmse`. k = 1 is
   the top trial by validation.
3. The same for the record's default runs (training seeds): each alone, and all together.

Prints per record and k: the sweep's top-k ensemble, the defaults' median single run and the
defaults' ensemble, and the ratios of the sweep's ensemble to both (issue 21's target is a
ratio <= 0.90 to the defaults' median). The sweep's cost is its trial-epochs, the defaults'
ensemble's the sum of its runs' epochs.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from pathlib import Path

import numpy as np

from dcmtune.analysis import analyze_checkpoint
from dcmtune.analysis.rank import top_checkpoints
from dcmtune.units import HARTREE_TO_KCAL


@functools.cache
def _test_esp(checkpoint: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predicted ESP (M, G), reference ESP (M, G), grid mask (M, G)) on the run's test split,
    Hartree/e; each checkpoint evaluated once (it sits in several ensembles)."""
    a = analyze_checkpoint(checkpoint, "test")
    mask = np.arange(a.data.esp.shape[1])[None, :] < a.data.n_grid[:, None]
    return np.asarray(a.esp_pred, np.float64), np.asarray(a.data.esp, np.float64), mask


def ensemble_rmse(members: list[Path]) -> float:
    """Test ESP RMSE (kcal/mol/e) of the members' mean ESP, as every other ESP RMSE here: the
    square root of the mean over conformers of each conformer's mean squared error."""
    preds, ref, mask = [], None, None
    for m in members:
        pred, r, k = _test_esp(m)
        if ref is not None and (r.shape != ref.shape or not np.array_equal(r, ref)):
            raise SystemExit(f"{m}: another test split than the other members'")
        preds.append(pred)
        ref, mask = r, k
    assert ref is not None and mask is not None
    err2 = np.where(mask, (np.mean(preds, axis=0) - ref) * HARTREE_TO_KCAL, 0.0) ** 2
    per_conformer = err2.sum(axis=1) / mask.sum(axis=1)  # (M,)
    return float(np.sqrt(per_conformer.mean()))


def _default_runs(record: dict) -> list[Path]:
    root = Path(record["experiment"] + "_defaults")
    runs = [root / f"defaults_seed{d['seed']}" for d in record["defaults"]]
    missing = [r for r in runs if not r.is_dir()]
    if missing:
        raise SystemExit(f"{missing[0]}: the record's default run is not there")
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("records", nargs="+", type=Path, help="bench/sweep_value.py --json records")
    p.add_argument("--top-k", type=int, nargs="+", default=[1, 3, 5])
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    out = []
    for path in args.records:
        record = json.loads(path.read_text())
        defaults = _default_runs(record)
        singles = [ensemble_rmse([r]) for r in defaults]
        together = ensemble_rmse(defaults)
        median = statistics.median(singles)
        variant = record.get("variant") or {}
        print(
            f"\n{path.name}: split seed {record['split_seed']}, sweep of {record['trials']} "
            f"trials, {record['trial_epochs']} trial-epochs{' ' + str(variant) if variant else ''}"
        )
        print(
            f"defaults: single runs {', '.join(f'{s:.3f}' for s in singles)} (median "
            f"{median:.3f}); ensemble of {len(defaults)}: {together:.3f}"
        )
        print(
            f"{'top-k':>5}  {'members':>7}  {'ensemble':>8}  {'/ defaults median':>17}  "
            f"{'/ defaults ensemble':>19}"
        )
        rows = []
        for k in args.top_k:
            members = top_checkpoints(record["experiment"], k)
            rmse = ensemble_rmse(members)
            row = {
                "top_k": k,
                "members": [str(m) for m in members],
                "test_esp_rmse": rmse,
                "ratio_to_defaults_median": rmse / median,
                "ratio_to_defaults_ensemble": rmse / together,
            }
            rows.append(row)
            print(
                f"{k:5d}  {len(members):7d}  {rmse:8.3f}  {rmse / median:17.3f}  "
                f"{rmse / together:19.3f}"
            )
        out.append(
            {
                "record": str(path),
                "split_seed": record["split_seed"],
                "variant": variant,
                "trial_epochs": record["trial_epochs"],
                "defaults_single": singles,
                "defaults_median": median,
                "defaults_ensemble": together,
                "sweep": rows,
            }
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
