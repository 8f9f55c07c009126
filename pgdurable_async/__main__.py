"""``python -m pgdurable_async``: the worker and admin command line."""

from ._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
