"""``python -m pgdurable_async``: the standalone worker and the admin command line.

Every command takes ``--dsn`` (default ``$PGDURABLE_DSN``) and ``--schema``.
Expected failures print one ``error: ...`` line on stderr and exit 1 (2 for
usage errors); ``demo`` and ``bench`` start a throwaway cluster when no DSN is
given.  The commands live beside this module: ``worker`` (worker, migrate),
``admin`` (the client commands), ``devtools`` (demo, bench); ``parser`` wires them.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator

import anyio

from .._base.errors import Cancelled, PgDurableError
from .devtools import DSN_ENV
from .parser import build_parser

_EXPECTED: tuple[type[BaseException], ...] = (PgDurableError, Cancelled, ValueError, OSError)


class UsageError(Exception):
    """A command line that cannot run as given (exit code 2)."""


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else 1 if exc.code else 0
    args.dsn = args.dsn or os.environ.get(DSN_ENV) or None
    level = args.log_level or ("INFO" if args.command == "worker" else "WARNING")
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.needs_dsn and not args.dsn:
            raise UsageError(f"`{args.command}` needs a database: pass --dsn or set {DSN_ENV}")
        code: int = anyio.run(args.func, args)
        return code
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        leaves = list(_leaves(exc))
        if isinstance(leaves[0], UsageError):
            _error(leaves[0])
            return 2
        if all(isinstance(e, _EXPECTED) or _from_the_server(e) for e in leaves):
            _error(leaves[0])
            return 1
        raise


def _from_the_server(exc: BaseException) -> bool:
    """An error PostgreSQL reported (the driver's ``PostgresError``: a message, maybe a hint)."""
    return type(exc).__module__.startswith("asyncpg") and hasattr(exc, "sqlstate")


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside (possibly nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _error(exc: BaseException) -> None:
    text = " / ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if isinstance(exc, Cancelled) and exc.reason:
        text = f"{text}: {exc.reason}"
    elif _from_the_server(exc):
        text = f"PostgreSQL: {' '.join(text.split())}"  # its HINT comes along
    elif not text or (isinstance(exc, OSError | ValueError) and not isinstance(exc, PgDurableError)):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    print(f"error: {text}", file=sys.stderr, flush=True)


__all__ = ["main"]
