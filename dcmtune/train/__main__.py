"""`python -m dcmtune.train`: the command lives in `dcmtune.train.commands`."""

from dcmtune.train.commands import main

if __name__ == "__main__":
    raise SystemExit(main())
