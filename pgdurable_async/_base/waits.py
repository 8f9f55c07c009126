"""What an unfinished instance waits on (``InstanceState.waiting_on``), from two exact sources.

* **Commands without a completion** in the current execution's history: an
  ``activity_scheduled`` with no ``activity_completed`` / ``activity_failed``, a
  ``timer_created`` with no ``timer_fired``, a ``sub_orchestration_scheduled`` with no
  ``sub_orchestration_completed`` / ``_failed``.  Since: when the command was recorded.
* **Event waits**: ``wait_for_event`` is no command, so history cannot say it; the
  engine knows its blocked waits after every turn (``Execution.event_waits``) and the
  turn stores them beside the instance row.  A timer that is only an event's timeout
  is never listed as a timer: it is that event's ``until`` while the wait lasts, and
  nothing once the event has come.

Each entry is ``{"kind", "name", "since"}`` plus ``"until"`` for timers (and events
with a timeout), ``"task_id"`` for commands, ``"instance_id"`` for children and
``"timer_task_id"`` (the history's timer of the timeout) for events with a timeout.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from . import events as ev

_KIND = {
    ev.ACTIVITY_SCHEDULED: "activity",
    ev.TIMER_CREATED: "timer",
    ev.SUB_ORCHESTRATION_SCHEDULED: "child",
}


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return None
    return None


def waiting_on(open_tasks: Iterable[Mapping[str, Any]] | None,
               event_waits: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The ``waiting_on`` list, oldest first, from the open commands (``kind, task_id, name,
    instance_id, fire_at, since``) and the last turn's ``Execution.event_waits()``."""
    marker = event_waits if isinstance(event_waits, Mapping) else {}
    events = [dict(w) for w in marker.get("events") or () if isinstance(w, Mapping)]
    timeout_timers = {w.get("timer") for w in events} | set(marker.get("timers") or ())
    found: list[dict[str, Any]] = []
    for task in open_tasks or ():
        kind = _KIND.get(str(task.get("kind")))
        task_id = task.get("task_id")
        if kind is None or (kind == "timer" and task_id in timeout_timers):
            continue
        entry: dict[str, Any] = {"kind": kind, "name": "", "since": _time(task.get("since")), "task_id": task_id}
        if kind == "timer":
            entry["name"] = f"timer #{task_id}"
            entry["until"] = _time(task.get("fire_at"))
        else:
            entry["name"] = str(task.get("name") or "")
            if kind == "child":
                entry["instance_id"] = task.get("instance_id")
        found.append(entry)
    for wait in events:
        entry = {"kind": "event", "name": str(wait.get("name") or ""), "since": _time(wait.get("since"))}
        if wait.get("until") is not None:
            entry["until"] = _time(wait.get("until"))
        if isinstance(wait.get("timer"), int):
            entry["timer_task_id"] = wait["timer"]
        found.append(entry)
    found.sort(key=_order)
    return found


def _order(entry: dict[str, Any]) -> tuple[float, float]:
    since, task_id = entry["since"], entry.get("task_id")
    return (since.timestamp() if since is not None else float("inf"),
            task_id if isinstance(task_id, int) else float("inf"))
