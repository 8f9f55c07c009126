"""What every runtime loop shares: a guarded step, the steps in flight, wake-up deadlines."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

import anyio

log = logging.getLogger("pgdurable_async.runtime")


async def guarded(what: str, step: Callable[[], Awaitable[object]]) -> bool:
    """Run ``step()``; on an error log it, back off a little and return False.

    The loops then run again (the failure may be a database restart); they
    never crash the runtime.
    """
    try:
        await step()
        return True
    except anyio.get_cancelled_exc_class():
        raise
    except Exception as exc:  # noqa: BLE001
        log.warning("%s failed: %s", what, exc)
        await anyio.sleep(0.5)
        return False


class StepsInFlight:
    """Counts loop steps that are inside a transaction; :meth:`idle` waits for none."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = anyio.Event()
        self._idle.set()

    def __enter__(self) -> None:
        if self._count == 0:
            self._idle = anyio.Event()
        self._count += 1

    def __exit__(self, *exc: object) -> None:
        self._count -= 1
        if self._count == 0:
            self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()


def deadline(seconds: float | None) -> float | None:
    """A wake-up timeout for ``seconds`` from now (None: wait until woken), never zero."""
    if seconds is None:
        return None
    return max(0.001, seconds + 0.002) if math.isfinite(seconds) else None
