"""``python -m pgdurable_async``: the standalone worker and the admin command line.

Every command takes ``--dsn`` (default ``$PGDURABLE_DSN``) and ``--schema``.
Expected failures print one ``error: ...`` line on stderr and exit 1 (2 for
usage errors); ``demo`` and ``bench`` start a throwaway cluster when no DSN is
given.  The commands live beside this module: ``worker`` (worker, migrate),
``admin`` (the client commands), ``devtools`` (demo, bench); ``parser`` wires them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import anyio

from .._base.errors import Cancelled, PgDurableError
from . import logs
from .devtools import DSN_ENV
from .parser import build_parser

_EXPECTED: tuple[type[BaseException], ...] = (PgDurableError, Cancelled, ValueError, OSError)


UVLOOP_ENV = "PGDURABLE_UVLOOP"


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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # worker --processes N runs it again
    level = args.log_level or ("INFO" if args.command == "worker" else "WARNING")
    logs.configure(level, getattr(args, "log_format", "text"))
    try:
        if args.needs_dsn and not args.dsn:
            raise UsageError(f"`{args.command}` needs a database: pass --dsn or set {DSN_ENV}")
        code: int = anyio.run(args.func, args, backend_options=_backend_options())
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


def _backend_options() -> dict[str, object]:
    """``PGDURABLE_UVLOOP=1``: run the event loop on uvloop (an opt-in; ``pip install uvloop``)."""
    if os.environ.get(UVLOOP_ENV, "") in ("", "0"):
        return {}
    try:
        import uvloop  # noqa: F401
    except ImportError:
        raise UsageError(f"{UVLOOP_ENV}=1 needs uvloop: pip install uvloop") from None
    return {"use_uvloop": True}


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
