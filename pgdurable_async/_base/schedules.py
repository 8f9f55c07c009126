"""Schedules without I/O: a schedule's spec, its fire times, and what one firing pass decides.

Every time here comes from the database's clock (the runtime passes ``now()`` in).
A fire time that came due while the deciding runtime was watching is *on time* and
always fires.  One that came due before it was watching (``watching_since``: the
first scan of its schedule loop, or the first after a database fault) was *missed*,
and ``catchup`` decides: ``"all"`` fires each, ``"latest"`` the most recent one,
``"none"`` none.  ``overlap="skip"`` drops a firing while the previous firing's
instance still runs, except the missed firings of ``"all"``: they start one after
another, each once the one before has finished.

Cron expressions take 5 fields (minute first) or 6 (seconds first), evaluated in
the schedule's time zone by ``cronsim`` (the ``cron`` extra).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import ConfigurationError, InvalidArgument

OVERLAP = ("skip", "allow")
CATCHUP = ("latest", "all", "none")
#: How long a just-started runtime leaves a recently due time to a peer that may be watching it.
PEER_GRACE = timedelta(seconds=1)
#: ``catchup="all"`` with ``overlap="skip"``: how often to look whether the last missed firing finished.
CATCHUP_POLL = timedelta(seconds=0.25)
#: Fire times handled per schedule in one firing transaction (``catchup="all"`` after a long outage).
MAX_FIRINGS = 1000
MIN_EVERY = timedelta(seconds=1)  # instance ids carry the fire time to the second


@dataclass(frozen=True)
class ScheduleSpec:
    """When a schedule fires and what it does after downtime or while its last firing runs."""

    cron: str | None = None
    every: timedelta | None = None
    timezone: str = "UTC"
    overlap: str = "skip"
    catchup: str = "latest"
    _zone: ZoneInfo = field(default=ZoneInfo("UTC"), repr=False, compare=False)

    def next_after(self, t: datetime, *, anchor: datetime | None = None) -> datetime:
        """The first fire time strictly after ``t`` (``anchor``: a fire time of an ``every`` grid)."""
        if self.every is not None:
            base = anchor or t
            steps = math.floor((t - base) / self.every) + 1
            return base + steps * self.every
        assert self.cron is not None
        return _cron(self.cron, t.astimezone(self._zone), reverse=False)

    def last_before(self, t: datetime, *, anchor: datetime) -> datetime:
        """The last fire time strictly before ``t`` (``anchor``: a fire time at or before it)."""
        if self.every is not None:
            steps = math.ceil((t - anchor) / self.every) - 1
            return anchor + max(steps, 0) * self.every
        assert self.cron is not None
        return _cron(self.cron, t.astimezone(self._zone), reverse=True)

    def first_fire(self, now: datetime) -> datetime:
        """The first fire time of a schedule created at ``now`` (never ``now`` itself)."""
        if self.every is not None:
            return now.replace(microsecond=0) + self.every
        return self.next_after(now)


def make_spec(
    *, cron: str | None, every: timedelta | float | None, timezone: str = "UTC", overlap: str = "skip",
    catchup: str = "latest",
) -> ScheduleSpec:
    """A checked :class:`ScheduleSpec`; raises :class:`InvalidArgument`."""
    if (cron is None) == (every is None):
        raise InvalidArgument("a schedule needs exactly one of cron= and every=")
    if overlap not in OVERLAP:
        raise InvalidArgument(f"overlap must be one of {', '.join(OVERLAP)}, not {overlap!r}")
    if catchup not in CATCHUP:
        raise InvalidArgument(f"catchup must be one of {', '.join(CATCHUP)}, not {catchup!r}")
    if not isinstance(timezone, str) or not timezone:
        raise InvalidArgument("timezone must be an IANA time zone name such as 'Europe/Paris'")
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidArgument(f"unknown time zone {timezone!r}") from None
    interval: timedelta | None = None
    if every is not None:
        interval = every if isinstance(every, timedelta) else _seconds(every)
        if interval < MIN_EVERY:
            raise InvalidArgument(f"every must be at least 1 second, not {interval.total_seconds():g} s")
    if cron is not None:
        check_cron(cron)
    return ScheduleSpec(cron, interval, timezone, overlap, catchup, zone)


def check_cron(expr: Any) -> None:
    """Raise :class:`InvalidArgument` unless ``expr`` is a cron expression that ever fires."""
    if not isinstance(expr, str) or len(expr.split()) not in (5, 6):
        raise InvalidArgument(f"bad cron expression {expr!r}: expected 5 fields (or 6, seconds first)")
    _cron(expr, datetime.now(UTC), reverse=False)


def _cron(expr: str, start: datetime, *, reverse: bool) -> datetime:
    try:
        from cronsim import CronSim, CronSimError
    except ImportError:
        raise ConfigurationError("cron schedules need the cronsim package: pip install 'pgdurable_async[cron]'") \
            from None
    try:
        found: datetime = next(CronSim(expr, start, reverse=reverse))
    except (CronSimError, StopIteration) as exc:
        raise InvalidArgument(f"bad cron expression {expr!r}: {exc or 'it never fires'}") from None
    return found.astimezone(UTC)


def _seconds(value: Any) -> timedelta:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"every must be a timedelta or a number of seconds, not {value!r}")
    return timedelta(seconds=value)


@dataclass(frozen=True)
class Plan:
    """What one pass does with a due schedule."""

    fire: list[datetime]  # start one instance per time, in order
    next_fire_at: datetime
    defer_until: datetime | None = None  # decide again then; leave the row as it is


def plan(
    spec: ScheduleSpec, *, next_fire_at: datetime, now: datetime, watching_since: datetime, previous_running: bool
) -> Plan:
    """Which fire times of a due schedule (``next_fire_at <= now``) start an instance, and what comes next."""
    fire: list[datetime] = []
    cursor = next_fire_at
    if next_fire_at < watching_since:  # fire times that came due while nobody here watched
        last_missed = spec.last_before(min(watching_since, now + timedelta(microseconds=1)), anchor=next_fire_at)
        if spec.catchup == "all" and spec.overlap == "skip":  # one missed firing after another
            if previous_running:
                return Plan([], next_fire_at, defer_until=now + CATCHUP_POLL)
            return Plan([next_fire_at], spec.next_after(next_fire_at, anchor=next_fire_at))
        if spec.catchup == "all":
            t = next_fire_at
            while t <= last_missed and len(fire) < MAX_FIRINGS:
                fire.append(t)
                t = spec.next_after(t, anchor=t)
            if t <= last_missed:  # more than one pass can take: the rest next pass
                return _overlap(spec, Plan(fire, t), previous_running)
        elif spec.catchup == "latest":
            fire.append(last_missed)
        elif now - last_missed < PEER_GRACE:  # "none": a watching peer may be firing it right now
            return Plan([], next_fire_at, defer_until=last_missed + PEER_GRACE)
        cursor = spec.next_after(last_missed, anchor=last_missed)
    while cursor <= now and len(fire) < MAX_FIRINGS:  # on time (perhaps a little late)
        fire.append(cursor)
        cursor = spec.next_after(cursor, anchor=cursor)
    return _overlap(spec, Plan(fire, cursor), previous_running)


def _overlap(spec: ScheduleSpec, p: Plan, previous_running: bool) -> Plan:
    if spec.overlap == "allow" or not p.fire:
        return p
    # "skip": the first firing waits for nothing but the previous instance; the rest overlap it.
    return Plan([] if previous_running else p.fire[:1], p.next_fire_at)

