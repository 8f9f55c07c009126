"""The waits history cannot show: ``wait_for_event`` calls and the timers that only time them out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .execution import Execution


def event_waits(execution: Execution) -> dict[str, Any] | None:
    """What history cannot say: the ``wait_for_event`` calls blocked now, and the timers
    that are only event timeouts (the user never asked for them), or None for neither.

    ``{"events": [{name, since, until?, timer?}], "timers": [task ids]}``; a turn stores it
    beside the instance row for ``InstanceState.waiting_on``.
    """
    if execution.stopped:
        return None
    execution._timeout_timers = [t for t in execution._timeout_timers if not t.done()]
    events = []
    for name, waiters in execution._waiters.items():
        for task in waiters:
            if task.done():
                continue
            wait: dict[str, Any] = {"name": name, "since": (task.since or execution.now).isoformat()}
            if task.timeout_at is not None:
                wait["until"] = task.timeout_at.isoformat()
            if task.timer is not None and task.timer.task_id is not None:
                wait["timer"] = task.timer.task_id
            events.append(wait)
    timers = [t.task_id for t in execution._timeout_timers if t.task_id is not None]
    return {"events": events, "timers": timers} if events or timers else None
