"""The argparse tree of ``python -m pgdurable_async``: one sub-command per operation."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import NoReturn

from .._base.types import TERMINAL_STATUSES, Status
from .._base.version import __version__
from . import admin, lifecycle, schedules
from .dashboard import cmd_dashboard
from .devtools import DSN_ENV, cmd_bench, cmd_demo
from .graphs import cmd_graph
from .top import cmd_top
from .worker import cmd_migrate, cmd_worker

PROG = "python -m pgdurable_async"
Command = Callable[[argparse.Namespace], Awaitable[int]]


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
    p.add_argument(
        "--wake",
        choices=["auto", "listen", "poll"],
        default="auto",
        help="listen: LISTEN/NOTIFY; poll: poll every --poll-interval (behind a transaction pooler such as "
        "PgBouncer); auto: test LISTEN at start, fall back to poll (default: %(default)s)",
    )
    p.add_argument(
        "--poll-interval", type=positive, default=0.5, metavar="S", help="poll period with --wake poll (default 0.5)"
    )
    p.add_argument("--retention", type=lifecycle.duration, metavar="DURATION",
                   help="purge finished instances not updated for this long (e.g. 30d), at each sweep")
    p.add_argument("--metrics-port", type=port, metavar="N",
                   help="serve Prometheus metrics at http://HOST:N/metrics")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="address the metrics endpoint binds (default: %(default)s)")
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="stderr log lines: text, or one JSON object per line for log shippers (default: %(default)s)")
    p.add_argument("--processes", type=count, default=1, metavar="N",
                   help="run N worker processes under a supervisor that drains them all on SIGTERM "
                   "(default: %(default)s, this process)")
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
    p = add("top", cmd_top, "a live view of queue depths and ages, rates, running and failing work (Ctrl-C quits)")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--interval", type=positive, default=2.0, metavar="S", help="seconds between frames (default 2)")
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
    p = add("purge", lifecycle.cmd_purge,
            "delete a finished instance, or all not updated for a while, with their children and history")
    p.add_argument("id", nargs="?", help="instance id")
    p.add_argument("--older-than", type=lifecycle.duration, metavar="DURATION",
                   help="every finished instance not updated for this long (e.g. 30d, 12h)")
    p.add_argument("--status", choices=sorted(TERMINAL_STATUSES), help="with --older-than: only this status")
    p = add("fork", lifecycle.cmd_fork, "start a copy of an instance's history up to a point, run on with today's code")
    p.add_argument("id", help="instance id to fork")
    p.add_argument("--at-seq", type=count, metavar="N",
                   help="copy events 1..N (default: every event before the first failure)")
    p.add_argument("--id", dest="new_id", metavar="NEW_ID", help="the new instance's id (default: generated)")
    p = add("replay", lifecycle.cmd_replay, "replay saved histories (history ID --json) against an app's code",
            needs_dsn=False)
    p.add_argument("--app", required=True, metavar="MODULE:ATTR", help="the pgd.App whose code to check")
    p.add_argument("files", nargs="+", metavar="FILE", help="history files")
    p.add_argument("--instance-id", metavar="ID",
                   help="the instance the histories belong to (default: the one each history records, "
                        "else the file's name without its extension); it seeds ctx.new_uuid / ctx.random")
    p = add("graph", cmd_graph, "print a graph workflow as Mermaid with each node's state")
    p.add_argument("id", help="instance id")
    p.add_argument("--app", metavar="MODULE:ATTR", help="the pgd.App that registered it (App.graph workflows)")
    p = add("dashboard", cmd_dashboard, "serve the web dashboard (needs the [dashboard] extra)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s)")
    p.add_argument("--port", type=port, default=8321, help="port to listen on (default: %(default)s)")
    p.add_argument("--allow-actions", action="store_true",
                   help="enable cancel / terminate / raise-event (they need the token)")
    p.add_argument("--token", help="bearer token for the actions (default: $PGDURABLE_DASHBOARD_TOKEN, else generated)")
    p.add_argument("--app", metavar="MODULE:ATTR", help="the pgd.App, to draw its App.graph workflows")
    schedules.add_commands(sub, common, _Parser, _json_flag)
    p = add("demo", cmd_demo, "run a demo fan-out workflow with live progress, or a graph example", needs_dsn=False)
    p.add_argument(
        "name",
        nargs="?",
        metavar="NAME",
        help="a graph example: document_batch, embedding_pipeline, outbox, maintenance",
    )
    p.add_argument("--fanout", type=count, default=200, metavar="N", help="activities (default: %(default)s)")
    p.add_argument("--yes", action="store_true",
                   help="run even in a database that holds tables of its own (the demos write only to schema "
                        "pgdurable_demo and add instances to --schema)")
    p = add("bench", cmd_bench, "measure throughput beside the raw-SQL floors (from a source checkout)",
            needs_dsn=False)
    p.add_argument(
        "--sizes", type=sizes, default=[1_000, 10_000, 100_000], metavar="N[,N...]",
        help="fan-out sizes, comma-separated (default: 1000,10000,100000)",
    )
    p.add_argument(
        "--workflows", type=count, default=1_000, metavar="N", help="3-step workflows to start (default: %(default)s)"
    )
    p.add_argument(
        "--concurrency", type=count, default=256, metavar="N", help="runtime max_concurrency (default: %(default)s)"
    )
    p.add_argument(
        "--processes", type=count, default=1, metavar="N",
        help="worker processes in the fan-out and workflow phases: this one and N-1 more (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="also print the result as JSON (report goes to stderr)")
    return parser


def _json_flag(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--json", action="store_true", help="machine-readable JSON output")


def port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


def count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def sizes(text: str) -> list[int]:
    """A comma-separated list of counts, e.g. ``1000,10000``."""
    try:
        found = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of counts: {text!r}") from None
    if not found or min(found) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be counts of at least 1, got {text!r}")
    return found


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def _version() -> str:
    return f"pgdurable_async {__version__}"


