"""The pure replay engine: an execution is fed history events and returns new ones.

No database, no driver, no asyncio or anyio in here (an import contract keeps it
so): :class:`Execution` runs an orchestration's coroutine over recorded and new
events, :class:`OrchestrationContext` is what the code awaits through, and the
tasks in ``tasks`` are what it awaits; ``replayer`` checks saved histories against
today's code.
"""

from .context import ContinueAsNew, OrchestrationContext
from .execution import Event, Execution, OrchestrationFn
from .replayer import SavedHistory, parse_history, replay_history
from .tasks import Task

__all__ = [
    "ContinueAsNew",
    "Event",
    "Execution",
    "OrchestrationContext",
    "OrchestrationFn",
    "SavedHistory",
    "Task",
    "parse_history",
    "replay_history",
]
