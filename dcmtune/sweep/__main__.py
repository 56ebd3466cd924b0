"""`python -m dcmtune.sweep`: the command lives in `dcmtune.sweep.commands`."""

from dcmtune.sweep.commands import main

if __name__ == "__main__":
    raise SystemExit(main())
