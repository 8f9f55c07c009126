"""pgdurable_async: durable workflows for async Python, with PostgreSQL as the only moving part.

::

    import pgdurable_async as pgd

    app = pgd.App()

    @app.activity
    async def greet(ctx: pgd.ActivityContext, name: str) -> str:
        return f"hello {name}"

    @app.orchestration
    async def hello(ctx: pgd.OrchestrationContext, names: list[str]) -> list[str]:
        return await ctx.all([ctx.call_activity(greet, n) for n in names])

    async with pgd.Runtime(app, dsn) as runtime:
        handle = await runtime.client.start(hello, ["a", "b"])
        print(await handle.result(timeout=30))
"""

from ._app import App
from ._base.definitions import ActivityContext, TransactionContext
from ._base.errors import (
    ActivityError,
    Cancelled,
    ConfigurationError,
    DatabaseError,
    InstanceAlreadyExists,
    InstanceFailed,
    InstanceNotFound,
    InvalidArgument,
    NonDeterminismError,
    PgDurableError,
    ScheduleAlreadyExists,
    ScheduleNotFound,
    SchemaVersionError,
    SerializationError,
    SubOrchestrationError,
    TimeoutError,
    UnknownNameError,
)
from ._base.types import HistoryEvent, InstanceState, Queue, RateLimit, RetryPolicy, ScheduleInfo, Status
from ._base.version import __version__
from ._client import Client, InstanceHandle
from ._engine import OrchestrationContext, Task
from ._runtime import Runtime
from ._store.migrations import migrate

__all__ = [
    "ActivityContext",
    "ActivityError",
    "App",
    "Cancelled",
    "Client",
    "ConfigurationError",
    "DatabaseError",
    "HistoryEvent",
    "InstanceAlreadyExists",
    "InstanceFailed",
    "InstanceHandle",
    "InstanceNotFound",
    "InstanceState",
    "InvalidArgument",
    "NonDeterminismError",
    "OrchestrationContext",
    "PgDurableError",
    "Queue",
    "RateLimit",
    "RetryPolicy",
    "Runtime",
    "ScheduleAlreadyExists",
    "ScheduleInfo",
    "ScheduleNotFound",
    "SchemaVersionError",
    "SerializationError",
    "Status",
    "SubOrchestrationError",
    "Task",
    "TimeoutError",
    "TransactionContext",
    "UnknownNameError",
    "__version__",
    "migrate",
]

# Public names look public: reprs and tracebacks show pgdurable_async.InstanceFailed,
# not the private module that defines it.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("pgdurable_async."):
        _obj.__module__ = __name__
del _name, _obj
