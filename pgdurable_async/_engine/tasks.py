"""Durable tasks: what an orchestration awaits.

A task is lazy, like a coroutine: it is scheduled (and its command recorded)
when it is first awaited or handed to ``ctx.all`` / ``ctx.any``.  Tasks never
touch asyncio; the replay engine resolves them from history events.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine, Generator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .._base import events as ev
from .._base.errors import PgDurableError

if TYPE_CHECKING:
    from .execution import Execution

T = TypeVar("T")
_UNSET: Any = object()


class Task(Generic[T]):
    """A unit of durable work inside an orchestration (activity, timer, event, ...)."""

    __slots__ = ("_engine", "_started", "_result", "_error", "_callbacks", "task_id")

    def __init__(self, engine: Execution) -> None:
        self._engine = engine
        self._started = False
        self._result: Any = _UNSET
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Task[Any]], None]] = []
        self.task_id: int | None = None

    # -- state -------------------------------------------------------------
    def done(self) -> bool:
        """True once the task has a result or an error."""
        return self._result is not _UNSET or self._error is not None

    def result(self) -> T:
        """The task's value; raises its error if it failed."""
        if self._error is not None:
            raise self._error
        if self._result is _UNSET:
            raise PgDurableError("task is not finished yet")
        return self._result  # type: ignore[no-any-return]

    def exception(self) -> BaseException | None:
        """The task's error, or None."""
        return self._error

    # -- engine side -------------------------------------------------------
    def _start(self) -> None:
        if not self._started:
            self._started = True
            self._on_start()

    def _on_start(self) -> None:
        raise NotImplementedError

    def _abandon(self) -> None:
        """Nobody will await this task any more (it lost an ``any``, or its ``all`` failed)."""

    def _add_callback(self, callback: Callable[[Task[Any]], None]) -> None:
        if self.done():
            callback(self)
        else:
            self._callbacks.append(callback)

    def _resolve(self, value: Any) -> None:
        if not self.done():
            self._result = value
            self._fire()

    def _fail(self, error: BaseException) -> None:
        if not self.done():
            self._error = error
            self._fire()

    def _fire(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    def __await__(self) -> Generator[Any, None, T]:
        self._start()
        if not self.done():
            if self._engine.closing:  # a finally block run by Execution.close(): let the coroutine end
                raise GeneratorExit
            yield self
        return self.result()


class ActivityTask(Task[T]):
    __slots__ = ("name", "input", "retry", "key", "priority")

    def __init__(
        self, engine: Execution, name: str, input: Any, retry: dict[str, Any] | None, key: str | None = None,
        priority: int = 0,
    ) -> None:
        super().__init__(engine)
        self.name, self.input, self.retry, self.key, self.priority = name, input, retry, key, priority

    def _on_start(self) -> None:
        data: dict[str, Any] = {"name": self.name, "input": self.input}
        if self.retry is not None:
            data["retry"] = self.retry
        if self.key is not None:
            data["key"] = self.key
        if self.priority:
            data["priority"] = self.priority
        self._engine.schedule(self, ev.ACTIVITY_SCHEDULED, data)


class TimerTask(Task[None]):
    __slots__ = ("fire_at", "on_fire")

    def __init__(self, engine: Execution, fire_at: datetime) -> None:
        super().__init__(engine)
        self.fire_at = fire_at
        self.on_fire: Callable[[], None] | None = None

    def _on_start(self) -> None:
        self._engine.schedule(self, ev.TIMER_CREATED, {"fire_at": self.fire_at.isoformat()})


class ChildTask(Task[T]):
    __slots__ = ("name", "input", "instance_id")

    def __init__(self, engine: Execution, name: str, input: Any, instance_id: str | None) -> None:
        super().__init__(engine)
        self.name, self.input, self.instance_id = name, input, instance_id

    def _on_start(self) -> None:
        self._engine.schedule_child(self)


class EventTask(Task[T]):
    """``ctx.wait_for_event``: resolved by the next matching raised event, or times out."""

    __slots__ = ("name", "timeout_at", "since", "timer")

    def __init__(self, engine: Execution, name: str, timeout_at: datetime | None) -> None:
        super().__init__(engine)
        self.name, self.timeout_at = name, timeout_at
        self.since: datetime | None = None  # set when it subscribes (history time)
        self.timer: TimerTask | None = None  # its timeout timer, if any

    def _on_start(self) -> None:
        self._engine.subscribe(self)

    def _abandon(self) -> None:
        if not self.done():
            self._engine.unsubscribe(self)
            self._started = False  # awaited again later: it subscribes afresh


class AllTask(Task[list[Any]]):
    """``ctx.all``: every child's result in order; fails fast on the first failure."""

    __slots__ = ("children", "limit", "_next", "_remaining", "_running", "_filling")

    def __init__(self, engine: Execution, children: Sequence[Task[Any]], limit: int | None) -> None:
        super().__init__(engine)
        self.children = list(children)
        self.limit = limit
        self._next = 0
        self._remaining = len(self.children)
        self._running = 0
        self._filling = False

    def _on_start(self) -> None:
        if not self.children:
            self._resolve([])
            return
        self._fill()

    def _fill(self) -> None:
        # A child may already be done when started (a task awaited before, a buffered
        # event); its callback re-enters here, so loop instead of recursing.
        if self._filling:
            return
        self._filling = True
        try:
            window = len(self.children) if self.limit is None else self.limit
            while not self.done() and self._next < len(self.children) and self._running < window:
                child = self.children[self._next]
                self._next += 1
                self._running += 1
                child._start()
                child._add_callback(self._child_done)
        finally:
            self._filling = False

    def _child_done(self, child: Task[Any]) -> None:
        if self.done():
            return
        if child._error is not None:
            self._fail(child._error)
            self._abandon()
            return
        self._running -= 1
        self._remaining -= 1
        if self._remaining == 0:
            self._resolve([c._result for c in self.children])
        else:
            self._fill()

    def _abandon(self) -> None:
        for child in self.children[: self._next]:
            if not child.done():
                child._abandon()


class AnyTask(Task[Task[Any]]):
    """``ctx.any``: the first child to finish (its ``.result()`` gives the value or raises)."""

    __slots__ = ("children",)

    def __init__(self, engine: Execution, children: Sequence[Task[Any]]) -> None:
        super().__init__(engine)
        self.children = list(children)

    def _on_start(self) -> None:
        if not self.children:
            raise ValueError("ctx.any() needs at least one task")
        for child in self.children:
            child._start()
            child._add_callback(self._first_done)

    def _first_done(self, child: Task[Any]) -> None:
        if not self.done():
            self._resolve(child)
            self._abandon()

    def _abandon(self) -> None:
        for child in self.children:
            if not child.done():
                child._abandon()


class FiberTask(Task[T]):
    """A plain coroutine (for example a helper ``async def``) run concurrently by the engine."""

    __slots__ = ("coro",)

    def __init__(self, engine: Execution, coro: Coroutine[Any, Any, T]) -> None:
        super().__init__(engine)
        self.coro = coro

    def _on_start(self) -> None:
        self._engine.spawn(self)

    def __del__(self) -> None:
        # Never run (the tail of a failed `all`, a discarded replay): close it quietly
        # instead of leaving Python to warn that it was never awaited.
        try:
            created = inspect.getcoroutinestate(self.coro) == inspect.CORO_CREATED
        except AttributeError:  # not a native coroutine
            return
        if created:
            self.coro.close()
