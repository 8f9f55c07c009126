"""What registration records (a function and its options), and what an activity is handed (its context)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .types import RetryPolicy

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

    conn: Any = field(default=None, repr=False)  # the asyncpg connection of the open transaction
    schema: str = "pgdurable"  # the schema of the runtime's own tables


@dataclass(frozen=True)
class ActivityDef:
    name: str
    fn: Callable[..., Awaitable[Any]]
    retry: RetryPolicy
    transactional: bool
    timeout: float | None = None  # start-to-close, per attempt
    queue: str | None = None  # the name of its pgd.Queue, if any
    #: Before each attempt of a non-transactional activity: ``check(ctx, input)`` in a short
    #: transaction of its own (``ctx`` a :class:`TransactionContext`); raising fails the attempt.
    check: Callable[[TransactionContext, Any], Awaitable[None]] | None = None


@dataclass(frozen=True)
class OrchestrationDef:
    name: str
    fn: Callable[..., Awaitable[Any]]
