"""The one exception hierarchy of pgdurable_async.

::

    PgDurableError
    ├── ConfigurationError          bad settings, unknown app, no PostgreSQL binaries
    │   └── SchemaVersionError      the database schema is newer than this code
    ├── InvalidArgument             a malformed id or name (also a ValueError)
    ├── DatabaseError               the database cannot be reached or refused a query
    ├── SerializationError          a value is not JSON-encodable, or too large
    ├── UnknownNameError            no orchestration / activity registered under a name
    ├── InstanceNotFound
    ├── InstanceAlreadyExists
    ├── ScheduleNotFound
    ├── ScheduleAlreadyExists
    ├── InstanceFailed              the awaited instance failed (carries its error)
    ├── ActivityError               an activity failed after its retries (type, message, traceback)
    ├── SubOrchestrationError       a child orchestration failed
    ├── TimeoutError                a wait / wait_for_event / result timed out
    ├── NonDeterminismError         replay disagrees with the recorded history
    ├── GraphError                  a graph is malformed or not allowed (dsl.GraphError)
    └── Cancelled                   the instance was cancelled (BaseException: not swallowed
        │                           by ``except Exception`` inside the orchestration)
        └── InstanceCancelled       what a client's wait raises: also an ``Exception``

Every error carries structured fields and pickles cleanly (``__reduce__``
re-creates it from its constructor arguments).
"""

from __future__ import annotations

import builtins
from typing import Any


class _RootMeta(type):
    """Lets ``Cancelled`` (a ``BaseException``) count as a ``PgDurableError`` in checks."""

    def __instancecheck__(cls, instance: Any) -> bool:
        return type.__instancecheck__(cls, instance) or (
            cls is PgDurableError and isinstance(instance, Cancelled)
        )

    def __subclasscheck__(cls, subclass: type) -> bool:
        return type.__subclasscheck__(cls, subclass) or (
            cls is PgDurableError and isinstance(subclass, type) and issubclass(subclass, Cancelled)
        )


class PgDurableError(Exception, metaclass=_RootMeta):
    """Root of every error raised by pgdurable_async."""

    def __init__(self, message: str = "", **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        for key, value in fields.items():
            setattr(self, key, value)
        self._fields = fields

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self._fields))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[PgDurableError], message: str, fields: dict[str, Any]) -> PgDurableError:
    err = cls.__new__(cls)
    PgDurableError.__init__(err, message, **fields)
    return err


class ConfigurationError(PgDurableError):
    """Settings, arguments or the environment are not usable."""


class SchemaVersionError(ConfigurationError):
    """The database schema was migrated by a newer pgdurable_async."""


class InvalidArgument(PgDurableError, ValueError):
    """An instance id, event name or other argument is malformed."""


class DatabaseError(PgDurableError):
    """The database is unreachable or rejected an operation."""


class SerializationError(PgDurableError):
    """A value cannot be encoded as JSON, or exceeds the payload limit."""


class UnknownNameError(PgDurableError):
    """No orchestration or activity is registered under the given name."""

    def __init__(self, message: str = "", *, kind: str = "", name: str = "") -> None:
        super().__init__(message, kind=kind, name=name)


class InstanceNotFound(PgDurableError):
    """No instance has the given id."""

    def __init__(self, instance_id: str = "") -> None:
        super().__init__(f"instance {instance_id!r} not found", instance_id=instance_id)


class InstanceAlreadyExists(PgDurableError):
    """An instance with the given id already exists."""

    def __init__(self, instance_id: str = "") -> None:
        super().__init__(f"instance {instance_id!r} already exists", instance_id=instance_id)


class ScheduleNotFound(PgDurableError):
    """No schedule has the given id."""

    def __init__(self, schedule_id: str = "") -> None:
        super().__init__(f"schedule {schedule_id!r} not found", schedule_id=schedule_id)


class ScheduleAlreadyExists(PgDurableError):
    """A schedule with the given id already exists."""

    def __init__(self, schedule_id: str = "") -> None:
        super().__init__(f"schedule {schedule_id!r} already exists", schedule_id=schedule_id)


class InstanceFailed(PgDurableError):
    """The awaited instance ended in failure; ``error`` holds the recorded failure."""

    def __init__(self, instance_id: str = "", error: Any = None) -> None:
        detail = error.get("message", "") if isinstance(error, dict) else str(error)
        etype = error.get("type", "") if isinstance(error, dict) else ""
        text = f"instance {instance_id!r} failed: {etype + ': ' if etype else ''}{detail}"
        super().__init__(text, instance_id=instance_id, error=error)


class ActivityError(PgDurableError):
    """An activity failed and its retries are exhausted.

    ``error_type``, ``error_message`` and ``traceback`` describe the remote failure.
    """

    def __init__(
        self,
        message: str = "",
        *,
        activity_name: str = "",
        error_type: str = "",
        error_message: str = "",
        traceback: str = "",
        attempts: int = 0,
    ) -> None:
        super().__init__(
            message or f"activity {activity_name!r} failed: {error_type}: {error_message}",
            activity_name=activity_name,
            error_type=error_type,
            error_message=error_message,
            traceback=traceback,
            attempts=attempts,
        )


class SubOrchestrationError(PgDurableError):
    """A child orchestration failed; ``error`` holds its recorded failure."""

    def __init__(self, message: str = "", *, instance_id: str = "", error: Any = None) -> None:
        if not message:
            message = f"sub-orchestration {instance_id!r} failed"
            if isinstance(error, dict) and (error.get("type") or error.get("message")):
                message += f": {error.get('type') or 'Error'}: {error.get('message') or ''}"
        super().__init__(message, instance_id=instance_id, error=error)


class TimeoutError(PgDurableError, builtins.TimeoutError):  # noqa: A001 - contract name
    """A wait exceeded its timeout."""


class NonDeterminismError(PgDurableError):
    """Replaying the orchestration produced a command the history does not record."""


class GraphError(PgDurableError):
    """A graph is malformed: unknown node type, bad field, bad cron, unbound reference."""

    def __init__(self, message: str = "", *, node_id: str | None = None) -> None:
        super().__init__(message if node_id is None else f"{message} (node {node_id})", node_id=node_id)


class Cancelled(BaseException):
    """The instance was cancelled.

    A ``BaseException`` (like ``asyncio.CancelledError``) so that ``except Exception``
    in user code does not swallow it; ``isinstance(err, PgDurableError)`` and
    ``issubclass(Cancelled, PgDurableError)`` are still true.
    """

    def __init__(self, message: str = "cancelled", *, instance_id: str = "", reason: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.instance_id = instance_id
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_cancelled, (self.message, self.instance_id, self.reason))

    def __str__(self) -> str:
        return self.message


def _rebuild_cancelled(message: str, instance_id: str, reason: Any) -> Cancelled:
    return Cancelled(message, instance_id=instance_id, reason=reason)


class InstanceCancelled(Cancelled, PgDurableError):
    """What a client's ``wait`` / ``handle.result`` raises for a cancelled instance.

    A ``pgd.Cancelled`` that is also an ordinary ``Exception``: outside the cancelled
    orchestration there is nothing to unwind, so ``except PgDurableError`` (or
    ``except Exception``) in a service or an activity catches it like any other error.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_instance_cancelled, (self.message, self.instance_id, self.reason))


def _rebuild_instance_cancelled(message: str, instance_id: str, reason: Any) -> InstanceCancelled:
    return InstanceCancelled(message, instance_id=instance_id, reason=reason)
