"""`python -m dcmtune.rank EXPERIMENT`: an entry-point shim (docs/architecture.md); the command
lives in `dcmtune.analysis.commands` and the library in `dcmtune.analysis.rank`."""

from dcmtune.analysis.commands import rank_main

if __name__ == "__main__":
    raise SystemExit(rank_main())
