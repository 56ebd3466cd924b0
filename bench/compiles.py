"""Compiles of a trial process: the persistent cache across processes, cold and warm start.

Every measurement is a fresh Python process training the default model (`ExperimentConfig()`,
one epoch) on the bundled demo set, with the environment a sweep trial gets
(`dcmtune.sweep.resources.trial_env_vars`: JAX_PLATFORMS=cpu and the persistent compilation
cache).
Inside, jax.monitoring counts XLA compiles and persistent-cache hits/misses, and the times
from process start (the parent's clock just before it spawns the process) to

  first_update  the first optimizer update finished (blocked on; timed through the fit loop's
                public `add_sums`, so only in trees that have `dcmtune.train.loop`: a tree
                before the subpackages, such as c822047, shows '-' and the before/after
                ratio of first_update is then not measured), and
  first_epoch   the first epoch's report, validation included.

Parts:
  cache   N processes in a row sharing one empty cache dir: the first compiles and fills it,
          the later ones only hit it (compiles = 0 misses).
  cold    before/after, interleaved: `--before` (a git revision, extracted with git archive
          and run through PYTHONPATH) and this tree, each with an empty cache dir; medians of
          `--repeats`, and the ratio after/before (target <= 0.5).
  warm    this tree with a warm cache (trial start; target <= 2 s to the first update).

  python bench/compiles.py [--parts cache cold warm] [--repeats 3] [--processes 3]
                           [--before c822047] [--after REV]

`--after REV` measures git revision REV (extracted like `--before`) instead of this working
tree, so the tree may change while the bench runs.

`--smoke`: part `cache` only, 2 processes of this working tree (no other revision), each
training a tiny model (4 features, degree 1, 1 iteration, 1 charge per atom) for one epoch;
`--cache-dir DIR` gives them a cache that may already be warm (the test's shared one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOKE_MODEL = {
    "model.n_dcm": 1,
    "model.features": 4,
    "model.max_degree": 1,
    "model.num_iterations": 1,
    "model.num_basis_functions": 4,
}


# --------------------------------------------------------------------------- the trial process


def child(out_dir: str, smoke: bool = False) -> None:
    """One trial-like run; prints one JSON line of times and compile counts.

    Runs against whichever dcmtune PYTHONPATH provides (this tree, or an extracted revision).
    The first update is timed through the public `add_sums` of `dcmtune.train.loop`, which the
    fit loop calls once per update with the update's sums: where that module does not exist (the
    trees before the subpackages, c822047 among them) no public name is called once per update,
    and first_update is left out (null)."""
    t0 = float(os.environ["BENCH_T0"])
    import jax
    from jax import monitoring

    stats = {"compiles": 0, "compile_s": 0.0, "cache_hits": 0, "cache_misses": 0}
    programs: dict[str, float] = {}

    def on_duration(event, secs, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            stats["compiles"] += 1
            stats["compile_s"] += secs
            name = kw.get("fun_name", "?")
            programs[name] = programs.get(name, 0.0) + secs

    def on_event(event, **kw):
        if event == "/jax/compilation_cache/cache_hits":
            stats["cache_hits"] += 1
        elif event == "/jax/compilation_cache/cache_misses":
            stats["cache_misses"] += 1

    monitoring.register_event_duration_secs_listener(on_duration)
    monitoring.register_event_listener(on_event)

    import dcmtune
    from dcmtune.config import ExperimentConfig
    from dcmtune.data import load_dataset

    try:
        from dcmtune.train import loop
    except ImportError:  # a tree before the subpackages: dcmtune.train is one module
        loop = None
    times: dict[str, float | None] = {"import": time.time() - t0, "first_update": None}

    if loop is not None:
        add_sums = loop.add_sums

        def first_update(sums, s):  # s: the sums of the update just dispatched
            if times["first_update"] is None:
                jax.block_until_ready(s)
                times["first_update"] = time.time() - t0
            return add_sums(sums, s)

        loop.add_sums = first_update

    def reporter(epoch, metrics, checkpoint_dir):
        times.setdefault("first_epoch", time.time() - t0)

    changes: dict = {"training.num_epochs": 1}
    if smoke:
        changes.update(SMOKE_MODEL)
    cfg = ExperimentConfig(name="run", output_dir=out_dir).replace(**changes)
    dcmtune.fit(cfg, load_dataset(), reporter=reporter)
    big = sorted(programs.items(), key=lambda kv: -kv[1])[:4]
    print(json.dumps({**times, **stats, "big_programs": {k: round(v, 2) for k, v in big}}))


# --------------------------------------------------------------------------- the driver


def run_process(tree: Path, cache_dir: Path, smoke: bool = False) -> dict:
    """Runs `child` from source tree `tree` with a trial's environment and `cache_dir`."""
    from dcmtune.sweep.resources import TrialResources, trial_env_vars

    env = dict(
        os.environ, PYTHONPATH=str(tree), **trial_env_vars(TrialResources(cpu=1, gpu=0), cache_dir)
    )
    env.pop("XLA_FLAGS", None)
    with tempfile.TemporaryDirectory() as out:
        env["BENCH_T0"] = repr(time.time())
        p = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", out]
            + (["--smoke"] if smoke else []),
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            cwd=out,
        )
    if p.returncode != 0:
        raise RuntimeError(f"trial process failed ({tree}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def extract(rev: str, dest: Path) -> Path:
    """The tree of git revision `rev` of this repository, extracted under `dest`."""
    archive = dest / "src.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "-C", str(ROOT), "archive", rev], stdout=f, check=True)
    tree = dest / f"rev-{rev}"
    with tarfile.open(archive) as t:
        t.extractall(tree, filter="data")
    return tree


def _seconds(x: float | None, width: int) -> str:
    return f"{x:>{width}.2f}" if x is not None else f"{'-':>{width}}"


def _row(label: str, r: dict) -> str:
    return (
        f"{label:<14} {r['import']:>7.2f} {_seconds(r['first_update'], 8)} "
        f"{r['first_epoch']:>8.2f} "
        f"{r['compiles']:>8d} {r['compile_s']:>9.2f} {r['cache_hits']:>5d} "
        f"{r['cache_misses']:>6d}  {r['big_programs']}"
    )


HEADER = (
    f"{'process':<14} {'import':>7} {'update1':>8} {'epoch1':>8} {'compiles':>8} "
    f"{'compile_s':>9} {'hits':>5} {'misses':>6}  largest compiles (s)"
)


def _summary(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "not measured"
    return f"median {statistics.median(got):.2f} s (range {min(got):.2f}-{max(got):.2f})"


def _ratio(after: list[float | None], before: list[float | None]) -> str:
    """after/before of the medians and per pair, over the pairs where both were measured."""
    pairs = [(a, b) for a, b in zip(after, before, strict=True) if a is not None and b is not None]
    if not pairs:
        return "not measured in both trees"
    med = statistics.median(a for a, _ in pairs) / statistics.median(b for _, b in pairs)
    return f"{med:.2f} (per pair: {', '.join(f'{a / b:.2f}' for a, b in pairs)})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--parts", nargs="+", default=["cache", "cold", "warm"], choices=["cache", "cold", "warm"]
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--processes", type=int, default=3)
    p.add_argument(
        "--before",
        default="c822047",
        help="git revision of the 'before' tree (default: the branch point of #14 item 2)",
    )
    p.add_argument(
        "--after", default="", help="git revision of the 'after' tree (default: this working tree)"
    )
    p.add_argument(
        "--cache-dir",
        help="the compile cache of part `cache` (default: a new empty one); with --smoke",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="part cache only, 2 processes of this tree training a tiny model",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.smoke)
        return 0
    if args.smoke:
        args.parts, args.processes, args.after = ["cache"], 2, ""

    print(f"load average at start: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        after = extract(args.after, tmp) if args.after else ROOT
        if "cache" in args.parts:
            cache = Path(args.cache_dir) if args.cache_dir else tmp / "shared_cache"
            print(
                f"\n## {args.processes} trial processes sharing one "
                f"{'' if args.cache_dir else 'empty '}compile cache"
            )
            print(HEADER)
            for i in range(args.processes):
                print(_row(f"process {i + 1}", run_process(after, cache, args.smoke)), flush=True)

        warm_cache = tmp / "warm_cache"
        if "cold" in args.parts:
            print(f"\n## cold start (empty cache), before = {args.before}, after = this tree")
            print(HEADER)
            before_tree = extract(args.before, tmp)
            res: dict[str, list[dict]] = {"before": [], "after": []}
            for i in range(args.repeats):
                for label, tree in (("before", before_tree), ("after", after)):
                    cache = tmp / f"cold_{label}_{i}"
                    r = run_process(tree, cache)
                    res[label].append(r)
                    print(_row(f"{label} {i + 1}", r), flush=True)
            for key in ("first_update", "first_epoch"):
                b = [r[key] for r in res["before"]]
                a = [r[key] for r in res["after"]]
                print(
                    f"{key}: before {_summary(b)}; after {_summary(a)}; "
                    f"ratio after/before {_ratio(a, b)}"
                )
            for key in ("compiles", "compile_s"):
                b = statistics.median(r[key] for r in res["before"])
                a = statistics.median(r[key] for r in res["after"])
                print(f"{key}: before {b:.4g}, after {a:.4g} (medians)")

        if "warm" in args.parts:
            print("\n## warm start (cache filled by one earlier process)")
            print(HEADER)
            run_process(after, warm_cache)
            rows = [run_process(after, warm_cache) for _ in range(args.repeats)]
            for i, r in enumerate(rows):
                print(_row(f"warm {i + 1}", r))
            print(f"first_update: {_summary([r['first_update'] for r in rows])} (target <= 2 s)")
            print(f"import: {_summary([r['import'] for r in rows])}")
    print(f"load average at end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
