"""Plain value types of the public API."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from .errors import InvalidArgument
from .names import check_id


class Status(enum.StrEnum):
    """The lifecycle state of an instance."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TERMINATED = "terminated"

    @property
    def is_terminal(self) -> bool:
        """True once the instance can make no more progress."""
        return self in _TERMINAL


_TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.TERMINATED})
#: The finished statuses as strings (SQL has its twin: ``pgdurable.is_finished(status)``).
TERMINAL_STATUSES: frozenset[str] = frozenset(s.value for s in _TERMINAL)


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and how far apart, a failed activity is tried again.

    Attempt ``n`` (1-based) that fails is retried after
    ``min(initial_interval * backoff ** (n - 1), max_interval)`` seconds, until
    ``max_attempts`` attempts have run.  Exceptions whose type name is in
    ``non_retryable`` fail at once.
    """

    max_attempts: int = 3
    initial_interval: float = 1.0
    backoff: float = 2.0
    max_interval: float = 60.0
    non_retryable: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("RetryPolicy.max_attempts must be at least 1")
        if self.initial_interval < 0 or self.max_interval < 0 or self.backoff < 1:
            raise ValueError("RetryPolicy intervals must be >= 0 and backoff >= 1")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based)."""
        return float(min(self.initial_interval * self.backoff ** (attempt - 1), self.max_interval))

    def should_retry(self, attempt: int, error_type: str) -> bool:
        """Whether failed attempt ``attempt`` with ``error_type`` gets another try."""
        return attempt < self.max_attempts and error_type not in self.non_retryable


@dataclass(frozen=True)
class InstanceState:
    """A snapshot of one instance, as returned by ``Client.status`` and ``Client.list``.

    ``waiting_on`` lists what an unfinished instance is blocked on, oldest first: dicts
    ``{"kind": "activity" | "timer" | "event" | "child", "name": str, "since": datetime}``,
    with ``"until"`` for timers (and events with a timeout); empty once it has finished.
    """

    instance_id: str
    name: str
    status: Status
    input: Any
    output: Any
    error: Any
    custom_status: Any
    created_at: datetime
    updated_at: datetime
    execution_id: int = 1
    parent_instance_id: str | None = None
    waiting_on: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class HistoryEvent:
    """One recorded fact of an execution's history."""

    seq: int
    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    recorded_at: datetime | None = None
    execution_id: int = 1


@dataclass(frozen=True, init=False)
class RateLimit:
    """At most ``n`` activity starts in any window of length ``per`` (a sliding window)."""

    n: int
    per: timedelta

    def __init__(self, n: int, per: timedelta | float) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidArgument(f"RateLimit n must be a positive integer, not {n!r}")
        window = per if isinstance(per, timedelta) else _seconds(per, "RateLimit per")
        if window <= timedelta(0):
            raise InvalidArgument(f"RateLimit per must be positive, not {per!r}")
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "per", window)


@dataclass(frozen=True)
class Queue:
    """A named queue of activities whose limits hold across every worker (enforced when items are claimed).

    ``concurrency``: items running at once; ``rate_limit``: starts per sliding window;
    ``key_concurrency``: items running at once per ``key`` given to ``ctx.call_activity``.
    """

    name: str
    concurrency: int | None = None
    rate_limit: RateLimit | None = None
    key_concurrency: int | None = None

    def __post_init__(self) -> None:
        check_id(self.name, "queue name")
        for field_name in ("concurrency", "key_concurrency"):
            value = getattr(self, field_name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidArgument(f"Queue {field_name} must be a positive integer or None, not {value!r}")
        if self.rate_limit is not None and not isinstance(self.rate_limit, RateLimit):
            raise InvalidArgument(f"Queue rate_limit must be a pgd.RateLimit, not {type(self.rate_limit).__name__}")

    @property
    def limited(self) -> bool:
        return self.concurrency is not None or self.rate_limit is not None or self.key_concurrency is not None


@dataclass(frozen=True)
class QueueInfo:
    """A queue as the database holds it, with its depth (``Client.list_queues``)."""

    name: str
    concurrency: int | None
    rate_limit: RateLimit | None
    key_concurrency: int | None
    ready: int  # visible and not leased
    running: int  # leased, lease not expired
    delayed: int  # waiting for a retry backoff


@dataclass(frozen=True)
class ScheduleInfo:
    """One schedule, as returned by ``Client.list_schedules``."""

    schedule_id: str
    orchestration: str
    input: Any
    cron: str | None
    every: timedelta | None
    timezone: str
    overlap: str
    catchup: str
    paused: bool
    next_fire_at: datetime
    last_instance_id: str | None


def _seconds(value: Any, what: str) -> timedelta:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{what} must be a timedelta or seconds, not {value!r}")
    return timedelta(seconds=value)
