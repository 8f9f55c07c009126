"""Where a history comes from: whose uuid/random stream it holds, and whose children it names.

A fork's history is a copy of another instance's: its ``orchestration_started`` (or,
for copies of older histories, its ``forked_from``) names the source's execution, and
its generated child ids name the source.  Replay accepts both as its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._base import events as ev

if TYPE_CHECKING:
    from .execution import Event


def seed_of(event: Event) -> str | None:
    """``<instance>/<execution>`` recorded by a start (or, for copies of older histories, a fork)."""
    data = event.data
    if event.kind == ev.FORKED_FROM:
        seed = data.get("seed")
        return seed if isinstance(seed, str) and seed else None
    instance_id, execution_id = data.get("instance_id"), data.get("execution_id")
    if isinstance(instance_id, str) and isinstance(execution_id, int):
        return f"{instance_id}/{execution_id}"
    return None


def generated_child_id(recorded: Event, task_id: int) -> bool:
    """Whether a recorded child id has the generated shape ``<instance>:<execution>:<task_id>``."""
    if recorded.kind != ev.SUB_ORCHESTRATION_SCHEDULED:
        return False
    parts = str(recorded.data.get("instance_id", "")).rsplit(":", 2)
    return len(parts) == 3 and parts[1].isdigit() and parts[2] == str(task_id)
