"""`python -m dcmtune.predict`: the command lives in `dcmtune.predict.commands`."""

from dcmtune.predict.commands import main

if __name__ == "__main__":
    raise SystemExit(main())
