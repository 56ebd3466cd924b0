"""`python -m dcmtune.sweep SPEC.yaml`: a hyper-parameter sweep of DCMNet with Ray Tune.

  python -m dcmtune.sweep quick                               # the demo sweep (2 CPU cores)
  python -m dcmtune.sweep my.yaml --debug                     # one trial, here, no Ray
  python -m dcmtune.sweep my.yaml --resume                    # finish an interrupted sweep
  python -m dcmtune.sweep my.yaml --address auto --dashboard  # on a running cluster
  python -m dcmtune.sweep accurate --data mine.npz --set training.num_epochs=150 --dry-run

Every trial writes its TensorBoard event stream into its directory; the Optuna study is a
journal file in the experiment directory (watch them with `tensorboard --logdir` and
`optuna-dashboard`); a spec's `tracking:` adds MLflow / W&B. The command parses its flags,
applies `--data`/`--set` to the spec before it is validated (`dcmtune.sweep.overrides`),
and calls the driver (`dcmtune.sweep.driver`), or, with `--dry-run`, prints what the sweep would
do (`dcmtune.sweep.plan`). Bad input (spec, overrides, data, resources) exits with status 2 and
one line naming the key, before Ray starts and before anything is written.
"""

from __future__ import annotations

import argparse
import math
import shlex
from collections.abc import Sequence

from dcmtune import metrics
from dcmtune.cli import OneLineParser, TableReporter, run_cli
from dcmtune.config import ConfigError
from dcmtune.data.file_format import DataError
from dcmtune.sweep import local_ray
from dcmtune.sweep.driver import (
    SweepOutcome,
    _check_local_resources,
    _fmt_point,
    _local_resources,
    debug_run_dir,
    prepare,
    run_debug,
    run_sweep,
)
from dcmtune.sweep.experiment_store import check_experiment_dir
from dcmtune.sweep.overrides import Override, data_override, parse_set
from dcmtune.sweep.plan import describe
from dcmtune.sweep.resources import resolve_resources
from dcmtune.sweep.spec import SpecError, SweepSpec, find_spec, load_spec

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m dcmtune.sweep",
        description="Hyper-parameter sweep of DCMNet with Ray Tune (Optuna TPE + ASHA).",
    )
    p.add_argument("spec", help="sweep spec YAML (or the name of a shipped one, e.g. quick)")
    p.add_argument(
        "--debug",
        action="store_true",
        help="one trial in this process, no Ray, full epoch table, fail fast",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="finish the interrupted experiment <storage_path>/<name>",
    )
    p.add_argument(
        "--address", help="an existing Ray cluster (auto or host:port); default: start a local Ray"
    )
    p.add_argument(
        "--dashboard",
        action="store_true",
        help="start the Ray dashboard (needs the dashboard extra)",
    )
    p.add_argument(
        "--dashboard-host",
        default="127.0.0.1",
        help="dashboard address (default 127.0.0.1; 0.0.0.0 exposes it, and then "
        "Ray's other ports listen on all interfaces too)",
    )
    p.add_argument("--dashboard-port", type=int, help="dashboard port (default 8265)")
    p.add_argument(
        "--storage-path",
        help="directory of experiments (default: the spec's run.storage_path, else ./ray_results)",
    )
    p.add_argument(
        "--data",
        nargs="+",
        metavar="FILE",
        help="the data: .npz files or bundled set names (replaces data.data_files)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="set a fixed spec key, e.g. training.num_epochs=300 (repeatable; YAML values)",
    )
    p.add_argument("--num-samples", type=int, help="the same as --set run.num_samples=N")
    p.add_argument("--name", help="override the experiment name")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved spec, the search space, the budget, the resources and where "
        "results go; start and write nothing",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no Tune status tables")
    return p


def _overrides(args) -> list[Override]:
    """--data, --set and --num-samples as (dotted key, value) pairs, in that order."""
    out = [data_override(args.data)] if args.data is not None else []
    out += [parse_set(item) for item in args.overrides]
    if args.num_samples is not None:
        if args.num_samples < 1:
            raise SpecError(f"--num-samples: expected at least 1, got {args.num_samples}")
        out.append(("run.num_samples", args.num_samples))
    return out


def _load(args) -> SweepSpec:
    spec = load_spec(
        find_spec(args.spec), storage_path=args.storage_path, overrides=_overrides(args)
    )
    if args.name is not None:
        spec = spec.renamed(args.name)
    return spec


def _dry_run(spec: SweepSpec, prep, address: str | None) -> int:
    """Prints what the sweep would do; starts and writes nothing."""
    resources = cluster = None
    if address is None:
        cluster = _local_resources()
        resources = resolve_resources(spec.run.resources, cluster)
    for line in describe(spec, prep.split_sizes, resources, cluster):
        print(line)
    return 0


def _main(args: argparse.Namespace) -> int:
    spec = _load(args)
    if args.debug and (args.resume or args.address):
        raise SpecError("--debug: runs one trial in this process; drop --resume/--address")
    if args.dry_run and (args.debug or args.resume):
        raise SpecError("--dry-run: describes a new sweep; drop --debug/--resume")
    if args.dashboard_port is not None and not 0 < args.dashboard_port < 65536:
        raise SpecError(
            f"--dashboard-port: expected a port number 1-65535, got {args.dashboard_port}"
        )
    if args.dry_run:
        return _dry_run(spec, prepare(spec), args.address)
    if args.address is None and not args.debug:
        local_ray.prefer_loopback(args.dashboard_host)  # before Ray is imported
        if args.dashboard:
            local_ray.check_dashboard_extra()
    prep = prepare(spec)  # bad input -> exit 2 before any training
    if args.debug:
        run_dir = debug_run_dir(spec)
        print(f"debug trial of {spec.name}: {_fmt_point(spec.debug_point()) or '(no search)'}")
        print(f"run directory: {run_dir}", flush=True)
        num_epochs = spec.config_for(spec.debug_point()).training.num_epochs
        result = run_debug(
            spec, TableReporter(num_epochs, metrics.table_rows()), data=prep.data, run_dir=run_dir
        )
        print(
            f"{result.status}: best valid_loss {result.best_valid_loss:.6g} at epoch "
            f"{result.best_epoch}; run directory {result.run_dir}"
        )
        return 0 if result.status == "completed" else 3
    check_experiment_dir(spec, args.resume)
    if args.address is None:
        _check_local_resources(spec)
    outcome = run_sweep(
        spec,
        resume=args.resume,
        address=args.address,
        dashboard=args.dashboard,
        dashboard_host=args.dashboard_host,
        dashboard_port=args.dashboard_port,
        data=prep.data,
        verbose=0 if args.quiet else 1,
        echo=print,
    )
    _print_outcome(spec, outcome, args)
    return 0 if outcome.status == "completed" else 130


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: 0 done, 2 bad input, 3 the debug trial diverged, 130 interrupted."""
    return run_cli(_main, build_parser(), argv, bad_input=(SpecError, DataError, ConfigError))


def _resume_command(spec: SweepSpec, args) -> str:
    """The command that continues this sweep: the same spec, name, storage and overrides."""
    words = ["python", "-m", "dcmtune.sweep", args.spec, "--resume"]
    if args.storage_path:
        words += ["--storage-path", spec.run.storage_path]
    if args.name:
        words += ["--name", spec.name]
    if args.data is not None:
        words += ["--data", *args.data]
    for item in args.overrides:
        words += ["--set", item]
    if args.num_samples is not None:
        words += ["--num-samples", str(args.num_samples)]
    return shlex.join(words)


def _print_outcome(spec: SweepSpec, outcome: SweepOutcome, args) -> None:
    res = outcome.results
    print(
        f"\n{outcome.status}: {len(res)} trials ({res.num_errors} errors) in {spec.experiment_uri}"
    )
    if outcome.status != "completed":
        print(f"continue with: {_resume_command(spec, args)}")
    best = outcome.best
    if best is None:
        print(f"no trial reported a finite {spec.run.metric}")
        return
    print(
        f"best trial: {best.trial_id} at epoch {best.epoch} "
        f"({spec.run.metric} = {best.metrics.get(spec.run.metric):.5g}"
        + ("; the most accurate: the ranking below gives the front" if spec.run.costs else "")
        + ")"
    )
    print(f"  searched: {_fmt_point(best.config) or '(nothing)'}")
    for name in dict.fromkeys(
        spec.run.objective_metrics
        + tuple(f"valid_{n}" for n in metrics.TABLE_ROWS)
        + ("train_esp_rmse",)
    ):
        v = best.metrics.get(name)
        if v is not None and math.isfinite(v):
            print(f"  {name:<18} {v:.5g}")
    print(f"  checkpoint: {best.checkpoint}")
    print(f"  trial directory: {best.path}")
    ranking = outcome.ranking
    if ranking is not None and len(ranking):
        from dcmtune.analysis.report import format_ranking

        print()
        print(format_ranking(ranking))
