"""Metrics and traces under least privilege: a worker role reads every gauge and a client role's
trace context reaches the worker role's spans; roles granted before migration 16 get the new start()."""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import pgdurable_async as pgd
from pgdurable_async._store import migrations as migrator
from tests.integration.test_roles import roles  # noqa: F401 - the fixture
from tests.spans import as_dict, spans

__all__ = ["spans"]  # the fixture

app = pgd.App()


@app.activity
async def shout(ctx: pgd.ActivityContext, text: str) -> str:
    return text.upper()


@app.orchestration
async def shouted(ctx: pgd.OrchestrationContext, text: str) -> str:
    return str(await ctx.call_activity(shout, text))


async def test_worker_and_client_roles_trace_and_scrape(roles: tuple[str, str],  # noqa: F811
                                                        spans: InMemorySpanExporter) -> None:
    worker_dsn, client_dsn = roles
    async with pgd.Runtime(app, worker_dsn, metrics=True):
        async with pgd.Client(client_dsn) as client:
            with trace.get_tracer("test").start_as_current_span("request") as request:
                handle = await client.start(shouted, "hi", instance_id="least-traced")
            assert await handle.result(timeout=30) == "HI"
        with anyio.fail_after(30):
            while True:
                text = (await anyio.to_thread.run_sync(generate_latest, REGISTRY)).decode()
                found = {(s.name, tuple(s.labels.values())): s.value
                         for f in text_string_to_metric_families(text) for s in f.samples}
                if found.get(("pgdurable_instances", ("completed",))) == 1:
                    break
                await anyio.sleep(0.2)
    for name in ("pgdurable_lock_waits", "pgdurable_wal_bytes", "pgdurable_activity_oldest_running_seconds"):
        assert (name, ()) in found
    assert found[("pgdurable_queue_depth", ("work",))] == 0
    trace_id = request.get_span_context().trace_id
    [activity] = [s for s in map(as_dict, spans.get_finished_spans()) if s["name"] == "pgdurable.activity"
                  and s["attributes"]["pgdurable.instance_id"] == "least-traced"]
    assert activity["trace_id"] == f"{trace_id:032x}"


async def test_roles_granted_before_migration_16_may_start_with_a_trace_context(
    empty_dsn: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    shipped = migrator.migrations()
    (ops,) = [m.version for m in shipped if m.name == "ops"]
    monkeypatch.setattr(migrator, "migrations", lambda: [m for m in shipped if m.version < ops])
    await migrator.migrate(empty_dsn)
    client_role = f"pgd_old_client_{os.getpid()}_ops"
    owner = await asyncpg.connect(empty_dsn)
    try:
        await owner.execute(f'DROP ROLE IF EXISTS "{client_role}"')
        await owner.execute(f'CREATE ROLE "{client_role}" LOGIN')
        await owner.execute("SELECT pgdurable.grant_client($1)", client_role)
        monkeypatch.undo()
        assert await migrator.migrate(empty_dsn) == [m.version for m in shipped if m.version >= ops]
        parts = urlsplit(empty_dsn)
        conn = await asyncpg.connect(urlunsplit(parts._replace(netloc=f"{client_role}@{parts.hostname}:{parts.port}")))
        try:
            context = '{"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}'
            await conn.execute("SELECT pgdurable.start('shouted', '\"x\"', 'old-role', $1::jsonb)", context)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("UPDATE pgdurable.instances SET trace_context = NULL")
        finally:
            await conn.close()
        stored = await owner.fetchval("SELECT trace_context->>'traceparent' FROM pgdurable.instances"
                                      " WHERE instance_id = 'old-role'")
        assert stored == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    finally:
        await owner.execute(f'DROP OWNED BY "{client_role}"')
        await owner.execute(f'DROP ROLE IF EXISTS "{client_role}"')
        await owner.close()
