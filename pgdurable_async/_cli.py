"""``python -m pgdurable_async``: the standalone worker and the admin command line.

Every command takes ``--dsn`` (default ``$PGDURABLE_DSN``) and ``--schema``.
Expected failures print one ``error: ...`` line on stderr and exit 1 (2 for
usage errors); ``demo`` and ``bench`` start a throwaway cluster when no DSN is
given.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, NoReturn

import anyio
import orjson

from . import _cli_admin as admin
from ._app import App
from ._errors import Cancelled, ConfigurationError, PgDurableError
from ._migrate import latest_version, migrate
from ._runtime import Runtime
from ._types import Status

log = logging.getLogger("pgdurable_async.cli")

PROG = "python -m pgdurable_async"
DSN_ENV = "PGDURABLE_DSN"
_EXPECTED: tuple[type[BaseException], ...] = (PgDurableError, Cancelled, ValueError, OSError)
Command = Callable[[argparse.Namespace], Awaitable[int]]


class UsageError(Exception):
    """A command line that cannot run as given (exit code 2)."""


# -- commands -------------------------------------------------------------------------
def load_app(spec: str) -> App:
    """Import ``module:attr`` (attr defaults to ``app``) from the current directory, like uvicorn."""
    module_name, _, attr = spec.partition(":")
    if not module_name:
        raise ConfigurationError(f"--app {spec!r} must look like module:attribute")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r} (--app {spec}): {exc}") from exc
    try:
        for part in (attr or "app").split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ConfigurationError(f"module {module_name!r} has no attribute {attr or 'app'!r} (--app {spec})") from None
    if not isinstance(obj, App):
        raise ConfigurationError(f"--app {spec} is a {type(obj).__name__}, not a pgdurable_async.App")
    return obj


async def cmd_worker(args: argparse.Namespace) -> int:
    """Serve the app until SIGTERM/SIGINT, then drain and exit 0."""
    app = load_app(args.app)
    runtime = Runtime(
        app,
        args.dsn,
        schema=args.schema,
        max_concurrency=args.concurrency,
        lease_seconds=args.lease_seconds,
        sweep_interval=args.sweep_interval,
    )
    # Runtime.stop() must run in the task and cancel-scope level that started it,
    # so the second-signal watcher's task group encloses the runtime.
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:
            async with runtime:
                log.info(
                    "worker %s ready: %d orchestrations, %d activities, concurrency %d",
                    runtime.worker_id,
                    len(app.orchestrations),
                    len(app.activities),
                    args.concurrency,
                )
                async for signum in signals:
                    name = signal.Signals(signum).name
                    log.info("%s received: draining (up to %.0f s)", name, runtime.drain_timeout)
                    break
                tg.start_soon(_exit_on_second_signal, signals)
                await runtime.stop()
            tg.cancel_scope.cancel()
    log.info("worker stopped")
    return 0


async def _exit_on_second_signal(signals: AsyncIterator[int]) -> None:
    async for signum in signals:
        log.warning("second %s: exiting without finishing the drain", signal.Signals(signum).name)
        logging.shutdown()
        sys.stdout.flush()
        os._exit(1)


async def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply pending schema migrations."""
    applied = await migrate(args.dsn, args.schema)
    if applied:
        print(f"applied migration(s) {', '.join(map(str, applied))} to schema {args.schema!r}")
    else:
        print(f"schema {args.schema!r} is up to date")
    print(f"schema version: {latest_version()}")
    return 0


@contextlib.asynccontextmanager
async def database(dsn: str | None) -> AsyncIterator[str]:
    """``dsn`` itself, or a throwaway embedded cluster's DSN when none is given."""
    if dsn:
        yield dsn
        return
    from ._cluster import EmbeddedCluster

    print(f"no --dsn or {DSN_ENV}: starting a throwaway PostgreSQL cluster ...", file=sys.stderr, flush=True)
    async with EmbeddedCluster() as cluster:
        yield cluster.dsn
        print("removing the throwaway cluster ...", file=sys.stderr, flush=True)


async def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo fan-out workflow (or the graph example NAME) on an embedded runtime."""
    if args.name:
        from ._graph_demo import load_example

        example = load_example(args.name)  # fail fast, before a cluster starts
        async with database(args.dsn) as dsn:
            await example.run(dsn, out=sys.stdout)
        return 0
    from ._demo import run_demo

    async with database(args.dsn) as dsn:
        await run_demo(dsn, schema=args.schema, fanout=args.fanout, out=sys.stdout)
    return 0


async def cmd_graph(args: argparse.Namespace) -> int:
    """Print a graph workflow instance as Mermaid, each node with its state."""
    from ._graph_mermaid import render_instance

    app = load_app(args.app) if args.app else None
    async with admin.client_for(args) as client:
        print(await render_instance(client, args.id, app))
    return 0


async def cmd_bench(args: argparse.Namespace) -> int:
    """Run the fan-out benchmark (``pgdurable_async._bench``)."""
    try:
        bench: Any = importlib.import_module("pgdurable_async._bench")
    except ModuleNotFoundError as exc:
        if exc.name != "pgdurable_async._bench":
            raise
        raise ConfigurationError("the benchmark module pgdurable_async._bench is not available") from None
    out = sys.stderr if args.json else sys.stdout
    async with database(args.dsn) as dsn:
        result = await bench.run_bench(
            dsn, fanout=args.fanout, workflows=args.workflows, concurrency=args.concurrency, out=out
        )
    if args.json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS, default=str).decode())
    if isinstance(result, dict) and result.get("ok") is False:
        print("error: the benchmark ran but some of its correctness checks failed", file=sys.stderr)
        return 1
    return 0


# -- parser -----------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line on stderr and exit 2, like every other CLI error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree: one sub-command per operation."""
    common = _Parser(add_help=False)
    common.add_argument("--dsn", help=f"PostgreSQL DSN (default: ${DSN_ENV})")
    common.add_argument("--schema", default="pgdurable", help="schema of the pgdurable tables (default: %(default)s)")
    common.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="stderr log level (default: INFO for worker, WARNING otherwise)",
    )
    parser = _Parser(prog=PROG, description="Durable workflows for asyncio on PostgreSQL.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Command, text: str, *, needs_dsn: bool = True) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, parents=[common], help=text, description=text)
        cmd.set_defaults(func=func, needs_dsn=needs_dsn)
        return cmd

    p = add("worker", cmd_worker, "run a worker for an app until SIGTERM/SIGINT (graceful drain)")
    p.add_argument("--app", required=True, metavar="MODULE:ATTR", help="the pgd.App to serve, e.g. myservice.jobs:app")
    p.add_argument(
        "--concurrency", type=count, default=64, metavar="N", help="max concurrent activities (default: %(default)s)"
    )
    p.add_argument("--lease-seconds", type=float, default=30.0, metavar="S", help="activity lease (default 30)")
    p.add_argument("--sweep-interval", type=float, default=30.0, metavar="S", help="safety sweep period (default 30)")
    add("migrate", cmd_migrate, "install or upgrade the database schema")
    p = add("start", admin.cmd_start, "start an orchestration and print its instance id")
    p.add_argument("name", help="registered orchestration name")
    p.add_argument("--input", metavar="JSON", help="input as JSON (default: null)")
    p.add_argument("--id", metavar="ID", help="instance id (default: generated)")
    p.add_argument("--wait", action="store_true", help="wait for the output and print it as JSON")
    p.add_argument("--timeout", type=float, metavar="S", help="seconds to wait (implies --wait)")
    p = add("status", admin.cmd_status, "show one instance")
    p.add_argument("id", help="instance id")
    _json_flag(p)
    p = add("list", admin.cmd_list, "list instances, newest first")
    p.add_argument("--status", choices=[s.value for s in Status], help="only instances in this status")
    p.add_argument("--name", help="only instances of this orchestration")
    p.add_argument("--limit", type=count, default=100, metavar="N", help="at most N rows (default: %(default)s)")
    _json_flag(p)
    p = add("history", admin.cmd_history, "show an instance's event history")
    p.add_argument("id", help="instance id")
    _json_flag(p)
    p = add("raise-event", admin.cmd_raise_event, "deliver an event to ctx.wait_for_event(NAME)")
    p.add_argument("id", help="instance id")
    p.add_argument("event", metavar="NAME", help="event name")
    p.add_argument("--data", metavar="JSON", help="event data as JSON (default: null)")
    p.add_argument("--key", metavar="KEY", help="idempotency key: resending with the same key delivers once")
    for name, func, text in (
        ("cancel", admin.cmd_cancel, "cancel an instance cooperatively"),
        ("terminate", admin.cmd_terminate, "stop an instance now, running no more of its code"),
    ):
        p = add(name, func, text)
        p.add_argument("id", help="instance id")
        p.add_argument("--reason", help="recorded reason")
    p = add("purge", admin.cmd_purge, "delete a finished instance and its history")
    p.add_argument("id", help="instance id")
    p = add("graph", cmd_graph, "print a graph workflow as Mermaid with each node's state")
    p.add_argument("id", help="instance id")
    p.add_argument("--app", metavar="MODULE:ATTR", help="the pgd.App that registered it (App.graph workflows)")
    p = add("demo", cmd_demo, "run a demo fan-out workflow with live progress, or a graph example", needs_dsn=False)
    p.add_argument(
        "name",
        nargs="?",
        metavar="NAME",
        help="a graph example: document_batch, embedding_pipeline, outbox, maintenance",
    )
    p.add_argument("--fanout", type=count, default=200, metavar="N", help="activities (default: %(default)s)")
    p = add("bench", cmd_bench, "measure fan-out throughput", needs_dsn=False)
    p.add_argument(
        "--fanout", type=count, default=10_000, metavar="N", help="activities in the fan-out (default: %(default)s)"
    )
    p.add_argument(
        "--workflows", type=count, default=1_000, metavar="N", help="3-step workflows to start (default: %(default)s)"
    )
    p.add_argument(
        "--concurrency", type=count, default=256, metavar="N", help="runtime max_concurrency (default: %(default)s)"
    )
    p.add_argument("--json", action="store_true", help="also print the result as JSON (report goes to stderr)")
    return parser


def _json_flag(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--json", action="store_true", help="machine-readable JSON output")


def count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _version() -> str:
    from . import __version__

    return f"pgdurable_async {__version__}"


# -- entry point -------------------------------------------------------------------------
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
        if all(isinstance(e, _EXPECTED) for e in leaves):
            _error(leaves[0])
            return 1
        raise


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
    elif not text or (isinstance(exc, OSError | ValueError) and not isinstance(exc, PgDurableError)):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    print(f"error: {text}", file=sys.stderr, flush=True)


__all__ = ["build_parser", "load_app", "main"]
