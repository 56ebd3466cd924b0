"""Compiles of a trial process: the persistent cache across processes, cold and warm start.

Every measurement is a fresh Python process training the default model (`ExperimentConfig()`,
one epoch) on the bundled demo set, with the environment a sweep trial gets
(`dcmtune.xla_env.trial_env_vars`: JAX_PLATFORMS=cpu and the persistent compilation cache).
Inside, jax.monitoring counts XLA compiles and persistent-cache hits/misses, and the times
from process start (the parent's clock just before it spawns the process) to

  first_update  the first optimizer update finished (blocked on), and
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


# --------------------------------------------------------------------------- the trial process


def child(out_dir: str) -> None:
    """One trial-like run; prints one JSON line of times and compile counts."""
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

    import dcmtune.train as tr
    from dcmtune.config import ExperimentConfig
    from dcmtune.data import load_dataset

    times = {"import": time.time() - t0}

    class FirstUpdate:  # wraps the jitted update; attributes (lower, ...) pass through
        def __init__(self, fn):
            self.fn = fn

        def __call__(self, *args, **kwargs):
            out = self.fn(*args, **kwargs)
            if "first_update" not in times:
                jax.block_until_ready(out)
                times["first_update"] = time.time() - t0
            return out

        def __getattr__(self, name):
            return getattr(self.fn, name)

    tr._update = FirstUpdate(tr._update)

    def reporter(epoch, metrics, checkpoint_dir):
        times.setdefault("first_epoch", time.time() - t0)

    cfg = ExperimentConfig(name="run", output_dir=out_dir).replace(**{"training.num_epochs": 1})
    tr.fit(cfg, load_dataset(), reporter=reporter)
    big = sorted(programs.items(), key=lambda kv: -kv[1])[:4]
    print(json.dumps({**times, **stats, "big_programs": {k: round(v, 2) for k, v in big}}))


# --------------------------------------------------------------------------- the driver


def run_process(tree: Path, cache_dir: Path) -> dict:
    """Runs `child` from source tree `tree` with a trial's environment and `cache_dir`."""
    from dcmtune.sweep.resources import TrialResources, trial_env_vars

    env = dict(
        os.environ, PYTHONPATH=str(tree), **trial_env_vars(TrialResources(cpu=1, gpu=0), cache_dir)
    )
    env.pop("XLA_FLAGS", None)
    with tempfile.TemporaryDirectory() as out:
        env["BENCH_T0"] = repr(time.time())
        p = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", out],
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


def _row(label: str, r: dict) -> str:
    return (
        f"{label:<14} {r['import']:>7.2f} {r['first_update']:>8.2f} {r['first_epoch']:>8.2f} "
        f"{r['compiles']:>8d} {r['compile_s']:>9.2f} {r['cache_hits']:>5d} "
        f"{r['cache_misses']:>6d}  {r['big_programs']}"
    )


HEADER = (
    f"{'process':<14} {'import':>7} {'update1':>8} {'epoch1':>8} {'compiles':>8} "
    f"{'compile_s':>9} {'hits':>5} {'misses':>6}  largest compiles (s)"
)


def _summary(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f} s (range {min(values):.2f}-{max(values):.2f})"


def main() -> None:
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
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child)
        return

    print(f"load average at start: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        after = extract(args.after, tmp) if args.after else ROOT
        if "cache" in args.parts:
            print(f"\n## {args.processes} trial processes sharing one empty compile cache")
            print(HEADER)
            cache = tmp / "shared_cache"
            for i in range(args.processes):
                print(_row(f"process {i + 1}", run_process(after, cache)), flush=True)

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
                    f"ratio after/before {statistics.median(a) / statistics.median(b):.2f} "
                    f"(per pair: {', '.join(f'{x / y:.2f}' for x, y in zip(a, b, strict=True))})"
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


if __name__ == "__main__":
    main()
