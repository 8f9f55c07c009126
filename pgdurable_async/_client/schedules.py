"""The client's schedules and queues: create, list, pause, resume, trigger and delete schedules; queue depths.

Schedules are rows; any runtime that registers the orchestration fires them.  Each
firing starts one instance ``"{schedule_id}@{fire time, ISO 8601 UTC to the second}"``.
Every time (creation, resume) is taken from the database's clock.
"""

from __future__ import annotations

import builtins
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from .._base.errors import InvalidArgument, ScheduleNotFound
from .._base.names import check_id, is_reserved, name_of
from .._base.schedules import make_spec
from .._base.serde import encode
from .._base.types import QueueInfo, ScheduleInfo
from .._store import Connection, Database, queue_store, schedule_store

if TYPE_CHECKING:
    from .client import FiredInstance


class ScheduleMethods:
    """Mixed into :class:`Client` (which provides ``_ready``, ``_fired`` and ``max_payload_bytes``)."""

    max_payload_bytes: int

    async def _ready(self) -> Database:
        raise NotImplementedError

    def _fired(self, instance_id: str) -> FiredInstance:
        raise NotImplementedError

    async def create_schedule(
        self,
        schedule_id: str,
        orchestration: Any,
        input: Any = None,
        cron: str | None = None,
        every: timedelta | float | None = None,
        timezone: str = "UTC",
        overlap: str = "skip",
        catchup: str = "latest",
    ) -> ScheduleInfo:
        """Fire ``orchestration`` on a ``cron`` expression (in ``timezone``) or ``every`` interval.

        A cron schedule does not fire at creation; an interval one first fires ``every``
        after it.  ``overlap``: ``"skip"`` a firing while the previous one's instance runs,
        or ``"allow"`` it.  ``catchup`` after downtime: ``"latest"`` missed time, ``"all"``
        of them, or ``"none"``.  Raises ``ScheduleAlreadyExists``, ``InvalidArgument``.
        """
        check_id(schedule_id, "schedule_id")
        name = name_of(orchestration, kind="orchestration")
        if is_reserved(name):
            raise InvalidArgument(f"{name!r} is a built-in orchestration; it cannot be scheduled")
        spec = make_spec(cron=cron, every=every, timezone=timezone, overlap=overlap, catchup=catchup)
        body = encode(input, what=f"input of schedule {schedule_id!r}", limit=self.max_payload_bytes)
        db = await self._ready()

        async def create(conn: Connection) -> ScheduleInfo:
            now = await schedule_store.db_now(conn)
            await schedule_store.create(
                conn, schedule_id=schedule_id, orchestration=name, input_json=body, cron=spec.cron, every=spec.every,
                timezone=spec.timezone, overlap=overlap, catchup=catchup, next_fire_at=spec.first_fire(now),
            )
            return await _get(conn, schedule_id)

        return await db.run(create)

    async def list_schedules(self) -> builtins.list[ScheduleInfo]:
        """Every schedule, by id."""
        db = await self._ready()
        return await db.run(schedule_store.list_all, transaction=False)

    async def get_schedule(self, schedule_id: str) -> ScheduleInfo:
        """One schedule; raises ``ScheduleNotFound``."""
        check_id(schedule_id, "schedule_id")
        db = await self._ready()
        return await db.run(lambda conn: _get(conn, schedule_id), transaction=False)

    async def pause_schedule(self, schedule_id: str) -> None:
        """Stop firing (``trigger_schedule`` still works); raises ``ScheduleNotFound``."""
        check_id(schedule_id, "schedule_id")
        db = await self._ready()
        await db.run(lambda conn: schedule_store.set_paused(conn, schedule_id=schedule_id, paused=True,
                                                            next_fire_at=None))

    async def resume_schedule(self, schedule_id: str) -> None:
        """Fire again, from the next fire time after now (the paused times are not caught up)."""
        check_id(schedule_id, "schedule_id")
        db = await self._ready()

        async def resume(conn: Connection) -> None:
            info = await _get(conn, schedule_id)
            if not info.paused:
                return
            spec = make_spec(cron=info.cron, every=info.every, timezone=info.timezone, overlap=info.overlap,
                             catchup=info.catchup)
            now = await schedule_store.db_now(conn)
            after = info.next_fire_at
            if after <= now:  # on an interval's grid, or the cron's next time
                after = spec.next_after(now, anchor=after if spec.every is not None else None)
            await schedule_store.set_paused(conn, schedule_id=schedule_id, paused=False, next_fire_at=after)

        await db.run(resume)

    async def trigger_schedule(self, schedule_id: str) -> FiredInstance:
        """Start one firing now (id ``"{schedule_id}@{now}"``), paused or not; raises ``ScheduleNotFound``.

        Returns the instance id, a ``str`` that is also the instance's ``InstanceHandle``.
        """
        check_id(schedule_id, "schedule_id")
        db = await self._ready()
        instance_id = await db.run(lambda conn: schedule_store.trigger(conn, schedule_id=schedule_id))
        return self._fired(instance_id)

    async def delete_schedule(self, schedule_id: str) -> None:
        """Delete a schedule; the instances it started stay.  Raises ``ScheduleNotFound``."""
        check_id(schedule_id, "schedule_id")
        db = await self._ready()
        await db.run(lambda conn: schedule_store.delete(conn, schedule_id=schedule_id))

    async def list_queues(self) -> builtins.list[QueueInfo]:
        """Every queue some runtime declared, with its limits and depth (ready, running, delayed)."""
        db = await self._ready()
        return await db.run(queue_store.queue_depths, transaction=False)


async def _get(conn: Connection, schedule_id: str) -> ScheduleInfo:
    info = await schedule_store.get(conn, schedule_id=schedule_id)
    if info is None:
        raise ScheduleNotFound(schedule_id)
    return info
