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

from ._app import ActivityContext, App, TransactionContext
from ._client import Client, InstanceHandle
from ._context import OrchestrationContext
from ._errors import (
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
    SchemaVersionError,
    SerializationError,
    SubOrchestrationError,
    TimeoutError,
    UnknownNameError,
)
from ._migrate import migrate
from ._runtime import Runtime
from ._tasks import Task
from ._types import HistoryEvent, InstanceState, RetryPolicy, Status

__version__ = "0.1.0"

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
    "RetryPolicy",
    "Runtime",
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
