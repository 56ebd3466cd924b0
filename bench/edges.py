"""Drug-sized molecules at full speed: this tree against the code before it (issue 24's targets).

The default model (16 features, n_dcm 2, max_degree 2, 2 iterations) and batch (8), runs
planned for the default 200 epochs and stopped after `--epochs`; every run in its own process
with one persistent compile cache per side (so repeats measure warm programs). "before" is
BASE_COMMIT (2027483, the code before this issue), extracted with `git archive` into a
temporary directory and run with PYTHONPATH pointing there; "after" is this tree.

Parts (`--parts`, all by default):

  train    training conformers per second of whole epochs (training conformers / epoch time,
           validation included; the median over epochs 2..--epochs), before and after in
           interleaved pairs (the order alternating), on drug60 and drug40 (`--pairs`, 3) and on
           the demo and organic sets (`--pairs-small`, 5). Real sets: bench/molecules (RDKit
           conformers, synthetic ESP targets, split by conformer; `scaling.real_set`); the
           bundled sets split by molecule. Prints each side's median and range, the per-pair
           ratios after / before and their median against the target (drug60 >= 4, drug40 >= 2,
           demo and organic >= 0.97), and after's compiled update programs per size bucket
           (asserted <= 2: at most 2 edge-count shapes per atom-size bucket).
  edge     after only, both points in one process: microseconds of training per computed edge
           (an epoch's train time / the pair slots of every molecule slot it computes, dummies
           included) at about 60 atoms (drug60) and at about 10 (drug10); their ratio against
           the target (<= 1.4), median of `--pairs` runs.
  predict  `Predictor.predict` of one 60-atom molecule (sildenafil, 63 atoms: charges, dipole,
           no ESP) with the untrained default model, warm: the median of 20 calls per process,
           before and after in `--pairs` interleaved pairs; the ratio before / after against the
           target (>= 3).

  python bench/edges.py [--parts train edge predict] [--epochs 4] [--pairs 3] [--pairs-small 5]
                        [--sets drug60 drug40 demo organic] [--git-dir .]

`--smoke`: after only, in this process, a tiny model (4 features, degree 1, 1 iteration, 1
charge per atom), drug10 for training (2 epochs, 1 run), drug10 and drug20 for the edge
part, 3 prediction calls; the ratios are printed against 1 (no "before").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

BASE_COMMIT = "2027483"
SETS = ("drug60", "drug40", "demo", "organic")
TARGETS = {"drug60": 4.0, "drug40": 2.0, "demo": 0.97, "organic": 0.97}
RUN_EPOCHS = 200
PREDICT_CALLS = 20
PREDICT_MOLECULE = HERE / "molecules" / "drug60" / "sildenafil.xyz"
SMOKE_MODEL = dict(n_dcm=1, features=4, max_degree=1, num_iterations=1, num_basis_functions=4)


# --------------------------------------------------------------------------- workers


def train_worker(name: str, epochs: int, out: str, smoke: bool = False) -> dict:
    """Whole-epoch training conformers/s of one run on set `name` (whichever dcmtune is on
    PYTHONPATH), and the update programs it compiled per bucket (after only)."""
    import scaling

    import dcmtune
    from dcmtune.config import ModelConfig
    from dcmtune.train import checkpoints, step

    model = ModelConfig(**SMOKE_MODEL) if smoke else None
    split = "molecule" if name in ("demo", "organic") else "conformer"
    before = getattr(step, "compiled_programs", lambda: {})().get("update")
    row = scaling.epoch_times(
        scaling.dataset("real", name), epochs, Path(out), name, model, split, RUN_EPOCHS
    )
    meta = checkpoints.read_meta(Path(out) / name / "checkpoints" / "latest")
    got = {
        "library": str(Path(dcmtune.__file__).parent),
        "train_cps": row["train_cps"],
        "epoch_s": row["epoch_s"],
        "buckets": len(meta["bucket_bounds"]),
    }
    if before is not None:
        got["update_programs"] = step.compiled_programs()["update"] - before
    return got


def edge_worker(epochs: int, out: str, points=("drug10", "drug60"), smoke: bool = False) -> dict:
    """Microseconds of training per computed edge at each of `points` (this tree)."""
    import scaling

    from dcmtune.config import ModelConfig

    model = ModelConfig(**SMOKE_MODEL) if smoke else None
    return {p: scaling.real_point(p, epochs, Path(out), model)["us_edge"] for p in points}


def predict_worker(calls: int = PREDICT_CALLS, smoke: bool = False) -> dict:
    """Median milliseconds of `Predictor.predict` on one 63-atom molecule, warm."""
    import ase.io
    import jax

    import dcmtune
    from dcmtune.config import ExperimentConfig, ModelConfig
    from dcmtune.model.dcmnet import build_model, init_params
    from dcmtune.predict import Predictor

    cfg = ExperimentConfig(model=ModelConfig(**SMOKE_MODEL)) if smoke else ExperimentConfig()
    params = jax.jit(lambda k: init_params(build_model(cfg.model), k))(jax.random.PRNGKey(0))
    predictor = Predictor(path=None, config=cfg, params=params)
    atoms = ase.io.read(PREDICT_MOLECULE, 0)
    predictor.predict(atoms)  # warm-up: compiles
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        predictor.predict(atoms)
        times.append(time.perf_counter() - t0)
    return {"library": str(Path(dcmtune.__file__).parent), "ms": statistics.median(times) * 1e3}


WORKERS = {"train": train_worker, "edge": edge_worker, "predict": predict_worker}


def run(side: str, part: str, args: list, trees: dict, cache: Path) -> dict:
    """A worker in its own process with `side`'s library on PYTHONPATH."""
    env = dict(
        os.environ,
        PYTHONPATH=f"{trees[side]}{os.pathsep}{HERE}",
        JAX_COMPILATION_CACHE_DIR=str(cache / side),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", part, *map(str, args)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=7200)
    if res.returncode != 0:
        sys.exit(f"{side} {part} failed:\n{res.stderr[-3000:]}")
    got = json.loads(res.stdout.strip().splitlines()[-1])
    if "library" in got and not got["library"].startswith(str(trees[side])):
        sys.exit(f"{side}: ran the library at {got['library']}, expected {trees[side]}")
    return got


# --------------------------------------------------------------------------- reports


def _fresh(tmp: Path) -> Path:
    """A new output directory for one run."""
    return Path(tempfile.mkdtemp(dir=tmp))


def _summary(label: str, values: list[float], unit: str = "") -> str:
    med, lo, hi = statistics.median(values), min(values), max(values)
    return f"{label} {med:.3g}{' ' + unit if unit else ''} ({lo:.3g}-{hi:.3g})"


def _pairs(pairs: int, call) -> dict[str, list]:
    """`pairs` interleaved pairs of call(side), the order alternating."""
    got: dict[str, list] = {"before": [], "after": []}
    for r in range(pairs):
        for side in ("before", "after") if r % 2 == 0 else ("after", "before"):
            got[side].append(call(side))
    return got


def train_part(sets, epochs: int, pairs: int, small_pairs: int, trees, cache, tmp) -> None:
    for name in sets:
        n = small_pairs if name in ("demo", "organic") else pairs
        got = _pairs(
            n, lambda side, name=name: run(side, "train", [name, epochs, _fresh(tmp)], trees, cache)
        )
        ratios = [
            a["train_cps"] / b["train_cps"]
            for a, b in zip(got["after"], got["before"], strict=True)
        ]
        print(
            f"{name}: training conformers/s of whole epochs, median of {n} pairs (range): "
            + _summary("before", [g["train_cps"] for g in got["before"]])
            + ", "
            + _summary("after", [g["train_cps"] for g in got["after"]]),
            flush=True,
        )
        print(
            f"  after / before {statistics.median(ratios):.2f} (pairs "
            f"{', '.join(f'{x:.2f}' for x in ratios)}; target >= {TARGETS[name]})"
        )
        programs = {(g["update_programs"], g["buckets"]) for g in got["after"]}
        print(f"  after: update programs / size buckets per run {sorted(programs)} (<= 2 each)")
        assert all(p <= 2 * b for p, b in programs), programs


def edge_part(epochs: int, pairs: int, trees, cache, tmp, smoke: bool = False) -> None:
    points = ("drug10", "drug20") if smoke else ("drug10", "drug60")
    runs = [
        edge_worker(epochs, str(tmp / f"edge{r}"), points, smoke=True)
        if smoke
        else run("after", "edge", [epochs, _fresh(tmp)], trees, cache)
        for r in range(pairs)
    ]
    ratios = [r[points[1]] / r[points[0]] for r in runs]
    print(
        f"time per computed edge, after, {points[1]} / {points[0]} in the same run: "
        f"{statistics.median(ratios):.2f} (runs {', '.join(f'{x:.2f}' for x in ratios)}; "
        f"us/edge {points[0]} "
        f"{', '.join(f'{r[points[0]]:.1f}' for r in runs)}, {points[1]} "
        f"{', '.join(f'{r[points[1]]:.1f}' for r in runs)}; target <= 1.4)",
        flush=True,
    )


def predict_part(pairs: int, trees, cache, smoke: bool = False) -> None:
    if smoke:
        got = {"before": [], "after": [predict_worker(3, smoke=True)]}
        got["before"] = got["after"]
    else:
        got = _pairs(pairs, lambda side: run(side, "predict", [], trees, cache))
    ratios = [b["ms"] / a["ms"] for a, b in zip(got["after"], got["before"], strict=True)]
    print(
        f"predict one 63-atom molecule, warm, median of {PREDICT_CALLS} calls per process: "
        + _summary("before", [g["ms"] for g in got["before"]], "ms")
        + ", "
        + _summary("after", [g["ms"] for g in got["after"]], "ms")
        + f"; before / after {statistics.median(ratios):.2f} (pairs "
        + f"{', '.join(f'{x:.2f}' for x in ratios)}; target >= 3)",
        flush=True,
    )


# --------------------------------------------------------------------------- main


def _extract(git_dir: str, where: Path) -> Path:
    where.mkdir()
    archive = subprocess.run(
        ["git", "-C", git_dir, "archive", BASE_COMMIT], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--worker":
        part, rest = argv[1], argv[2:]
        typed = [int(x) if x.isdigit() else x for x in rest]
        print(json.dumps(WORKERS[part](*typed)))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", choices=tuple(WORKERS), default=list(WORKERS))
    p.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    p.add_argument("--epochs", type=int, default=4, help="epochs per run (>= 2)")
    p.add_argument("--pairs", type=int, default=3, help="pairs for drug40/drug60, edge, predict")
    p.add_argument("--pairs-small", type=int, default=5, help="pairs for demo and organic")
    p.add_argument("--git-dir", default=str(REPO), help=f"the repository holding {BASE_COMMIT}")
    p.add_argument("--smoke", action="store_true", help="after only, tiny model, in-process")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.smoke:
            got = train_worker("drug10", 2, str(tmp / "train"), smoke=True)
            print(f"drug10 (smoke): training conformers/s {got['train_cps']:.1f}")
            edge_part(2, 1, None, None, tmp, smoke=True)
            predict_part(1, None, None, smoke=True)
            return 0
        trees = {"before": _extract(args.git_dir, tmp / BASE_COMMIT), "after": REPO}
        cache = tmp / "jax-cache"
        if "train" in args.parts:
            train_part(args.sets, args.epochs, args.pairs, args.pairs_small, trees, cache, tmp)
        if "edge" in args.parts:
            edge_part(args.epochs, args.pairs, trees, cache, tmp)
        if "predict" in args.parts:
            predict_part(args.pairs, trees, cache)
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    raise SystemExit(main())
