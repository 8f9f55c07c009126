"""Activities: retries, failures, transactional exactly-once, leases, unknown names."""

from __future__ import annotations

import asyncio

import anyio
import asyncpg
import pytest

import pgdurable_async as pgd

app = pgd.App()
attempts: dict[str, list[int]] = {}


@app.activity(retry=pgd.RetryPolicy(max_attempts=3, initial_interval=0.05, backoff=2.0))
async def flaky(ctx: pgd.ActivityContext, key: str) -> int:
    attempts.setdefault(key, []).append(ctx.attempt)
    if ctx.attempt < 3:
        raise ConnectionError(f"try {ctx.attempt}")
    return ctx.attempt


@app.activity(name="always-fails", retry=pgd.RetryPolicy(max_attempts=2, initial_interval=0.01))
async def always_fails(ctx: pgd.ActivityContext, _: object) -> None:
    raise KeyError("missing thing")


@app.activity(retry=pgd.RetryPolicy(max_attempts=5, non_retryable=("PermissionError",)))
async def forbidden(ctx: pgd.ActivityContext, _: object) -> None:
    raise PermissionError("no")


@app.activity(timeout=0.2, retry=pgd.RetryPolicy(max_attempts=2, initial_interval=0.01))
async def hangs(ctx: pgd.ActivityContext, _: object) -> None:
    await anyio.sleep(30)


class BrokenStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("str() fails")


@app.activity(retry=pgd.RetryPolicy(max_attempts=1))
async def raises(ctx: pgd.ActivityContext, kind: str) -> None:
    """Raises what a buggy activity (or a library it calls) might let out."""
    if kind == "SystemExit":
        raise SystemExit(3)
    if kind == "Cancelled":
        raise pgd.Cancelled("an instance this activity waited on was cancelled")
    if kind == "CancelledError":
        raise asyncio.CancelledError()
    raise BrokenStr()


@app.activity
async def unencodable(ctx: pgd.ActivityContext, _: object) -> object:
    return {1, 2}


@app.transaction
async def bump(ctx: pgd.TransactionContext, key: str) -> int:
    assert ctx.conn is not None
    await ctx.conn.execute(
        "INSERT INTO public.counters (key, n) VALUES ($1, 1) ON CONFLICT (key) DO UPDATE SET n = counters.n + 1", key
    )
    return int(await ctx.conn.fetchval("SELECT n FROM public.counters WHERE key = $1", key))


@app.transaction(retry=pgd.RetryPolicy(max_attempts=2, initial_interval=0.01))
async def bump_then_fail(ctx: pgd.TransactionContext, key: str) -> None:
    assert ctx.conn is not None
    await ctx.conn.execute("INSERT INTO public.counters (key, n) VALUES ($1, 100)", key)
    raise RuntimeError("rolled back")


@app.transaction
async def mark_unqualified(ctx: pgd.TransactionContext, doc_id: int) -> str:
    """Unqualified names resolve as in the role's own sessions, not in the pgdurable schema."""
    assert ctx.conn is not None
    await ctx.conn.execute("UPDATE docs SET done = true WHERE id = $1", doc_id)
    return str(await ctx.conn.fetchval("SHOW search_path"))


@app.orchestration
async def call(ctx: pgd.OrchestrationContext, spec: list[object]) -> object:
    name, arg = spec
    try:
        return await ctx.call_activity(str(name), arg)
    except pgd.ActivityError as exc:
        return {"type": exc.error_type, "message": exc.error_message, "tb": exc.traceback, "attempts": exc.attempts}


@app.orchestration
async def many_bumps(ctx: pgd.OrchestrationContext, n: int) -> list[int]:
    return await ctx.all([ctx.call_activity(bump, f"k{i % 3}") for i in range(n)], limit=4)


async def _setup_counters(dsn: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn)
    await conn.execute("CREATE TABLE IF NOT EXISTS public.counters (key text PRIMARY KEY, n int NOT NULL)")
    return conn


async def test_retries_then_success(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        handle = await runtime.client.start(call, ["flaky", "r1"])
        assert await handle.result(timeout=30) == 3
        assert attempts["r1"] == [1, 2, 3]
        kinds = [e.kind for e in await handle.history()]
        assert kinds.count("activity_scheduled") == 1 and kinds.count("activity_completed") == 1


async def test_exhausted_retries_surface_as_activity_error(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        out = await (await runtime.client.start(call, ["always-fails", None])).result(timeout=30)
        assert out["type"] == "KeyError" and "missing thing" in out["message"]
        assert "Traceback" in out["tb"] and "always_fails" in out["tb"]
        assert out["attempts"] == 2
        out = await (await runtime.client.start(call, ["forbidden", None])).result(timeout=30)
        assert out["type"] == "PermissionError" and out["attempts"] == 1
        out = await (await runtime.client.start(call, ["hangs", None])).result(timeout=30)
        assert out["type"] == "TimeoutError" and out["attempts"] == 2
        assert out["message"] == "the attempt ran longer than its timeout of 0.2 s"
        out = await (await runtime.client.start(call, ["unencodable", None])).result(timeout=30)
        assert out["type"] == "SerializationError"
        out = await (await runtime.client.start(call, ["no_such_activity", None])).result(timeout=30)
        assert out["type"] == "UnknownNameError"


async def test_transactional_activity_commits_exactly_once(dsn: str) -> None:
    conn = await _setup_counters(dsn)
    try:
        async with pgd.Runtime(app, dsn) as runtime:
            result = await (await runtime.client.start(many_bumps, 30)).result(timeout=60)
            assert sorted(result) == sorted(list(range(1, 11)) * 3)
            out = await (await runtime.client.start(call, ["bump_then_fail", "rb"])).result(timeout=30)
            assert out["type"] == "RuntimeError" and out["attempts"] == 2
        rows = dict(await conn.fetch("SELECT key, n FROM public.counters"))
        assert rows == {"k0": 10, "k1": 10, "k2": 10}
    finally:
        await conn.close()


async def test_late_result_of_lost_lease_is_ignored(dsn: str) -> None:
    """An item re-claimed by someone else cannot be acked by its first owner."""
    async with pgd.Runtime(app, dsn, max_concurrency=4) as runtime:
        worker = runtime.activities
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("CREATE TABLE IF NOT EXISTS public.counters (key text PRIMARY KEY, n int NOT NULL)")
            # Park an item: start an instance whose activity nobody here runs quickly.
            handle = await runtime.client.start(call, ["flaky", "lease"])
            assert await handle.result(timeout=30) == 3
            row = await conn.fetchrow(
                "INSERT INTO pgdurable.work_queue (instance_id, execution_id, task_id, orchestration, name, input,"
                " lease_token, visible_at) VALUES ($1, 1, 99, 'call', 'flaky', '\"x\"', gen_random_uuid(),"
                " now() + interval '1 hour') RETURNING id, lease_token",
                handle.instance_id,
            )
            from pgdurable_async._store.records import Outcome, WorkItem

            stale = WorkItem(row["id"], handle.instance_id, 1, 99, "flaky", "x", None, 1, row["lease_token"])
            await conn.execute(
                "UPDATE pgdurable.work_queue SET lease_token = gen_random_uuid() WHERE id = $1", row["id"]
            )
            worker._outcomes.append(Outcome(stale, "activity_completed", '{"task_id":99,"result":1}'))
            await worker.flush()
            assert await conn.fetchval("SELECT count(*) FROM pgdurable.work_queue WHERE id = $1", row["id"]) == 1
            assert await conn.fetchval("SELECT count(*) FROM pgdurable.orchestrator_queue") == 0
        finally:
            await conn.close()


async def test_history_is_append_only(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        handle = await runtime.client.start(call, ["flaky", "h"])
        await handle.result(timeout=30)
    conn = await asyncpg.connect(dsn)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute("UPDATE pgdurable.history SET payload = '{}'")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute("TRUNCATE pgdurable.history")
        await conn.execute(
            "INSERT INTO pgdurable.instances (instance_id, name, status) VALUES ('live', 'call', 'running')"
        )
        await conn.execute(
            "INSERT INTO pgdurable.history (instance_id, execution_id, seq, event_type) VALUES ('live', 1, 1, 'x')"
        )
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="still exists"):
            await conn.execute("DELETE FROM pgdurable.history WHERE instance_id = 'live'")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="only finished instances"):
            await conn.execute("DELETE FROM pgdurable.instances WHERE instance_id = 'live'")
        # A finished instance loses no single event either: only purge removes it whole.
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="still exists"):
            await conn.execute("DELETE FROM pgdurable.history WHERE instance_id = $1 AND seq = 1", handle.instance_id)
        count = "SELECT count(*) FROM pgdurable.history WHERE instance_id = $1"
        assert await conn.fetchval(count, handle.instance_id) > 1
        async with pgd.Client(dsn) as client:
            await client.purge(handle.instance_id)
        assert await conn.fetchval(count, handle.instance_id) == 0
        assert await conn.fetchval(count, "live") == 1
    finally:
        await conn.close()


async def test_transactional_sql_uses_the_roles_search_path(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE public.docs (id int PRIMARY KEY, done bool NOT NULL DEFAULT false)")
        await conn.execute("INSERT INTO public.docs (id) VALUES (1), (2)")
        async with pgd.Runtime(app, dsn) as runtime:
            handle = await runtime.client.start(call, ["mark_unqualified", 1])
            assert await handle.result(timeout=30) == '"$user", public'
        # A database-level search_path is honoured too (new sessions pick it up).
        database = await conn.fetchval("SELECT current_database()")
        await conn.execute("CREATE SCHEMA app")
        await conn.execute("CREATE TABLE app.docs (id int PRIMARY KEY, done bool NOT NULL DEFAULT false)")
        await conn.execute("INSERT INTO app.docs (id) VALUES (2)")
        await conn.execute(f'ALTER DATABASE "{database}" SET search_path = app, public')
        async with pgd.Runtime(app, dsn) as runtime:
            handle = await runtime.client.start(call, ["mark_unqualified", 2])
            assert await handle.result(timeout=30) == "app, public"
            assert await runtime.client.status(handle.instance_id)  # our own queries still find our tables
        assert await conn.fetch("SELECT id FROM public.docs WHERE done ORDER BY id") == [(1,)]
        assert await conn.fetch("SELECT id FROM app.docs WHERE done") == [(2,)]
    finally:
        await conn.close()


async def test_base_exceptions_from_an_activity_are_its_failures_not_the_runtimes(dsn: str) -> None:
    """SystemExit, pgd.Cancelled, a stray CancelledError or a broken __str__ fail the activity only."""
    async with pgd.Runtime(app, dsn) as runtime:
        for kind, message in [
            ("SystemExit", "3"),
            ("Cancelled", "an instance this activity waited on was cancelled"),
            ("CancelledError", ""),
            ("BrokenStr", "<str() of BrokenStr failed>"),
        ]:
            handle = await runtime.client.start(call, ["raises", kind])
            out = await handle.result(timeout=30)
            assert (out["type"], out["message"], out["attempts"]) == (kind, message, 1)
        assert await (await runtime.client.start(call, ["flaky", "after"])).result(timeout=30) == 3
