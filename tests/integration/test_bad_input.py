"""Hostile and malformed input: each is a typed error (or a one-line CLI exit) and writes nothing."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import orjson
import pytest

import pgdurable_async as pgd
from pgdurable_async._store.migrations import latest_version
from tests.conftest import PgServer

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]
TABLES = ("instances", "history", "orchestrator_queue", "work_queue", "timers", "registry", "schema_migrations")
INJECTION = "x'); DROP TABLE pgdurable.history; --"
ACTIVITY_INJECTION = 'a"; DELETE FROM pgdurable.work_queue; --'
HOSTILE = [
    "it's",
    'say "hi"',
    "a;b",
    INJECTION,
    'x"; DROP SCHEMA pgdurable CASCADE; --',
    "$1",
    "$1::text); DELETE FROM pgdurable.instances; --",
    "$$; SELECT pg_sleep(10); $$",
    "back\\slash\\",
    "\\x00 \\u0000",
    "%s %d {0} _%",
    "ünïcødé ✓ 日本語 🚀",
    "\u202eright-to-left",
    "tab\tnew\nline",
    " ",
    "é" * 200,  # exactly the 200-character limit
]

app = pgd.App()


@app.activity
async def inc(ctx: pgd.ActivityContext, n: int) -> int:
    return n + 1


@app.activity
async def give(ctx: pgd.ActivityContext, what: str) -> object:
    return object() if what == "object" else "x" * 4000


@app.activity(name=ACTIVITY_INJECTION)
async def injected_activity(ctx: pgd.ActivityContext, value: object) -> object:
    return value


@app.orchestration
async def waits(ctx: pgd.OrchestrationContext, name: str | None) -> object:
    """Returns the data of the first event called ``name`` (default ``go``)."""
    return await ctx.wait_for_event(name or "go")


@app.orchestration
async def gated(ctx: pgd.OrchestrationContext, _: object) -> list[object]:
    """The orchestration whose histories the malformed-history tests forge."""
    first = await ctx.call_activity(inc, 0)
    return [first, await ctx.wait_for_event("go")]


@app.orchestration
async def chain(ctx: pgd.OrchestrationContext, n: int) -> int:
    value = 0
    for _ in range(n):
        value = await ctx.call_activity(inc, value)
    return value


@app.orchestration
async def misbehaves(ctx: pgd.OrchestrationContext, how: str) -> object:
    """Hands the runtime a value it cannot store, in the way ``how`` names."""
    if how == "activity-input":
        return await ctx.call_activity(inc, object())
    if how == "big-activity-input":
        return await ctx.call_activity(inc, "x" * 4000)
    if how == "custom-status":
        ctx.set_custom_status({1, 2})
    if how == "output":
        return object()
    if how == "big-output":
        return "x" * 4000
    if how in ("object", "big"):
        try:
            return await ctx.call_activity(give, how)
        except pgd.ActivityError as exc:
            return {"error_type": exc.error_type, "message": exc.error_message}
    return None


@app.orchestration
async def calls(ctx: pgd.OrchestrationContext, args: list[Any]) -> object:
    """``[kind, name, catch]``: call an activity or child by name, optionally catching its failure."""
    kind, name, catch = args
    task = ctx.call_activity(name, 1) if kind == "activity" else ctx.call_orchestration(name, 1)
    if not catch:
        return await task
    try:
        return await task
    except (pgd.ActivityError, pgd.SubOrchestrationError) as exc:
        error = exc.error if isinstance(exc, pgd.SubOrchestrationError) else {"type": exc.error_type}
        return {"caught": type(exc).__name__, "type": error["type"]}


@app.orchestration
async def kid(ctx: pgd.OrchestrationContext, value: object) -> object:
    return value


@app.orchestration
async def parent(ctx: pgd.OrchestrationContext, child_id: str) -> object:
    return await ctx.call_orchestration(kid, child_id, instance_id=child_id)


@app.orchestration
async def produces(ctx: pgd.OrchestrationContext, how: str) -> object:
    """Issues a command whose name or id cannot be stored; returns the typed error if one is raised."""
    try:
        if how == "activity-name-surrogate":
            return await ctx.call_activity("act\ud800", 1)
        if how == "version-id-surrogate":
            return ctx.version("change\ud800", latest=2)
        if how == "child-id-surrogate":
            return await ctx.call_orchestration(kid, 1, instance_id="kid\ud800")
        if how == "child-id-10kB":
            return await ctx.call_orchestration(kid, 1, instance_id="k" * 10_000)
    except pgd.PgDurableError as exc:
        return type(exc).__name__
    return None


@app.orchestration(name=INJECTION)
async def injected_orchestration(ctx: pgd.OrchestrationContext, value: object) -> object:
    return await ctx.call_activity(ACTIVITY_INJECTION, value)


# -- helpers ------------------------------------------------------------------------------
async def _sql(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(query, *args)
        return rows
    finally:
        await conn.close()


async def _counts(dsn: str) -> dict[str, int]:
    """Row counts of every pgdurable table."""
    parts = [f"(SELECT count(*) FROM pgdurable.{t}) AS {t}" for t in TABLES]
    row = (await _sql(dsn, "SELECT " + ", ".join(parts)))[0]
    return dict(row)


@contextlib.asynccontextmanager
async def _nothing_written(dsn: str) -> AsyncIterator[None]:
    before = await _counts(dsn)
    yield
    assert await _counts(dsn) == before, "a rejected call wrote something"


async def _parked(runtime: pgd.Runtime, instance_id: str) -> None:
    """Start ``waits`` and return once its first turn is written (the database is then quiet)."""
    await runtime.client.start(waits, None, instance_id=instance_id)
    with anyio.fail_after(20):
        while (await runtime.client.status(instance_id)).status is not pgd.Status.RUNNING:
            await anyio.sleep(0.02)


async def _cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PGDURABLE_DSN"}
    cmd = [sys.executable, "-m", "pgdurable_async", *args]
    with anyio.fail_after(timeout):
        done = await anyio.run_process(cmd, check=False, cwd=REPO, env=env)
    return subprocess.CompletedProcess(cmd, done.returncode, done.stdout.decode(), done.stderr.decode())


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


# -- unserializable and oversized payloads ----------------------------------------------------
async def test_unserializable_payloads_are_refused_before_anything_is_written(dsn: str) -> None:
    circular: list[Any] = []
    circular.append(circular)
    async with pgd.Runtime(app, dsn) as runtime:
        client = runtime.client
        await _parked(runtime, "target")
        async with _nothing_written(dsn):
            for bad in (object(), b"bytes", {1, 2}, circular, 2**70, {"nested": [object()]}, "nul\x00inside"):
                with pytest.raises(pgd.SerializationError):
                    await client.start(waits, bad, instance_id="never")
                with pytest.raises(pgd.SerializationError):
                    await client.raise_event("target", "go", bad)
            with pytest.raises(pgd.SerializationError, match="cancel reason"):
                await client.cancel("target", reason=object())  # type: ignore[arg-type]
        assert (await client.status("target")).status is pgd.Status.RUNNING


async def test_non_finite_floats_are_refused(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        await _parked(runtime, "target")
        async with _nothing_written(dsn):
            for bad in (math.nan, math.inf, [1.0, -math.inf]):
                with pytest.raises(pgd.SerializationError):
                    await runtime.client.start(waits, bad)
                with pytest.raises(pgd.SerializationError):
                    await runtime.client.raise_event("target", "go", bad)


async def test_unstorable_values_inside_an_orchestration_fail_it_with_serialization_error(dsn: str) -> None:
    async with pgd.Runtime(app, dsn, max_payload_bytes=2048) as runtime:
        client = runtime.client
        handles = {how: await client.start(misbehaves, how, instance_id=how) for how in (
            "activity-input", "big-activity-input", "custom-status", "output", "big-output", "object", "big")}
        for how in ("activity-input", "big-activity-input", "custom-status", "output", "big-output"):
            with pytest.raises(pgd.InstanceFailed) as info:
                await handles[how].result(timeout=30)
            assert info.value.error["type"] == "SerializationError", (how, info.value.error)
        assert (await handles["object"].result(timeout=30))["error_type"] == "SerializationError"
        big = await handles["big"].result(timeout=30)
        assert big["error_type"] == "SerializationError" and "2048-byte payload limit" in big["message"]
        for how in ("activity-input", "big-activity-input"):
            kinds = [e.kind for e in await client.history(how)]
            assert kinds == ["orchestration_started", "orchestration_failed"], kinds
    assert await _sql(dsn, "SELECT 1 FROM pgdurable.work_queue") == []


async def test_oversized_payloads_are_refused_at_the_client(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        await _parked(runtime, "target")
        async with pgd.Client(dsn, max_payload_bytes=1024) as client:
            async with _nothing_written(dsn):
                with pytest.raises(pgd.SerializationError) as info:
                    await client.start(waits, "x" * 2000, instance_id="too-big")
                assert info.value.size > 1024 and info.value.limit == 1024  # type: ignore[attr-defined]
                with pytest.raises(pgd.SerializationError, match="1024-byte payload limit"):
                    await client.raise_event("target", "go", {"blob": "x" * 2000})
            await client.raise_event("target", "go", "y" * 900)  # under the limit: delivered
        assert await runtime.client.wait("target", timeout=30) == "y" * 900


async def test_reason_strings_are_checked_like_payloads(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        await _parked(runtime, "target")
        async with pgd.Client(dsn, max_payload_bytes=1024) as client:
            async with _nothing_written(dsn):
                with pytest.raises(pgd.SerializationError):
                    await client.cancel("target", reason="r" * 2000)
                with pytest.raises(pgd.SerializationError):
                    await client.terminate("target", reason="r" * 2000)
                with pytest.raises((pgd.SerializationError, pgd.InvalidArgument)):
                    await client.terminate("target", reason="nul\x00")
                with pytest.raises((pgd.SerializationError, pgd.InvalidArgument)):
                    await client.terminate("target", reason=object())  # type: ignore[arg-type]


# -- unknown names ----------------------------------------------------------------------------
async def test_unknown_orchestration_name_at_start(dsn: str) -> None:
    async def unregistered(ctx: pgd.OrchestrationContext, _: object) -> None: ...

    async with pgd.Runtime(app, dsn):
        pass  # registers this app's names
    async with pgd.Client(dsn) as client, _nothing_written(dsn):
        with pytest.raises(pgd.UnknownNameError) as info:
            await client.start("no_such_orchestration", 1, instance_id="x")
        assert info.value.kind == "orchestration" and info.value.name == "no_such_orchestration"  # type: ignore[attr-defined]
        with pytest.raises(pgd.UnknownNameError):
            await client.start(unregistered, 1)
        with pytest.raises(pgd.UnknownNameError):
            await client.start("inc", 1)  # an activity's name is not an orchestration's
        with pytest.raises(pgd.InvalidArgument):
            await client.start("wai\x00ts", 1)  # not even a possible name
        with pytest.raises(pgd.UnknownNameError):
            await client.start(INJECTION + " ", 1)


async def test_unknown_activity_and_child_names_fail_the_call(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        client = runtime.client
        uncaught = await client.start(calls, ["activity", "no_such_activity", False], instance_id="uncaught")
        caught = await client.start(calls, ["activity", "no_such_activity", True], instance_id="caught")
        child = await client.start(calls, ["orchestration", "no_such_child", True], instance_id="child")
        with pytest.raises(pgd.InstanceFailed) as info:
            await uncaught.result(timeout=30)
        assert info.value.error["type"] == "ActivityError"
        assert "UnknownNameError" in info.value.error["message"]
        assert await caught.result(timeout=30) == {"caught": "ActivityError", "type": "UnknownNameError"}
        assert await child.result(timeout=30) == {"caught": "SubOrchestrationError", "type": "UnknownNameError"}
        kinds = [e.kind for e in await client.history("caught")]
        assert kinds[1:3] == ["activity_scheduled", "activity_failed"]
    assert await _sql(dsn, "SELECT 1 FROM pgdurable.work_queue") == []
    ids = {r["instance_id"] for r in await _sql(dsn, "SELECT instance_id FROM pgdurable.instances")}
    assert ids == {"uncaught", "caught", "child"}, "no child instance was created for an unknown name"


async def test_events_nobody_waits_for_are_buffered_harmlessly(dsn: str) -> None:
    async with pgd.Runtime(app, dsn) as runtime:
        client = runtime.client
        await _parked(runtime, "listener")
        for name in ("nobody-waits", "GO", "go ", "go\n"):
            await client.raise_event("listener", name, name)
        assert (await client.status("listener")).status is pgd.Status.RUNNING
        await client.raise_event("listener", "go", "the one")
        assert await client.wait("listener", timeout=30) == "the one"
        received = [e.data["name"] for e in await client.history("listener") if e.kind == "event_received"]
        assert received == ["nobody-waits", "GO", "go ", "go\n", "go"]


# -- malformed history ----------------------------------------------------------------------
STARTED = ("orchestration_started", {"name": "gated", "input": None})
SCHEDULED = ("activity_scheduled", {"task_id": 1, "name": "inc", "input": 0})
COMPLETED = ("activity_completed", {"task_id": 1, "result": 1})
MALFORMED: dict[str, tuple[list[tuple[str, Any]], str]] = {
    "unknown-kind": ([STARTED, SCHEDULED, ("bogus_kind", {"task_id": 1}), COMPLETED], "bogus_kind"),
    "scheduled-without-task-id": ([STARTED, ("activity_scheduled", {"name": "inc", "input": 0})],
                                  "activity_scheduled"),
    "completed-without-task-id": ([STARTED, SCHEDULED, ("activity_completed", {"result": 1})],
                                  "activity_completed"),
    "completed-task-id-of-wrong-type": ([STARTED, SCHEDULED, ("activity_completed", {"task_id": "1"})],
                                        "activity_completed"),
    "completed-for-unknown-task": ([STARTED, SCHEDULED, ("activity_completed", {"task_id": 7})],
                                   "activity_completed"),
    "payload-is-a-list": ([STARTED, SCHEDULED, ("activity_completed", [1, 2])], "activity_completed"),
    "payload-is-json-null": ([STARTED, SCHEDULED, ("activity_completed", None)], "activity_completed"),
    "started-payload-is-a-string": ([("orchestration_started", "oops")], "orchestration_started"),
    "event-payload-is-a-number": ([STARTED, SCHEDULED, COMPLETED, ("event_received", 42)], "event_received"),
}


async def _forge(dsn: str, instance_id: str, events: list[tuple[str, Any]], history_len: int | None = None) -> None:
    """Write a running ``gated`` instance with the given history and a pending ``go`` event."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO pgdurable.instances (instance_id, name, status, history_len)"
                " VALUES ($1, 'gated', 'running', $2)",
                instance_id, len(events) if history_len is None else history_len,
            )
            await conn.executemany(
                "INSERT INTO pgdurable.history (instance_id, execution_id, seq, event_type, payload)"
                " VALUES ($1, 1, $2, $3, $4::text::jsonb)",
                [(instance_id, seq, kind, orjson.dumps(data).decode()) for seq, (kind, data) in enumerate(events, 1)],
            )
            await conn.execute(
                "INSERT INTO pgdurable.orchestrator_queue (instance_id, orchestration, kind, payload)"
                " VALUES ($1, 'gated', 'event_received', '{\"name\": \"go\", \"data\": 1}')",
                instance_id,
            )
    finally:
        await conn.close()


async def test_malformed_history_rows_fail_the_instance_and_spare_the_others(dsn: str) -> None:
    """Each corrupt row met during replay fails its instance with a NonDeterminismError naming it."""
    for name, (events, _) in MALFORMED.items():
        await _forge(dsn, name, events)
    async with pgd.Runtime(app, dsn) as runtime:
        client = runtime.client
        healthy = [await client.start(chain, 3) for _ in range(3)]
        for handle in healthy:
            assert await handle.result(timeout=30) == 3
        for name, (events, kind) in MALFORMED.items():
            with pytest.raises(pgd.InstanceFailed) as info:
                await client.wait(name, timeout=30)
            error = info.value.error
            assert error["type"] == "NonDeterminismError", (name, error)
            assert "malformed history" in error["message"] and kind in error["message"], (name, error["message"])
            kinds = [e.kind for e in await client.history(name)]
            assert kinds == [k for k, _ in events] + ["orchestration_failed"], (name, kinds)
        assert await (await client.start(chain, 2)).result(timeout=30) == 2  # still serving


@pytest.mark.parametrize(
    "events",
    [
        pytest.param([STARTED, SCHEDULED, ("timer_fired", {"task_id": 1})], id="timer-fired-for-an-activity"),
        pytest.param([STARTED, SCHEDULED, COMPLETED, ("activity_completed", {"task_id": 1, "result": 5})],
                     id="duplicated-completion"),
        pytest.param([STARTED, SCHEDULED, ("sub_orchestration_completed", {"task_id": 1, "result": 5})],
                     id="child-result-for-an-activity"),
    ],
)
async def test_history_rows_that_contradict_their_task_are_detected(dsn: str, events: list[tuple[str, Any]]) -> None:
    await _forge(dsn, "contradiction", events)
    async with pgd.Runtime(app, dsn) as runtime:
        with pytest.raises(pgd.InstanceFailed) as info:
            await runtime.client.wait("contradiction", timeout=30)
        assert info.value.error["type"] == "NonDeterminismError"


async def test_history_row_the_instance_does_not_count_is_not_a_poison_pill(dsn: str) -> None:
    await _forge(dsn, "poison", [STARTED, SCHEDULED, COMPLETED], history_len=2)
    async with pgd.Runtime(app, dsn) as runtime:
        # Fixed, this takes well under a second; broken, the batch holding both stalls until a sweep.
        assert await (await runtime.client.start(chain, 3)).result(timeout=6) == 3
        with pytest.raises(pgd.InstanceFailed):
            await runtime.client.wait("poison", timeout=5)


# -- hostile strings ----------------------------------------------------------------------------
async def test_hostile_ids_event_names_and_reasons_round_trip(dsn: str) -> None:
    """Quotes, semicolons, ``$1``, backslashes and unicode are data, never SQL."""
    await _sql(dsn, "CREATE TABLE public.sentinel (n int)")
    await _sql(dsn, "INSERT INTO public.sentinel VALUES (1)")
    async with pgd.Runtime(app, dsn) as runtime:
        client = runtime.client
        for text in HOSTILE:
            assert (await client.start(waits, text, instance_id=text)).instance_id == text
        for text in HOSTILE:
            if text == INJECTION:  # this one through the command line
                sent = await _cli("raise-event", text, text, "--data", orjson.dumps({"echo": text}).decode(),
                                  "--dsn", dsn)
                assert sent.returncode == 0, sent.stderr
            else:
                await client.raise_event(text, text, {"echo": text})
        for text in HOSTILE:
            assert await client.wait(text, timeout=30) == {"echo": text}
            state = await client.status(text)
            assert state.instance_id == text and state.input == text
            received = [e.data for e in await client.history(text) if e.kind == "event_received"]
            assert received == [{"name": text, "data": {"echo": text}}]
        assert {s.instance_id for s in await client.list(limit=1000)} == set(HOSTILE)

        await client.start(waits, None, instance_id="to-cancel")
        await client.cancel("to-cancel", reason=INJECTION)
        with pytest.raises(pgd.Cancelled) as cancelled:
            await client.wait("to-cancel", timeout=30)
        assert cancelled.value.reason == INJECTION
        await client.start(waits, None, instance_id="to-terminate")
        await client.terminate("to-terminate", reason=INJECTION + "\\ $1")
        assert (await client.status("to-terminate")).error["message"] == INJECTION + "\\ $1"
        for text in HOSTILE[:4]:
            await client.purge(text)

        assert await (await client.start(INJECTION, {"v": INJECTION}, instance_id=INJECTION + "#2")).result(
            timeout=30) == {"v": INJECTION}
        assert [s.instance_id for s in await client.list(name=INJECTION)] == [INJECTION + "#2"]
        child_id = "kid'); DELETE FROM pgdurable.instances; --"
        assert await (await client.start(parent, child_id, instance_id="parent")).result(timeout=30) == child_id
        assert (await client.status(child_id)).parent_instance_id == "parent"

    tables = {r["tablename"] for r in await _sql(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'pgdurable'")}
    assert set(TABLES) <= tables
    assert [r["n"] for r in await _sql(dsn, "SELECT n FROM public.sentinel")] == [1]
    counts = await _counts(dsn)
    assert counts["instances"] == len(HOSTILE) - 4 + 5


async def test_list_filters_are_invalid_arguments(dsn: str) -> None:
    async with pgd.Client(dsn) as client:
        with pytest.raises(pgd.InvalidArgument):
            await client.list(status="bogus")
        with pytest.raises(pgd.InvalidArgument):
            await client.list(limit=-1)


async def test_unstorable_names_from_orchestration_code_fail_only_their_instance(dsn: str) -> None:
    cases = ("activity-name-surrogate", "version-id-surrogate", "child-id-surrogate", "child-id-10kB")
    async with pgd.Runtime(app, dsn) as runtime:
        client = runtime.client
        for how in cases:
            await client.start(produces, how, instance_id=how)
        await anyio.sleep(0.3)
        # Fixed, this takes well under a second; broken, every batch holding it fails.
        assert await (await client.start(chain, 3)).result(timeout=6) == 3
        for how in cases:
            try:
                outcome = await client.wait(how, timeout=5)
                assert outcome in ("InvalidArgument", "SerializationError"), (how, outcome)
            except pgd.InstanceFailed as exc:
                assert exc.error["type"] in ("InvalidArgument", "SerializationError"), (how, exc.error)


async def test_nul_and_overlong_ids_and_event_names_are_invalid_arguments(dsn: str) -> None:
    long_text = "x" * 10_000
    async with pgd.Runtime(app, dsn) as runtime:
        client = runtime.client
        await _parked(runtime, "target")
        async with _nothing_written(dsn):
            for bad_id in ("nul\x00id", "\x00", long_text, "y" * 201, "", 42):
                with pytest.raises(pgd.InvalidArgument):
                    await client.start(waits, None, instance_id=bad_id)  # type: ignore[arg-type]
                for call in (client.status, client.wait, client.cancel, client.terminate, client.purge,
                             client.history):
                    with pytest.raises(pgd.InvalidArgument):
                        await call(bad_id)  # type: ignore[arg-type]
                with pytest.raises(pgd.InvalidArgument):
                    await client.raise_event(bad_id, "go")  # type: ignore[arg-type]
                with pytest.raises(pgd.InvalidArgument):
                    await client.raise_event("target", bad_id)  # type: ignore[arg-type]
                with pytest.raises(pgd.InvalidArgument):
                    client.get_handle(bad_id)  # type: ignore[arg-type]
            with pytest.raises(pgd.InvalidArgument, match="limit is 200"):
                await client.start(waits, None, instance_id=long_text)
            with pytest.raises(pgd.SerializationError, match="NUL"):
                await client.raise_event("target", "go", "data\x00with nul")
            with pytest.raises(pgd.PgDurableError):  # a lone surrogate cannot be sent as UTF-8
                await client.start(waits, None, instance_id="lone\ud800surrogate")
            with pytest.raises(pgd.PgDurableError):
                await client.raise_event("target", "lone\udc00surrogate")
        assert isinstance(pgd.InvalidArgument("x"), ValueError)
        await client.raise_event("target", "go", long_text)  # 10 kB of event data is fine
        assert await client.wait("target", timeout=30) == long_text


# -- the schema option and SQL injection through configuration -----------------------------------
async def test_schema_option_rejects_injection(dsn: str) -> None:
    await _sql(dsn, "CREATE TABLE public.sentinel (n int)")
    for schema in ('pgdurable"; DROP SCHEMA public CASCADE; --', "x; DROP TABLE public.sentinel", "Upper",
                   "a-b", "", "x" * 64, "pgdurable\x00"):
        with pytest.raises(pgd.ConfigurationError):
            pgd.Client(dsn, schema=schema)
        with pytest.raises(pgd.ConfigurationError):
            pgd.Runtime(app, dsn, schema=schema)
        with pytest.raises(pgd.ConfigurationError):
            await pgd.migrate(dsn, schema=schema)
    line = _one_error_line(await _cli("migrate", "--dsn", dsn, "--schema", "x; DROP TABLE public.sentinel"))
    assert "invalid schema name" in line
    line = _one_error_line(await _cli("status", "x", "--dsn", dsn, "--schema", 'a"; DROP SCHEMA public CASCADE; --'))
    assert "invalid schema name" in line
    assert await _sql(dsn, "SELECT * FROM public.sentinel") == []
    schemas = {r["nspname"] for r in await _sql(dsn, "SELECT nspname FROM pg_namespace")}
    assert {"public", "pgdurable"} <= schemas


# -- wrong DSNs ---------------------------------------------------------------------------------
def _as_user(dsn: str, user: str, password: str | None = None) -> str:
    """``dsn`` with its user (and password) replaced."""
    parts = urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    auth = user if password is None else f"{user}:{password}"
    return urlunsplit(parts._replace(netloc=f"{auth}@{host}"))


@contextlib.asynccontextmanager
async def _password_role(pg_server: PgServer) -> AsyncIterator[str | None]:
    """A role that must log in with its password; yields a DSN with the wrong one (None: cannot arrange)."""
    role = f"pgd_pw_{os.getpid()}"
    await _sql(pg_server.admin_dsn, f"CREATE ROLE {role} LOGIN PASSWORD 'right-password'")
    hba = pg_server.cluster.datadir / "pg_hba.conf" if pg_server.cluster is not None else None
    original = hba.read_text() if hba is not None else ""
    wrong: str | None = _as_user(pg_server.admin_dsn, role, "wrong-password")
    try:
        if hba is not None:  # our own cluster trusts everyone: make this one role use a password
            hba.write_text(f"host all {role} all scram-sha-256\n{original}")
            await _sql(pg_server.admin_dsn, "SELECT pg_reload_conf()")
        with anyio.fail_after(10):  # the postmaster reloads pg_hba.conf asynchronously
            while wrong is not None:
                try:
                    await (await asyncpg.connect(wrong)).close()
                except asyncpg.InvalidPasswordError:
                    break
                if hba is None:
                    wrong = None  # a server we do not own that does not check passwords
                await anyio.sleep(0.05)
        yield wrong
    finally:
        if hba is not None:
            hba.write_text(original)
            await _sql(pg_server.admin_dsn, "SELECT pg_reload_conf()")
        await _sql(pg_server.admin_dsn, f"DROP ROLE IF EXISTS {role}")


async def test_wrong_dsns_fail_fast_with_database_error(pg_server: PgServer) -> None:
    async with _password_role(pg_server) as bad_password:
        wrong = {
            "unknown database": (pg_server.dsn_for("pgd_no_such_database"), "does not exist"),
            "unknown role": (_as_user(pg_server.admin_dsn, "pgd_no_such_role"), "does not exist"),
            "unreachable port": ("postgresql://postgres@127.0.0.1:1/postgres", "cannot reach PostgreSQL"),
            "not a DSN": ("mysql://user@host/db", "invalid DSN"),
        }
        if bad_password is not None:
            wrong["bad password"] = (bad_password, "password authentication failed")
        for label, (bad, text) in wrong.items():
            started = time.monotonic()
            client = pgd.Client(bad)
            client.db.retry_for = 0.5
            try:
                with pytest.raises(pgd.DatabaseError, match=text):
                    await client.status("x")
            finally:
                await client.close()
            with pytest.raises(pgd.DatabaseError, match=text):
                await pgd.migrate(bad)
            with pytest.raises(pgd.DatabaseError, match=text):
                async with pgd.Runtime(app, bad):
                    pass
            assert time.monotonic() - started < 15, f"{label} took too long"  # a hang is 30 s of retries
        for label in ("bad password", "unknown database"):
            if label in wrong:
                started = time.monotonic()
                line = _one_error_line(await _cli("status", "x", "--dsn", wrong[label][0]))
                assert wrong[label][1] in line and time.monotonic() - started < 15


async def test_malformed_port_in_dsn_is_a_typed_error() -> None:
    client = pgd.Client("postgresql://postgres@127.0.0.1:notaport/db")
    try:
        with pytest.raises(pgd.PgDurableError):
            await client.status("x")
    finally:
        await client.close()


# -- a schema from the future -----------------------------------------------------------------------
async def _from_the_future(dsn: str) -> None:
    await _sql(dsn, "INSERT INTO pgdurable.schema_migrations (version, name) VALUES ($1, 'future')",
               latest_version() + 1)


async def test_schema_newer_than_the_code_is_refused(dsn: str) -> None:
    await _from_the_future(dsn)
    async with _nothing_written(dsn):
        with pytest.raises(pgd.SchemaVersionError) as info:
            await pgd.migrate(dsn)
        assert info.value.database_version == latest_version() + 1  # type: ignore[attr-defined]
        with pytest.raises(pgd.SchemaVersionError):
            async with pgd.Runtime(app, dsn):
                pass
        async with pgd.Client(dsn) as client:
            with pytest.raises(pgd.SchemaVersionError):
                await client.start(waits, None)
        assert "newer" in _one_error_line(await _cli("migrate", "--dsn", dsn))
        worker = await _cli("worker", "--app", "tests.integration.test_bad_input:app", "--dsn", dsn)
        assert "newer" in _one_error_line(worker)


async def test_runtime_without_migrate_refuses_a_newer_schema(dsn: str) -> None:
    await _from_the_future(dsn)
    with pytest.raises(pgd.SchemaVersionError):
        async with pgd.Runtime(app, dsn, migrate=False):
            pass
