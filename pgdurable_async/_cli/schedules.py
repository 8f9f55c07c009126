"""``schedule create|list|pause|resume|trigger|delete`` and ``queues``: the CLI of flow control.

``schedule list`` marks a schedule whose next fire time has passed (by the database's
clock) as ``overdue``: no running worker registers its orchestration, or they are down.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from .._base.schedules import CATCHUP, OVERLAP
from .._base.types import QueueInfo, ScheduleInfo
from .._store import schedule_store
from .admin import _print, cell, client_for, dumps, iso, parse_json, table

_OVERDUE = timedelta(seconds=5)  # later than this past next_fire_at: nobody is firing it


def add_commands(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
    parser_class: type[argparse.ArgumentParser],
    json_flag: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Register ``schedule ACTION ...`` and ``queues``."""
    text = "manage cron and interval schedules"
    group = sub.add_parser("schedule", help=text, description=text)
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=parser_class)

    def add(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        cmd: argparse.ArgumentParser = actions.add_parser(name, parents=[common], help=help_text,
                                                          description=help_text)
        cmd.set_defaults(func=func, needs_dsn=True)
        return cmd

    p = add("create", cmd_create, "create a schedule that starts ORCH on a cron expression or an interval")
    p.add_argument("id", help="schedule id (instances are named ID@<fire time>)")
    p.add_argument("orchestration", metavar="ORCH", help="registered orchestration name")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", metavar="EXPR", help="cron expression: 5 fields, or 6 with seconds first")
    when.add_argument("--every", type=_seconds, metavar="SECONDS", help="interval in seconds (at least 1)")
    p.add_argument("--input", metavar="JSON", help="input of every instance, as JSON (default: null)")
    p.add_argument("--timezone", default="UTC", metavar="TZ", help="the cron's time zone (default: %(default)s)")
    p.add_argument("--overlap", choices=OVERLAP, default="skip", help="while the last firing runs (default: skip)")
    p.add_argument("--catchup", choices=CATCHUP, default="latest", help="after downtime (default: latest)")
    p = add("list", cmd_list, "list schedules")
    json_flag(p)
    for name, func, help_text in (
        ("pause", cmd_pause, "stop firing a schedule"),
        ("resume", cmd_resume, "fire a paused schedule again, from its next time after now"),
        ("trigger", cmd_trigger, "start one firing now and print its instance id"),
        ("delete", cmd_delete, "delete a schedule (the instances it started stay)"),
    ):
        add(name, func, help_text).add_argument("id", help="schedule id")

    text = "list queues: their limits and items ready, running and delayed"
    p = sub.add_parser("queues", parents=[common], help=text, description=text)
    p.set_defaults(func=cmd_queues, needs_dsn=True)
    json_flag(p)


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 second, got {text}")
    return value


async def cmd_create(args: argparse.Namespace) -> int:
    value = parse_json(args.input, "--input")
    async with client_for(args) as client:
        info = await client.create_schedule(args.id, args.orchestration, value, cron=args.cron, every=args.every,
                                            timezone=args.timezone, overlap=args.overlap, catchup=args.catchup)
    _print(f"created schedule {info.schedule_id}: next fire at {iso(info.next_fire_at)}")
    return 0


async def cmd_list(args: argparse.Namespace) -> int:
    async with client_for(args) as client:
        schedules = await client.list_schedules()
        now = await client.db.run(schedule_store.db_now, transaction=False) if schedules else datetime.now(UTC)
    if args.json:
        _print(dumps([_plain(s) for s in schedules], indent=True))
        return 0
    rows = [[s.schedule_id, s.orchestration, _when(s), s.overlap, s.catchup, _state(s, now), iso(s.next_fire_at),
             s.last_instance_id or "-", cell(s.input, 40)] for s in schedules]
    _print(table(["SCHEDULE", "ORCHESTRATION", "WHEN", "OVERLAP", "CATCHUP", "STATE", "NEXT FIRE", "LAST INSTANCE",
                  "INPUT"], rows))
    return 0


def _when(s: ScheduleInfo) -> str:
    if s.every is not None:
        return f"every {s.every.total_seconds():g}s"
    return f"cron {s.cron}" + ("" if s.timezone == "UTC" else f" ({s.timezone})")


def _state(s: ScheduleInfo, now: datetime) -> str:
    if s.paused:
        return "paused"
    return "overdue" if now - s.next_fire_at > _OVERDUE else "active"


async def cmd_pause(args: argparse.Namespace) -> int:
    async with client_for(args) as client:
        await client.pause_schedule(args.id)
    _print(f"paused schedule {args.id}")
    return 0


async def cmd_resume(args: argparse.Namespace) -> int:
    async with client_for(args) as client:
        await client.resume_schedule(args.id)
    _print(f"resumed schedule {args.id}")
    return 0


async def cmd_trigger(args: argparse.Namespace) -> int:
    async with client_for(args) as client:
        handle = await client.trigger_schedule(args.id)
    _print(handle.instance_id)
    return 0


async def cmd_delete(args: argparse.Namespace) -> int:
    async with client_for(args) as client:
        await client.delete_schedule(args.id)
    _print(f"deleted schedule {args.id}")
    return 0


async def cmd_queues(args: argparse.Namespace) -> int:
    async with client_for(args) as client:
        queues = await client.list_queues()
    if args.json:
        _print(dumps([_plain(x) for x in queues], indent=True))
        return 0
    rows = [[x.name, _limit(x.concurrency), _rate(x), _limit(x.key_concurrency), str(x.ready), str(x.running),
             str(x.delayed)] for x in queues]
    _print(table(["QUEUE", "CONCURRENCY", "RATE LIMIT", "PER KEY", "READY", "RUNNING", "DELAYED"], rows))
    return 0


def _plain(record: ScheduleInfo | QueueInfo) -> dict[str, Any]:
    """A record as JSON-ready fields (intervals in seconds)."""
    out = dataclasses.asdict(record)
    for key, value in out.items():
        if isinstance(value, timedelta):
            out[key] = value.total_seconds()
        elif isinstance(value, dict) and isinstance(value.get("per"), timedelta):
            out[key] = {**value, "per": value["per"].total_seconds()}
    return out


def _limit(value: int | None) -> str:
    return "-" if value is None else str(value)


def _rate(x: QueueInfo) -> str:
    if x.rate_limit is None:
        return "-"
    return f"{x.rate_limit.n}/{x.rate_limit.per.total_seconds():g}s"
