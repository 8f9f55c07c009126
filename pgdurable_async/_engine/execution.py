"""The pure replay engine: drives one execution of an orchestration from events.

No database and no asyncio in here.  :class:`Execution` is fed history events
(``replay``) and then new messages (``advance``); it runs the orchestration's
coroutine until every fiber is blocked and returns the *new* events that the
turn must append.  Commands the code issues are numbered (``task_id``) and, on
replay, checked against the recorded ones; a mismatch fails the execution with
:class:`NonDeterminismError`.  Nothing raised by user code escapes: it becomes
an ``orchestration_failed`` event.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .._base import events as ev
from .._base.errors import ActivityError, Cancelled, NonDeterminismError, SerializationError, SubOrchestrationError
from .._base.errors import TimeoutError as DurableTimeout
from .._base.events import error_payload
from .._base.serde import DEFAULT_MAX_PAYLOAD_BYTES, encode, normalize
from . import mistakes
from .context import ContinueAsNew, OrchestrationContext
from .lineage import generated_child_id, seed_of
from .tasks import ActivityTask, ChildTask, EventTask, FiberTask, Task, TimerTask
from .waits import event_waits

OrchestrationFn = Callable[[OrchestrationContext, Any], Coroutine[Any, Any, Any]]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Event:
    """A history event as the engine sees it (``seq`` is implied by position)."""

    kind: str
    data: dict[str, Any]
    recorded_at: datetime


class _Fiber:
    __slots__ = ("task", "generation")

    def __init__(self, task: FiberTask[Any]) -> None:
        self.task = task
        self.generation = 0


class Execution:
    """In-memory state of one execution; cached between turns by the runtime."""

    def __init__(
        self,
        fn: OrchestrationFn,
        *,
        instance_id: str,
        execution_id: int,
        name: str,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        self.fn = fn
        self.instance_id = instance_id
        self.execution_id = execution_id
        self.name = name
        self.max_payload_bytes = max_payload_bytes
        self.ctx = OrchestrationContext(self)
        self.history_len = 0
        self.now: datetime = _EPOCH
        self.replaying = False
        self.custom_status: Any = None
        self.custom_status_changed = False
        self.values: dict[str, Any] = {}  # ctx.set_value, as recorded so far
        self.outcome: Event | None = None  # the terminal event, once there is one
        self._next_task_id = 1
        self._tasks: dict[int, Task[Any]] = {}
        self._recorded_commands: dict[int, Event] = {}
        self._replayed_commands: dict[int, Event] = {}  # recorded commands the code issued again
        self._last_recorded: str | None = None  # kind of the last recorded event replayed
        self._versions: dict[str, int] = {}
        self._ready: deque[tuple[_Fiber, BaseException | None]] = deque()
        self._main: _Fiber | None = None
        self._waiters: dict[str, deque[EventTask[Any]]] = {}
        self._timeout_timers: list[TimerTask] = []  # the timers of event timeouts, until they fire
        self._inbox: dict[str, deque[Any]] = {}
        self._new: list[Event] = []
        self.unapplied: list[tuple[str, dict[str, Any]]] = []
        self._fault: NonDeterminismError | None = None
        self._remaining_recorded = 0
        self._fibers: list[FiberTask[Any]] = []
        self.closing = False  # set by close(): awaiting a task then raises GeneratorExit

    # -- public driver API ---------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.outcome is not None

    @property
    def fault(self) -> NonDeterminismError | None:
        """Why replay disagreed with the history (None while it agrees)."""
        return self._fault

    @property
    def resumable(self) -> bool:
        """True when the history ends with ``forked_from``: a fork whose first turn has not run."""
        return self._last_recorded == ev.FORKED_FROM and not self.stopped

    def open_commands(self) -> list[Event]:
        """Recorded commands whose tasks have no result yet, in task order.

        A fork's first turn re-issues them: the copied history holds their
        ``*_scheduled`` / ``timer_created`` events, but no work item, timer or child.
        """
        return [event for task_id, event in sorted(self._replayed_commands.items())
                if not self._tasks[task_id].done()]

    @property
    def stopped(self) -> bool:
        """True once nothing more may be recorded: after a fault, the end, or :meth:`close`."""
        return self._fault is not None or self.outcome is not None or self.closing

    def replay(self, history: Iterable[Event]) -> None:
        """Rebuild state from the recorded history of this execution."""
        events = list(history)
        self._index(events)
        # A fork's forked_from marker is no turn of the code: commands issued after the last
        # copied event are new progress (they follow the marker), not a disagreement.
        self._remaining_recorded = sum(e.kind != ev.FORKED_FROM for e in events)
        for event in events:
            self._remaining_recorded -= event.kind != ev.FORKED_FROM
            self.history_len += 1
            self._last_recorded = event.kind
            if self._fault is None and self.outcome is None:
                self._apply(event, recorded=True)
                if self._remaining_recorded == 0:
                    self.replaying = False  # what the code does after the last recorded event is new
                self._settle(final=False)
        self._remaining_recorded = 0
        ended = bool(events) and events[-1].kind in ev.TERMINAL_KINDS
        self.replaying = ended  # a history has one ending: nothing is appended after it
        if self._fault is None and self._recorded_commands:
            task_id, cmd = min(self._recorded_commands.items())
            self._nondeterminism(
                f"history records {cmd.kind} #{task_id} ({cmd.data.get('name', '')!r}) "
                "that the orchestration code no longer issues"
            )
        if self._fault is not None:
            self.outcome = None  # replay disagreed: whatever ending the code reached, it fails below
        elif self.outcome is not None and not ended and all(e is not self.outcome for e in self._new):
            self._record(self.outcome)  # code now ends where the history did not record it
        self._settle()
        self.replaying = False

    def close(self) -> None:
        """Close the orchestration's coroutines (an execution dropped unfinished, e.g. evicted).

        Never raises: a ``finally`` block that awaits a task gets ``GeneratorExit`` there
        (see ``Task.__await__``), as nothing can happen once the execution is over.
        """
        self.closing = True
        for fiber in ([self._main.task] if self._main is not None else []) + self._fibers:
            try:
                fiber.coro.close()
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:  # noqa: BLE001 - e.g. "coroutine ignored GeneratorExit"
                pass

    def advance(self, messages: Iterable[tuple[str, dict[str, Any]]], now: datetime) -> list[Event]:
        """Apply new messages (live) and return the new events to append, in order.

        Messages that arrive after the execution ended are not applied; they are
        left in :attr:`unapplied` (``continue_as_new`` hands them to the next execution).
        """
        self.unapplied = []
        for kind, data in messages:
            if self.outcome is not None:
                self.unapplied.append((kind, data))
                continue
            event = Event(kind, data, now)
            self._record(event)
            self._apply(event, recorded=False)
            self._settle()
        new, self._new = self._new, []
        return new

    def _index(self, events: list[Event]) -> None:
        """Collect the recorded commands (by task id), version markers and the uuid/random seed."""
        seeded = False
        for event in events:
            try:
                if event.kind in ev.COMMAND_KINDS:
                    task_id = event.data.get("task_id")
                    if not isinstance(task_id, int):
                        self._nondeterminism(f"malformed history: {event.kind} without a task_id")
                        return
                    self._recorded_commands[task_id] = event
                elif event.kind == ev.VERSION_MARKER:
                    self._versions[str(event.data.get("change_id"))] = int(event.data.get("version", 1))
                elif event.kind in (ev.ORCHESTRATION_STARTED, ev.FORKED_FROM) and not seeded:
                    seed = seed_of(event)  # whose execution drew the recorded uuids (a fork's copy: its source's)
                    if seed is not None:
                        seeded = True
                        self.ctx._reseed(seed)
            except (TypeError, ValueError, AttributeError) as exc:
                self._nondeterminism(f"malformed history event {event.kind!r}: {exc}")
                return

    def event_waits(self) -> dict[str, Any] | None:
        """What history cannot say it waits on (see :func:`pgdurable_async._engine.waits.event_waits`)."""
        return event_waits(self)

    def pending_events(self) -> list[dict[str, Any]]:
        """Raised events nobody has consumed yet (carried over by continue_as_new)."""
        return [{"name": n, "data": d} for n, queue in self._inbox.items() for d in queue]

    # -- commands (called by tasks and the context) --------------------------
    def schedule(self, task: Task[Any], kind: str, data: dict[str, Any]) -> None:
        if self.stopped:
            return  # code still running after a fault or the end (a finally block): nothing more is recorded
        task_id = self._next_task_id
        self._next_task_id += 1
        task.task_id = task_id
        self._tasks[task_id] = task
        recorded = self._recorded_commands.pop(task_id, None)
        if recorded is not None:
            self._replayed_commands[task_id] = recorded
            if recorded.kind != kind or not _same_command(kind, recorded.data, data):
                self._nondeterminism(
                    f"command #{task_id}: history records {recorded.kind} "
                    f"{recorded.data.get('name', '')!r} but the code issued {kind} {data.get('name', '')!r}"
                    + (" with another input" if recorded.kind == kind and recorded.data.get("name") == data.get("name")
                       else "")
                )
            return
        if self.replaying and self._remaining_recorded > 0:
            self._nondeterminism(
                f"command #{task_id}: the code issued {kind} {data.get('name', '')!r} "
                "where the history records none"
            )
            return
        self._record(Event(kind, {"task_id": task_id, **data}, self.now))

    def schedule_child(self, task: ChildTask[Any]) -> None:
        task_id = self._next_task_id
        child_id = task.instance_id or f"{self.instance_id}:{self.execution_id}:{task_id}"
        recorded = self._recorded_commands.get(task_id)
        if task.instance_id is None and recorded is not None and generated_child_id(recorded, task_id):
            child_id = str(recorded.data["instance_id"])  # a fork's copied history names the source's child
        task.instance_id = child_id
        data = {"name": task.name, "instance_id": child_id, "input": task.input}
        self.schedule(task, ev.SUB_ORCHESTRATION_SCHEDULED, data)

    def subscribe(self, task: EventTask[Any]) -> None:
        inbox = self._inbox.get(task.name)
        if inbox:
            task._resolve(inbox.popleft())
            return
        self._waiters.setdefault(task.name, deque()).append(task)
        task.since = self.now
        if task.timeout_at is not None:
            timer = TimerTask(self, task.timeout_at)
            timer.on_fire = lambda: self._event_timed_out(task)
            task.timer = timer
            timer._start()
            self._timeout_timers.append(timer)

    def unsubscribe(self, task: EventTask[Any]) -> None:
        waiters = self._waiters.get(task.name)
        if waiters and task in waiters:
            waiters.remove(task)

    def spawn(self, task: FiberTask[Any]) -> None:
        self._ready.append((_Fiber(task), None))

    def adopt(self, task: FiberTask[Any]) -> None:
        """Remember a helper coroutine so that :meth:`close` closes it even if it never starts."""
        self._fibers.append(task)

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        """Record a non-command event (custom status, version marker, graph node fact) when live."""
        if not self.replaying and not self.stopped:
            self._record(Event(kind, data, self.now))

    def version(self, change_id: str, default: int, latest: int) -> int:
        if change_id in self._versions:
            return self._versions[change_id]
        chosen = default if self.replaying else latest
        self._versions[change_id] = chosen
        if not self.replaying:
            self.emit(ev.VERSION_MARKER, {"change_id": change_id, "version": chosen})
        return chosen

    def check_payload(self, value: Any, what: str) -> Any:
        """Encode-check a value the code hands to a command; returns it as stored."""
        encode(value, what=what, limit=self.max_payload_bytes)
        return normalize(value)

    # -- event application ---------------------------------------------------
    def _record(self, event: Event) -> None:
        self._new.append(event)
        self.history_len += 1

    def _apply(self, event: Event, *, recorded: bool) -> None:
        self.now = event.recorded_at
        self.replaying = recorded
        kind, data = event.kind, event.data
        try:
            if kind == ev.ORCHESTRATION_STARTED:
                self._start(data.get("input"))
            elif kind in ev.COMMAND_KINDS:
                if data.get("task_id") in self._recorded_commands:
                    self._nondeterminism(
                        f"history records {kind} #{data.get('task_id')} ({data.get('name', '')!r}) "
                        "but the code did not issue it"
                    )
            elif kind == ev.ACTIVITY_COMPLETED or kind == ev.SUB_ORCHESTRATION_COMPLETED:
                self._task(data, kind)._resolve(data.get("result"))
            elif kind == ev.ACTIVITY_FAILED:
                task = self._task(data, kind)
                err = data.get("error") or {}
                task._fail(
                    ActivityError(
                        activity_name=getattr(task, "name", ""),
                        error_type=str(err.get("type", "")),
                        error_message=str(err.get("message", "")),
                        traceback=str(err.get("traceback", "")),
                        attempts=int(data.get("attempts", 0)),
                    )
                )
            elif kind == ev.SUB_ORCHESTRATION_FAILED:
                task = self._task(data, kind)
                task._fail(SubOrchestrationError(instance_id=str(data.get("instance_id", "")), error=data.get("error")))
            elif kind == ev.TIMER_FIRED:
                timer = self._task(data, kind)
                if isinstance(timer, TimerTask) and timer.on_fire is not None:
                    timer.on_fire()
                timer._resolve(None)
            elif kind == ev.EVENT_RECEIVED:
                self._deliver(str(data.get("name")), data.get("data"))
            elif kind == ev.CANCEL_REQUESTED:
                self._cancel(data.get("reason"))
            elif kind in ev.NOTE_KINDS or kind == ev.FORKED_FROM:
                if kind == ev.CUSTOM_STATUS_SET:
                    self.custom_status = data.get("value")
            elif kind == ev.VALUE_SET:
                self.values[str(data["key"])] = data.get("value")
            elif kind in ev.TERMINAL_KINDS:
                self.outcome = event
            else:
                self._nondeterminism(f"malformed history: unknown event kind {kind!r}")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            self._nondeterminism(f"malformed history event {kind!r}: {exc}")

    def _task(self, data: dict[str, Any], kind: str) -> Task[Any]:
        """The unfinished task a completion event names, of the kind that event completes."""
        if "task_id" not in data:
            raise ValueError("it has no task_id")
        task_id = data["task_id"]
        task = self._tasks.get(task_id)
        if task is None:
            raise ValueError(f"it refers to task #{task_id}, which was never scheduled")
        expected = _COMPLETES[kind]
        if not isinstance(task, expected):
            raise ValueError(f"task #{task_id} is a {type(task).__name__}, not a {expected.__name__}")
        if task.done():
            raise ValueError(f"task #{task_id} already has its result")
        return task

    def _start(self, input: Any) -> None:
        coro = self.fn(self.ctx, input)
        main = FiberTask(self, coro)
        main._started = True
        self._main = _Fiber(main)
        self._ready.append((self._main, None))

    def _deliver(self, name: str, data: Any) -> None:
        waiters = self._waiters.get(name)
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter._resolve(data)
                return
        self._inbox.setdefault(name, deque()).append(data)

    def _event_timed_out(self, task: EventTask[Any]) -> None:
        waiters = self._waiters.get(task.name)
        if waiters and task in waiters:
            waiters.remove(task)
        task._fail(DurableTimeout(f"no {task.name!r} event arrived in time", event=task.name))

    def _cancel(self, reason: Any) -> None:
        main = self._main
        if main is None or main.task.done():
            return
        main.generation += 1  # detach it from whatever it awaited
        error = Cancelled(f"instance {self.instance_id!r} was cancelled", instance_id=self.instance_id, reason=reason)
        self._ready.append((main, error))

    def _nondeterminism(self, message: str) -> None:
        if self._fault is None:
            self._fault = NonDeterminismError(message, instance_id=self.instance_id)

    # -- running fibers ------------------------------------------------------
    def _settle(self, *, final: bool = True) -> None:
        while self._ready and self._fault is None and self.outcome is None:
            fiber, throw = self._ready.popleft()
            self._step(fiber, throw)
        if self.outcome is not None or (self._fault is not None and not final):
            return
        if self._fault is not None:
            self._finish(ev.ORCHESTRATION_FAILED, {"error": error_payload(self._fault)})
            return
        main = self._main
        if main is not None and main.task.done():
            self._conclude(main.task)

    def _step(self, fiber: _Fiber, throw: BaseException | None) -> None:
        coro = fiber.task.coro
        while True:
            try:
                yielded = coro.throw(throw) if throw is not None else coro.send(None)
            except StopIteration as stop:
                fiber.task._resolve(stop.value)
                return
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # noqa: BLE001 - user failures become history
                fiber.task._fail(exc)
                return
            throw = None
            if self._fault is not None:
                return
            if isinstance(yielded, Task) and yielded._engine is self:
                if yielded.done():
                    continue
                yielded._add_callback(self._waker(fiber))
                return
            throw = NonDeterminismError(mistakes.foreign_await(coro, self.ctx, yielded))
            self._fault = throw

    def _waker(self, fiber: _Fiber) -> Callable[[Task[Any]], None]:
        generation = fiber.generation

        def wake(_task: Task[Any]) -> None:
            if fiber.generation == generation:  # else a cancel already resumed it
                self._ready.append((fiber, None))

        return wake

    def _conclude(self, main: FiberTask[Any]) -> None:
        error = main._error
        if error is None:
            unawaited = mistakes.find_task(main._result, Task)
            if unawaited is not None:
                if hasattr(unawaited, "close"):
                    unawaited.close()  # a coroutine: no "never awaited" warning on top of the error
                self._finish(ev.ORCHESTRATION_FAILED, {"error": error_payload(TypeError(
                    mistakes.unawaited_output(unawaited)))})
                return
            try:
                output = self.check_payload(main._result, "orchestration output")
            except SerializationError as exc:
                self._finish(ev.ORCHESTRATION_FAILED, {"error": error_payload(exc)})
                return
            self._finish(ev.ORCHESTRATION_COMPLETED, {"output": output})
        elif isinstance(error, ContinueAsNew):
            self._finish(ev.CONTINUED_AS_NEW, {"input": error.input, "carry_over": self.pending_events()})
        elif isinstance(error, Cancelled):
            self._finish(ev.ORCHESTRATION_CANCELLED, {"reason": error.reason})
        else:
            self._finish(ev.ORCHESTRATION_FAILED, {"error": error_payload(error)})

    def _finish(self, kind: str, data: dict[str, Any]) -> None:
        event = Event(kind, data, self.now)
        self.outcome = event
        if not self.replaying:
            self._record(event)
        self._ready.clear()
        self.close()


_COMPLETES: dict[str, type[Task[Any]]] = {
    ev.ACTIVITY_COMPLETED: ActivityTask,
    ev.ACTIVITY_FAILED: ActivityTask,
    ev.TIMER_FIRED: TimerTask,
    ev.SUB_ORCHESTRATION_COMPLETED: ChildTask,
    ev.SUB_ORCHESTRATION_FAILED: ChildTask,
}


def _same_command(kind: str, recorded: dict[str, Any], issued: dict[str, Any]) -> bool:
    if kind == ev.TIMER_CREATED:
        return True
    keys = ("name", "input", "instance_id") if kind == ev.SUB_ORCHESTRATION_SCHEDULED else ("name", "input")
    return all(recorded.get(k) == issued.get(k) for k in keys)
