"""Wakeup: level-triggered, no lost signals, an event only while someone waits."""

from __future__ import annotations

import anyio
import pytest

from pgdurable_async._runtime.wakeup import Wakeup


async def test_a_signal_before_the_wait_is_not_lost() -> None:
    wakeup = Wakeup()
    seen = wakeup.generation
    wakeup.set()  # nobody waits yet
    assert await wakeup.wait(seen, timeout=0) is True


async def test_wait_times_out_without_a_signal() -> None:
    wakeup = Wakeup()
    assert await wakeup.wait(wakeup.generation, timeout=0) is False
    assert await wakeup.wait(wakeup.generation, timeout=0.01) is False


@pytest.mark.parametrize("timeout", [None, 30.0])
async def test_every_waiter_wakes_on_one_set(timeout: float | None) -> None:
    wakeup = Wakeup()
    woken: list[int] = []

    async def waiter(n: int) -> None:
        if await wakeup.wait(wakeup.generation, timeout):
            woken.append(n)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for n in range(3):
                tg.start_soon(waiter, n)
            await anyio.wait_all_tasks_blocked()
            wakeup.set()
    assert sorted(woken) == [0, 1, 2]


async def test_sets_without_waiters_make_no_event() -> None:
    wakeup = Wakeup()
    for _ in range(100):
        wakeup.set()
    assert wakeup.generation == 100 and wakeup._event is None  # the per-activity call stays cheap
