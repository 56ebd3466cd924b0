"""`python -m dcmtune.analysis`: the command lives in `dcmtune.analysis.commands`."""

from dcmtune.analysis.commands import main

if __name__ == "__main__":
    raise SystemExit(main())
