"""The registry of a service's orchestrations and activities: :class:`App`."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

from ._base.definitions import DEFAULT_RETRY, ActivityDef, OrchestrationDef
from ._base.errors import ConfigurationError
from ._base.names import MAX_ID_LENGTH, NAME_ATTR, RESERVED_PREFIX, is_reserved
from ._base.types import Queue, RetryPolicy
from ._graph.builtins import builtin_activities, builtin_orchestrations, graph_function

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class App:
    """A set of orchestrations and activities, registered with decorators.

    ``@app.activity``, ``@app.transaction`` and ``@app.orchestration`` work bare or
    called with options, and return the function unchanged.
    """

    def __init__(self) -> None:
        self.activities: dict[str, ActivityDef] = {}
        self.orchestrations: dict[str, OrchestrationDef] = {}
        self.queues: dict[str, Queue] = {}

    @overload
    def activity(self, fn: F, /) -> F: ...
    @overload
    def activity(
        self, fn: None = None, /, *, name: str | None = None, retry: RetryPolicy | None = None,
        timeout: float | None = None, queue: Queue | None = None,
    ) -> Callable[[F], F]: ...
    def activity(
        self,
        fn: F | None = None,
        /,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        queue: Queue | None = None,
    ) -> F | Callable[[F], F]:
        """Register an activity: ``async def act(ctx: ActivityContext, input)``.

        ``retry`` says how failures are retried; ``timeout`` (seconds) fails an
        attempt that runs longer (and retries it per ``retry``); ``queue`` puts it
        under a :class:`Queue`'s limits, which hold across every worker.
        """
        return self._register_activity(fn, name=name, retry=retry, timeout=timeout, transactional=False,
                                       queue=queue)

    @overload
    def transaction(self, fn: F, /) -> F: ...
    @overload
    def transaction(
        self, fn: None = None, /, *, name: str | None = None, retry: RetryPolicy | None = None,
        timeout: float | None = None, queue: Queue | None = None,
    ) -> Callable[[F], F]: ...
    def transaction(
        self,
        fn: F | None = None,
        /,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        queue: Queue | None = None,
    ) -> F | Callable[[F], F]:
        """Register a transactional activity: its SQL (via ``ctx.conn``) commits with its completion."""
        return self._register_activity(fn, name=name, retry=retry, timeout=timeout, transactional=True,
                                       queue=queue)

    @overload
    def orchestration(self, fn: F, /) -> F: ...
    @overload
    def orchestration(self, fn: None = None, /, *, name: str | None = None) -> Callable[[F], F]: ...
    def orchestration(self, fn: F | None = None, /, *, name: str | None = None) -> F | Callable[[F], F]:
        """Register an orchestration: ``async def orch(ctx: OrchestrationContext, input)``."""

        def register(f: F) -> F:
            reg_name = self._check_new(name or f.__name__, f)
            self.orchestrations[reg_name] = OrchestrationDef(reg_name, f)
            setattr(f, NAME_ATTR, reg_name)
            return f

        return register(fn) if fn is not None else register

    def _register_activity(
        self,
        fn: F | None,
        *,
        name: str | None,
        retry: RetryPolicy | None,
        timeout: float | None,
        transactional: bool,
        queue: Queue | None = None,
    ) -> F | Callable[[F], F]:
        if timeout is not None and timeout <= 0:
            raise ConfigurationError("an activity timeout must be positive")
        if queue is not None:
            self._add_queue(queue)

        def register(f: F) -> F:
            reg_name = self._check_new(name or f.__name__, f)
            self.activities[reg_name] = ActivityDef(reg_name, f, retry or DEFAULT_RETRY, transactional, timeout,
                                                    None if queue is None else queue.name)
            setattr(f, NAME_ATTR, reg_name)
            return f

        return register(fn) if fn is not None else register

    def _add_queue(self, queue: Queue) -> None:
        if not isinstance(queue, Queue):
            raise ConfigurationError(f"queue= takes a pgd.Queue, not {type(queue).__name__}")
        known = self.queues.setdefault(queue.name, queue)
        if known != queue:
            raise ConfigurationError(f"two different queues are named {queue.name!r}: {known} and {queue}")

    def _check_new(self, name: str, fn: Callable[..., Any]) -> str:
        if not inspect.iscoroutinefunction(fn):
            raise ConfigurationError(f"{getattr(fn, '__qualname__', fn)!r} must be an `async def` function")
        if not isinstance(name, str) or not name or "\x00" in name or len(name) > MAX_ID_LENGTH:
            raise ConfigurationError(f"invalid registration name {name!r}")
        if is_reserved(name):
            raise ConfigurationError(f"{name!r}: names starting with {RESERVED_PREFIX!r} belong to the built-ins")
        existing = self.activities.get(name) or self.orchestrations.get(name)
        if existing is not None and existing.fn is not fn:
            raise ConfigurationError(f"the name {name!r} is already registered")
        return name

    def graph(self, name: str, graph: Any) -> None:
        """Register a graph workflow (a ``pgdurable_async.dsl`` node or graph JSON) under ``name``.

        It starts like any orchestration (``client.start(name, input)``); SQL in it
        reads the input as ``$input``.  Raises ``dsl.GraphError`` if the graph is invalid.
        """
        fn = graph_function(name, graph)  # raises GraphError before anything is registered
        if name in self.orchestrations or name in self.activities:
            raise ConfigurationError(f"the name {name!r} is already registered")
        self.install_builtins()
        self.orchestration(name=name)(fn)

    def install_builtins(self) -> None:
        """Register the graph interpreter's orchestration and activities (idempotent).

        Every Runtime calls it, so any worker runs graphs started from SQL (``df.start``).
        """
        for odef in builtin_orchestrations():
            self.orchestrations.setdefault(odef.name, odef)
            setattr(odef.fn, NAME_ATTR, odef.name)
        for adef in builtin_activities():
            self.activities.setdefault(adef.name, adef)
            setattr(adef.fn, NAME_ATTR, adef.name)
