"""History event kinds (snake_case strings, part of the public contract) and their payloads.

Each event is one fact.  The ``data`` payload of each kind is documented next to
it; ``task_id`` numbers the command that scheduled a task within an execution.
The payload builders below are the one place error documents and the messages a
child sends its parent are shaped.

A cascaded stop says where it came from: the ``cancel_requested`` and
``orchestration_terminated`` events of a child stopped with its parent carry
``cascaded_from`` (the parent's id).  A fork's history starts with the source's
events (``seq <= at_seq``) followed by ``forked_from``.  ``orchestration_started``
names its execution, which seeds ``ctx.new_uuid()`` / ``ctx.random()``: a fork's copy
keeps its source's stream (a copy of a history from before this was recorded gets the
source's ``seed`` in ``forked_from`` instead).

Graph workflows (``df.start``, ``App.graph``) record no kinds of their own: each
node is an ordinary activity, timer, event wait or child, and a node's state
(pending, running, completed, failed, skipped) is derived by replaying the
history through the interpreter (``_graph/mermaid.py``), never stored.
"""

from __future__ import annotations

import traceback as _traceback
from typing import Any, Final

ORCHESTRATION_STARTED: Final = "orchestration_started"  # {name, input, instance_id, execution_id, parent?}
ACTIVITY_SCHEDULED: Final = "activity_scheduled"  # {task_id, name, input, retry?, key?, priority?}
ACTIVITY_COMPLETED: Final = "activity_completed"  # {task_id, result, attempts}
ACTIVITY_FAILED: Final = "activity_failed"  # {task_id, error, attempts}
TIMER_CREATED: Final = "timer_created"  # {task_id, fire_at}
TIMER_FIRED: Final = "timer_fired"  # {task_id}
EVENT_RECEIVED: Final = "event_received"  # {name, data}
SUB_ORCHESTRATION_SCHEDULED: Final = "sub_orchestration_scheduled"  # {task_id, name, instance_id, input}
SUB_ORCHESTRATION_COMPLETED: Final = "sub_orchestration_completed"  # {task_id, instance_id, result}
SUB_ORCHESTRATION_FAILED: Final = "sub_orchestration_failed"  # {task_id, instance_id, error}
CUSTOM_STATUS_SET: Final = "custom_status_set"  # {value}
VERSION_MARKER: Final = "version_marker"  # {change_id, version}
#: A graph node's state changed, as the graph interpreter saw it (graph workflows only):
#: ``{node, state, result?, error?, iteration?}``.  ``node`` is the node's path id (``n0.1``),
#: ``state`` is ``running``, ``completed`` or ``failed``; ``completed`` carries the node's
#: ``result`` (omitted when it is null or too large to record), ``failed`` its ``error``
#: message (a race's loser or a failed join's sibling: ``cancelled: ...``), and a loop records
#: ``running`` again with ``iteration`` (0, 1, ...) at the start of every iteration.
#: Recorded when it happens, never on replay; ``df.nodes``, ``df.explain`` and
#: ``python -m pgdurable_async graph`` read node states from these facts.
GRAPH_NODE: Final = "graph_node"
CANCEL_REQUESTED: Final = "cancel_requested"  # {reason, cascaded_from?}
CONTINUED_AS_NEW: Final = "continued_as_new"  # {input}
ORCHESTRATION_COMPLETED: Final = "orchestration_completed"  # {output}
ORCHESTRATION_FAILED: Final = "orchestration_failed"  # {error}
ORCHESTRATION_CANCELLED: Final = "orchestration_cancelled"  # {reason}
ORCHESTRATION_TERMINATED: Final = "orchestration_terminated"  # {reason, cascaded_from?}
VALUE_SET: Final = "value_set"  # {key, value}: ctx.set_value; read by Client.get_value / wait_value
FORKED_FROM: Final = "forked_from"  # {instance_id, at_seq, seed?}: Client.fork copied seq 1..at_seq of instance_id

#: A message, never an event: the first turn of a fork re-issues the open commands of the
#: copied history (work items, timers, children) and runs on.  Not in ALL_KINDS.
RESUME: Final = "resume"

#: Events that record a command the orchestration code issued (checked on replay).
COMMAND_KINDS: Final = frozenset({ACTIVITY_SCHEDULED, TIMER_CREATED, SUB_ORCHESTRATION_SCHEDULED})

#: Events that arrive as messages from outside the orchestration code.
MESSAGE_KINDS: Final = frozenset(
    {
        ORCHESTRATION_STARTED,
        ACTIVITY_COMPLETED,
        ACTIVITY_FAILED,
        TIMER_FIRED,
        EVENT_RECEIVED,
        SUB_ORCHESTRATION_COMPLETED,
        SUB_ORCHESTRATION_FAILED,
        CANCEL_REQUESTED,
    }
)

#: Events that end an execution.
TERMINAL_KINDS: Final = frozenset(
    {
        ORCHESTRATION_COMPLETED,
        ORCHESTRATION_FAILED,
        ORCHESTRATION_CANCELLED,
        ORCHESTRATION_TERMINATED,
        CONTINUED_AS_NEW,
    }
)

#: Facts the code records that are not commands (never checked on replay).
NOTE_KINDS: Final = frozenset({CUSTOM_STATUS_SET, VERSION_MARKER, GRAPH_NODE})

ALL_KINDS: Final = COMMAND_KINDS | MESSAGE_KINDS | TERMINAL_KINDS | NOTE_KINDS | {VALUE_SET, FORKED_FROM}


# -- payloads -------------------------------------------------------------------------
def error_info(type_: str, message: str, traceback: str = "", **extra: Any) -> dict[str, Any]:
    """An error document as history, instance rows and messages store it."""
    return {"type": type_, "message": message, "traceback": traceback, **extra}


def error_payload(exc: BaseException) -> dict[str, Any]:
    """The error document of an exception: its type name, message and traceback text."""
    tb = "".join(_traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the failure itself
        message = f"<str() of {type(exc).__name__} failed>"
    return error_info(type(exc).__name__, message, tb)


def cancelled_error(reason: Any) -> dict[str, Any]:
    """The error a cancelled instance records (``reason`` as given to ``cancel``)."""
    return {"type": "Cancelled", "message": "cancelled", "reason": reason}


def terminated_error(reason: str | None) -> dict[str, Any]:
    """The error a terminated instance records."""
    return {"type": "Terminated", "message": reason or "terminated"}


def child_completed(task_id: int | None, child_id: str, result: Any) -> dict[str, Any]:
    """Payload of the ``sub_orchestration_completed`` message a finished child sends its parent."""
    return {"task_id": task_id, "instance_id": child_id, "result": result}


def child_failed(task_id: int | None, child_id: str, error: Any) -> dict[str, Any]:
    """Payload of the ``sub_orchestration_failed`` message a failed (or stopped) child sends its parent."""
    return {"task_id": task_id, "instance_id": child_id, "error": error}


def activity_failed(task_id: int, error: dict[str, Any], attempts: int) -> dict[str, Any]:
    """Payload of an ``activity_failed`` message."""
    return {"task_id": task_id, "error": error, "attempts": attempts}
