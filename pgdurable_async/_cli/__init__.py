"""The command line: ``python -m pgdurable_async COMMAND`` (see ``main``)."""

from .main import main

__all__ = ["main"]
