"""``OrchestrationContext``: the only thing an orchestration may await through."""

from __future__ import annotations

import hashlib
import random as _random
import uuid
from collections.abc import Coroutine, Iterable
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from .._base import events as ev
from .._base.errors import InvalidArgument, SerializationError
from .._base.names import check_id, name_of
from .._base.types import RetryPolicy
from . import mistakes
from .tasks import ActivityTask, AllTask, AnyTask, ChildTask, EventTask, FiberTask, Task, TimerTask

if TYPE_CHECKING:
    from .execution import Execution

T = TypeVar("T")
_UUID_NAMESPACE = uuid.UUID("6f1c8a52-2d59-4c55-9b8c-0d1b5f8e7a31")


class ContinueAsNew(BaseException):  # noqa: N818 - control flow, not an error
    """Raised by :meth:`OrchestrationContext.continue_as_new` to end the execution."""

    def __init__(self, input: Any) -> None:
        super().__init__("continue_as_new")
        self.input = input


class DeterministicRandom(float):
    """A float in [0, 1) that also exposes ``random.Random``'s methods.

    ``ctx.random() < 0.5`` and ``ctx.random().randint(1, 6)`` both draw from the
    execution's seeded stream, so replay reproduces them.
    """

    _rng: _random.Random

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rng, name)


class OrchestrationContext:
    """Schedules durable work and gives deterministic time, ids and randomness.

    Tasks returned here are lazy: they start when awaited or passed to
    :meth:`all` / :meth:`any`.
    """

    def __init__(self, engine: Execution) -> None:
        self._engine = engine
        self._reseed(f"{engine.instance_id}/{engine.execution_id}")

    def _reseed(self, seed_key: str) -> None:
        """Derive ``new_uuid`` / ``random`` from ``seed_key`` ("<instance>/<execution>"; a fork keeps its source's)."""
        self._seed_key = seed_key
        seed = hashlib.sha256(seed_key.encode()).digest()
        self._rng = _random.Random(int.from_bytes(seed[:8], "big"))
        self._uuid_counter = 0

    def __getattr__(self, name: str) -> Any:
        if name in mistakes.ACTIVITY_ONLY_FIELDS:
            raise AttributeError(mistakes.activity_field(name))
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def instance_id(self) -> str:
        return self._engine.instance_id

    @property
    def execution_id(self) -> int:
        return self._engine.execution_id

    @property
    def name(self) -> str:
        """The orchestration's registered name."""
        return self._engine.name

    @property
    def is_replaying(self) -> bool:
        """True while the code re-runs recorded history (use it to silence logging)."""
        return self._engine.replaying

    # -- durable tasks --------------------------------------------------------
    def call_activity(
        self, activity: Any, input: Any = None, *, retry: RetryPolicy | None = None, key: str | int | None = None,
        priority: int = 0,
    ) -> Task[Any]:
        """Run an activity (function or registered name) with one JSON input.

        ``key`` names what its queue's ``key_concurrency`` counts (a tenant, say);
        ``priority``: among ready items of its queue, higher first (FIFO within one).  Both
        are recorded in ``activity_scheduled``; an activity without a queue ignores them.
        """
        name = name_of(activity, kind="activity")
        stored = self._engine.check_payload(input, f"input of activity {name!r}")
        retry_data = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(retry).items()} if retry else None
        if key is not None:
            key = _key(key)
        if priority.__class__ is not int or priority:  # the common call (no priority) checks nothing more
            priority = _priority(priority)
        return ActivityTask(self._engine, name, stored, retry_data, key, priority)

    def call_orchestration(self, orchestration: Any, input: Any = None, *, instance_id: str | None = None) -> Task[Any]:
        """Run a child orchestration and wait for its output."""
        name = name_of(orchestration, kind="orchestration")
        stored = self._engine.check_payload(input, f"input of orchestration {name!r}")
        if instance_id is not None:
            check_id(instance_id, "child instance_id")
        return ChildTask(self._engine, name, stored, instance_id)

    def sleep(self, duration: timedelta | float) -> Task[None]:
        """A durable timer that fires after ``duration`` (a timedelta or seconds)."""
        return TimerTask(self._engine, self.now() + _as_timedelta(duration))

    def wait_for_event(self, name: str, *, timeout: timedelta | float | None = None) -> Task[Any]:
        """Wait for an event raised with ``Client.raise_event``; raises ``pgd.TimeoutError`` on timeout."""
        check_id(name, "event name")
        deadline = None if timeout is None else self.now() + _as_timedelta(timeout)
        return EventTask(self._engine, name, deadline)

    def all(
        self, tasks: Iterable[Task[Any] | Coroutine[Any, Any, Any]], *, limit: int | None = None
    ) -> Task[list[Any]]:
        """All results in task order; at most ``limit`` running at once; fails on the first failure."""
        if limit is not None and limit < 1:
            raise ValueError("limit must be at least 1")
        return AllTask(self._engine, [self._as_task(t) for t in tasks], limit)

    def any(self, tasks: Iterable[Task[Any] | Coroutine[Any, Any, Any]]) -> Task[Task[Any]]:
        """The first task to finish; call ``.result()`` on it for its value or error."""
        return AnyTask(self._engine, [self._as_task(t) for t in tasks])

    def _as_task(self, item: Task[Any] | Coroutine[Any, Any, Any]) -> Task[Any]:
        if isinstance(item, Task):
            return item
        if isinstance(item, Coroutine):
            task = FiberTask(self._engine, item)
            self._engine.adopt(task)  # closed with the execution even if it never starts
            return task
        raise TypeError(f"expected a ctx task or a coroutine, got {type(item).__name__}")

    # -- deterministic helpers -------------------------------------------------
    def now(self) -> datetime:
        """The current time as recorded in history (timezone-aware UTC)."""
        return self._engine.now

    def new_uuid(self) -> uuid.UUID:
        """A UUID that is the same on every replay."""
        self._uuid_counter += 1
        return uuid.uuid5(_UUID_NAMESPACE, f"{self._seed_key}/{self._uuid_counter}")

    def random(self) -> DeterministicRandom:
        """A deterministic float in [0, 1) (with ``random.Random`` methods on it)."""
        value = DeterministicRandom(self._rng.random())
        value._rng = self._rng
        return value

    def set_custom_status(self, value: Any) -> None:
        """Publish a JSON value readable through ``Client.status(...).custom_status``."""
        stored = self._engine.check_payload(value, "custom status")
        if self._engine.stopped:
            return  # after a fault or the end: recorded nowhere, so not kept either
        self._engine.custom_status = stored
        self._engine.custom_status_changed = True
        self._engine.emit(ev.CUSTOM_STATUS_SET, {"value": stored})

    def set_value(self, key: str, value: Any) -> None:
        """Publish a named JSON value (progress, agent state, a partial result).

        Recorded as a ``value_set`` event; clients read it with ``Client.get_value`` and
        ``Client.wait_value``, also after the instance has finished.  Setting a key again
        replaces its value.
        """
        check_id(key, "value key")
        stored = self._engine.check_payload(value, f"value {key!r}")
        if self._engine.stopped:
            return  # after a fault or the end: recorded nowhere
        self._engine.values[key] = stored
        self._engine.emit(ev.VALUE_SET, {"key": key, "value": stored})
    def _note(self, kind: str, data: dict[str, Any]) -> bool:
        """Record a fact that is not a command (the graph interpreter's node states), when live.

        Internal: nothing is recorded on replay (the history already holds it) or after the
        end; returns False when ``data`` is too large to record (the caller may shorten it).
        """
        if kind not in ev.NOTE_KINDS or kind == ev.VERSION_MARKER:
            raise ValueError(f"{kind!r} is not a note kind")
        try:
            stored = self._engine.check_payload(data, kind)
        except SerializationError:
            return False
        self._engine.emit(kind, stored)
        return True

    def version(self, change_id: str, *, default: int = 1, latest: int) -> int:
        """Which code path to take at ``change_id``: ``latest`` for new progress,
        the recorded (or ``default``) version for history written by older code."""
        return self._engine.version(check_id(change_id, "change id"), default, latest)

    def continue_as_new(self, input: Any = None) -> NoReturn:
        """End this execution and start a fresh one (empty history) with ``input``."""
        raise ContinueAsNew(self._engine.check_payload(input, "continue_as_new input"))


def _key(key: Any) -> str:
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key)
    return check_id(key, "activity key")


def _priority(priority: Any) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int) or not -(2**31) <= priority < 2**31:
        raise InvalidArgument(f"priority must be a 32-bit integer, not {priority!r}")
    return priority


def _as_timedelta(value: timedelta | float) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return timedelta(seconds=value)
    raise TypeError(f"expected a timedelta or seconds, got {type(value).__name__}")
