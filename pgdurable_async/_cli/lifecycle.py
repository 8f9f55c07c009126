"""The CLI's lifecycle commands: ``fork``, ``purge --older-than`` and ``replay`` (for CI pipelines)."""

from __future__ import annotations

import argparse
import re
import sys
from datetime import timedelta

import anyio

from .._base.errors import InvalidArgument, NonDeterminismError, PgDurableError
from .._engine import replay_history
from .admin import client_for
from .worker import load_app

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([wdhms])")
_UNIT_SECONDS = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1}


def duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or a sum such as ``1d12h``."""
    spec = text.strip().lower()
    parts = _DURATION.findall(spec)
    if not parts or "".join(n + u for n, u in parts) != spec:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 30d, 12h, 90m, 45s or 1d12h")
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be longer than zero")
    return timedelta(seconds=seconds)


async def cmd_fork(args: argparse.Namespace) -> int:
    """Fork an instance (by default from just before its first failure) and print the new id."""
    async with client_for(args) as client:
        handle = await client.fork(args.id, at_seq=args.at_seq, new_instance_id=args.new_id)
    print(handle.instance_id)
    return 0


async def cmd_purge(args: argparse.Namespace) -> int:
    """``purge ID`` or ``purge --older-than 30d [--status S]``."""
    if (args.id is None) == (args.older_than is None):
        raise InvalidArgument("give an instance id or --older-than DURATION (not both)")
    if args.status is not None and args.older_than is None:
        raise InvalidArgument("--status goes with --older-than")
    async with client_for(args) as client:
        if args.id is not None:
            await client.purge(args.id)
            print(f"purged {args.id}")
            return 0
        count = await client.purge_finished(args.older_than, status=args.status)
    which = f"{args.status} " if args.status else "finished "
    print(f"purged {count} {which}instance(s) not updated for {args.older_than}")
    return 0


async def cmd_replay(args: argparse.Namespace) -> int:
    """Replay saved histories (``history ID --json`` files) against the app's code: exit 1 on a mismatch.

    The instance id (it seeds ``ctx.new_uuid()`` / ``ctx.random()``) is ``--instance-id``, else
    the one the history records, else the file's name without its extension (``ID.json``).
    """
    app = load_app(args.app)
    app.install_builtins()
    orchestrations = {name: d.fn for name, d in app.orchestrations.items()}
    for path in args.files:
        file = anyio.Path(path)
        try:
            text = await file.read_bytes()
            count = replay_history(orchestrations, text,  # type: ignore[arg-type]
                                   instance_id=args.instance_id, fallback_id=file.stem)
        except (PgDurableError, OSError) as exc:
            kind = "non-determinism" if isinstance(exc, NonDeterminismError) else type(exc).__name__
            raise PgDurableError(f"{path}: {kind}: {exc}") from None
        sys.stdout.write(f"{path}: ok ({count} events)\n")
    return 0
