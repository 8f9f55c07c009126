"""The registry of a service's orchestrations and activities: :class:`App`."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, overload

from ._errors import ConfigurationError, InvalidArgument, UnknownNameError
from ._types import RetryPolicy

if TYPE_CHECKING:
    import asyncpg

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

_NAME_ATTR = "__pgdurable_name__"
DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True)
class ActivityContext:
    """What an activity knows about the call it serves."""

    instance_id: str
    activity_id: str
    name: str
    attempt: int


@dataclass(frozen=True)
class TransactionContext(ActivityContext):
    """An :class:`ActivityContext` with the open transaction's connection (``conn``).

    Whatever the activity does through ``conn`` commits together with the record
    of its completion, or not at all.
    """

    conn: asyncpg.Connection[Any] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ActivityDef:
    name: str
    fn: Callable[..., Awaitable[Any]]
    retry: RetryPolicy
    transactional: bool
    timeout: float | None = None  # start-to-close, per attempt


@dataclass(frozen=True)
class OrchestrationDef:
    name: str
    fn: Callable[..., Awaitable[Any]]


MAX_ID_LENGTH = 200


def check_id(value: Any, what: str = "instance_id") -> str:
    """Validate an id or name (always bound as a parameter, never spliced into SQL)."""
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{what} must be a non-empty string")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(f"{what} is {len(value)} characters long; the limit is {MAX_ID_LENGTH}")
    if "\x00" in value:
        raise InvalidArgument(f"{what} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} is not valid UTF-8 (a lone surrogate?)") from None
    return value


def name_of(ref: Any, *, kind: str) -> str:
    """The registered name of an orchestration or activity given by function or name."""
    if isinstance(ref, str):
        return check_id(ref, f"{kind} name")
    name = getattr(ref, _NAME_ATTR, None)
    if isinstance(name, str):
        return name
    raise UnknownNameError(
        f"{getattr(ref, '__qualname__', ref)!r} is not a registered {kind}; "
        f"decorate it with @app.{kind} or pass its registered name",
        kind=kind,
        name=str(getattr(ref, "__qualname__", ref)),
    )


class App:
    """A set of orchestrations and activities, registered with decorators.

    ``@app.activity``, ``@app.transaction`` and ``@app.orchestration`` work bare or
    called with options, and return the function unchanged.
    """

    def __init__(self) -> None:
        self.activities: dict[str, ActivityDef] = {}
        self.orchestrations: dict[str, OrchestrationDef] = {}

    @overload
    def activity(self, fn: F, /) -> F: ...
    @overload
    def activity(
        self, fn: None = None, /, *, name: str | None = None, retry: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> Callable[[F], F]: ...
    def activity(
        self,
        fn: F | None = None,
        /,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> F | Callable[[F], F]:
        """Register an activity: ``async def act(ctx: ActivityContext, input)``.

        ``retry`` says how failures are retried; ``timeout`` (seconds) fails an
        attempt that runs longer (and retries it per ``retry``).
        """
        return self._register_activity(fn, name=name, retry=retry, timeout=timeout, transactional=False)

    @overload
    def transaction(self, fn: F, /) -> F: ...
    @overload
    def transaction(
        self, fn: None = None, /, *, name: str | None = None, retry: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> Callable[[F], F]: ...
    def transaction(
        self,
        fn: F | None = None,
        /,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> F | Callable[[F], F]:
        """Register a transactional activity: its SQL (via ``ctx.conn``) commits with its completion."""
        return self._register_activity(fn, name=name, retry=retry, timeout=timeout, transactional=True)

    @overload
    def orchestration(self, fn: F, /) -> F: ...
    @overload
    def orchestration(self, fn: None = None, /, *, name: str | None = None) -> Callable[[F], F]: ...
    def orchestration(self, fn: F | None = None, /, *, name: str | None = None) -> F | Callable[[F], F]:
        """Register an orchestration: ``async def orch(ctx: OrchestrationContext, input)``."""

        def register(f: F) -> F:
            reg_name = self._check_new(name or f.__name__, f)
            self.orchestrations[reg_name] = OrchestrationDef(reg_name, f)
            setattr(f, _NAME_ATTR, reg_name)
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
    ) -> F | Callable[[F], F]:
        if timeout is not None and timeout <= 0:
            raise ConfigurationError("an activity timeout must be positive")

        def register(f: F) -> F:
            reg_name = self._check_new(name or f.__name__, f)
            self.activities[reg_name] = ActivityDef(reg_name, f, retry or DEFAULT_RETRY, transactional, timeout)
            setattr(f, _NAME_ATTR, reg_name)
            return f

        return register(fn) if fn is not None else register

    def _check_new(self, name: str, fn: Callable[..., Any]) -> str:
        if not inspect.iscoroutinefunction(fn):
            raise ConfigurationError(f"{getattr(fn, '__qualname__', fn)!r} must be an `async def` function")
        if not isinstance(name, str) or not name or "\x00" in name or len(name) > 200:
            raise ConfigurationError(f"invalid registration name {name!r}")
        existing = self.activities.get(name) or self.orchestrations.get(name)
        if existing is not None and existing.fn is not fn:
            raise ConfigurationError(f"the name {name!r} is already registered")
        return name

    def graph(self, name: str, graph: Any) -> None:
        """Register a graph workflow (a ``pgdurable_async.dsl`` node or graph JSON) under ``name``.

        It starts like any orchestration (``client.start(name, input)``); SQL in it
        reads the input as ``$input``.  Raises ``dsl.GraphError`` if the graph is invalid.
        """
        from ._graph_acts import register_graph

        register_graph(self, name, graph)

    def orchestration_def(self, ref: Any) -> OrchestrationDef:
        """The orchestration registered under ``ref`` (function or name)."""
        name = name_of(ref, kind="orchestration")
        try:
            return self.orchestrations[name]
        except KeyError:
            raise UnknownNameError(
                f"no orchestration named {name!r} is registered", kind="orchestration", name=name
            ) from None
