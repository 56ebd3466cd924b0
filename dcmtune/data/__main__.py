"""`python -m dcmtune.data {generate,inspect,validate,convert,verify}`: make, summarise, check,
convert and verify ESP files.

  generate  PySCF ESP data for ASE g2 molecules, .xyz files and SMILES (needs the `qm` extra)
  inspect   a per-molecule summary table of a dataset, padding efficiency, grouping, units checks
  validate  the loader's checks; exit 2 on failure
  convert   mmml-layout (or any loadable) files -> one compact dcmtune file + provenance JSON
  verify    regenerate a sample of a generated file's molecules and compare within tolerances

The command crosses the wing order here and only here: the data commands come from
`dcmtune.data.commands`, the generator's from `dcmtune.qm.commands`, and `generate --address`
joins a Ray cluster through `dcmtune.sweep.ray_generate`. Bad inputs exit with
status 2 and one line on stderr; nothing is written.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dcmtune.cli import OneLineParser, run_cli
from dcmtune.data import commands as data_commands
from dcmtune.data.file_format import DataError
from dcmtune.qm import commands as qm_commands
from dcmtune.qm.specs import QMError, SCFError, TaskLost

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m dcmtune.data", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    qm_commands.add_commands(sub)
    data_commands.add_commands(sub)
    return p


def _connect_ray(address: str, cpus_per_task: int):
    """Joins the Ray cluster at `address` for `generate --address` (Ray is the sweep's)."""
    from dcmtune.sweep.ray_generate import connect

    return connect(address, cpus_per_task)


def _run(args: argparse.Namespace) -> int:
    if args.command == "generate":
        return qm_commands.generate(args, connect=_connect_ray)
    return {**data_commands.COMMANDS, **qm_commands.COMMANDS}[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 done, 2 bad input (nothing written), 1 the computation or the disk failed."""
    return run_cli(
        _run,
        build_parser(),
        argv,
        bad_input=(DataError, QMError),
        failures=(SCFError, TaskLost, OSError),
        verbose=lambda args: args.verbose,
    )


if __name__ == "__main__":
    raise SystemExit(main())
