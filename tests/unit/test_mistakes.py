"""The usual mistakes in an orchestration fail it with a message that names the fix (no database).

The tests of sleeps and I/O run inside an event loop, as a worker's turns do: there a
sleep yields the loop's future to the engine, which refuses it.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import anyio

import pgdurable_async as pgd
from pgdurable_async._base import events as ev

from .test_engine import simulate

app = pgd.App()


@app.activity(name="fetch")
async def fetch(ctx: pgd.ActivityContext, url: str) -> str:
    await asyncio.Event().wait()  # stands for real I/O (an HTTP call)
    return url


@app.activity(name="attempts")
async def attempts(ctx: pgd.ActivityContext, _: Any) -> int:
    return ctx.attempt


def _error(fn: Any) -> dict[str, Any]:
    sim = simulate(fn)
    assert sim.outcome.kind == ev.ORCHESTRATION_FAILED
    error: dict[str, Any] = sim.outcome.data["error"]
    return error


async def test_asyncio_sleep_says_use_ctx_sleep() -> None:  # a worker's loop runs: sleeps yield to it
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> None:
        await asyncio.sleep(0.01)

    error = _error(orch)
    assert error["type"] == "NonDeterminismError"
    assert "not asyncio.sleep: use `await ctx.sleep(timedelta(seconds=...))`" in error["message"]


async def test_anyio_sleep_says_use_ctx_sleep_too() -> None:  # a worker's loop runs: sleeps yield to it
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> None:
        await anyio.sleep(0.01)

    assert "use `await ctx.sleep(" in _error(orch)["message"]


async def test_an_activity_called_directly_is_named() -> None:  # a worker's loop runs: sleeps yield to it
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> str:
        return await fetch(ctx, "https://example.invalid")  # type: ignore[arg-type]

    message = _error(orch)["message"]
    assert "fetch(), called directly with the orchestration's ctx" in message
    assert "`await ctx.call_activity(fetch, input)`" in message


def test_an_activity_reading_its_attempt_with_the_wrong_ctx_is_named() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> int:
        return await attempts(ctx, None)  # type: ignore[arg-type]

    error = _error(orch)
    assert error["type"] == "AttributeError"
    assert "an activity called directly" in error["message"] and "ctx.call_activity" in error["message"]


def test_a_helper_that_awaits_ctx_tasks_is_fine() -> None:
    async def helper(ctx: pgd.OrchestrationContext, x: int) -> int:
        await ctx.sleep(timedelta(seconds=1))
        return int(await ctx.call_activity("double", x))

    async def orch(ctx: pgd.OrchestrationContext, _: None) -> int:
        return await helper(ctx, 2)

    sim = simulate(orch)
    assert sim.outcome.kind == ev.ORCHESTRATION_COMPLETED and sim.outcome.data["output"] == 4


def test_a_returned_task_asks_did_you_forget_await() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> Any:
        return ctx.call_activity("double", 1)

    error = _error(orch)
    assert error["type"] == "TypeError"
    assert "returned a ActivityTask 'double' instead of its result: did you forget await?" in error["message"]


def test_a_returned_list_of_tasks_asks_too() -> None:
    async def orch(ctx: pgd.OrchestrationContext, _: None) -> Any:
        return [ctx.call_activity("double", i) for i in range(3)]

    assert "did you forget await?" in _error(orch)["message"]


def test_a_returned_coroutine_asks_too() -> None:
    async def compute() -> int:
        return 1

    async def orch(ctx: pgd.OrchestrationContext, _: None) -> Any:
        return compute()

    assert "returned a coroutine" in _error(orch)["message"]
