"""The observer's promises that need no database: a trace lookup that fails holds nothing up,
and the JSON log lines of ``worker --log-format json`` carry the fields given as ``extra``."""

from __future__ import annotations

import json
import logging
import uuid

import anyio
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pgdurable_async._cli.logs import JsonFormatter
from pgdurable_async._runtime.observer import Observer
from pgdurable_async._store import Database
from pgdurable_async._store.records import WorkItem
from tests.spans import as_dict, spans

__all__ = ["spans"]  # the fixture


async def test_an_unreachable_database_costs_activities_their_parent_span_only(spans: InMemorySpanExporter) -> None:
    observer = Observer(Database("postgresql://nobody@127.0.0.1:1/nothing"))
    item = WorkItem(1, "inst", 1, 1, "act", None, None, 2, uuid.uuid4())
    ran: list[WorkItem] = []

    async def run(work: WorkItem) -> None:
        ran.append(work)

    await observer.activities_claimed([item])  # logs a warning, raises nothing
    await observer.run_activity(item, run)
    assert ran == [item] and observer.running() == 0
    [span] = map(as_dict, spans.get_finished_spans())
    assert span["name"] == "pgdurable.activity" and span["parent_span_id"] is None
    assert span["attributes"] == {"pgdurable.instance_id": "inst", "pgdurable.name": "act", "pgdurable.attempt": 2}


async def test_an_item_claimed_again_while_its_first_attempt_runs_is_counted_apart() -> None:
    # A lease that ran out mid-attempt (the database was away) lets this process claim the same work
    # item again: two attempts of one item id, each with its own lease token, overlap.
    observer = Observer(Database("postgresql://nobody@127.0.0.1:1/nothing"))
    first = WorkItem(7, "inst", 1, 1, "act", None, None, 1, uuid.uuid4())
    again = WorkItem(7, "inst", 1, 1, "act", None, None, 1, uuid.uuid4())
    release_first, release_again = anyio.Event(), anyio.Event()
    counts: list[int] = []

    async def run(item: WorkItem) -> None:
        await (release_first if item is first else release_again).wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(observer.run_activity, first, run)
        tg.start_soon(observer.run_activity, again, run)
        await anyio.sleep(0.01)
        counts.append(observer.running())
        release_first.set()
        await anyio.sleep(0.01)
        counts.append(observer.running())  # the first ended; the second still runs
        release_again.set()
    assert counts == [2, 1] and observer.running() == 0


def test_json_lines_carry_the_extra_fields() -> None:
    record = logging.LogRecord("pgdurable_async.activities", logging.WARNING, __file__, 1,
                               "activity %s failed", ("embed",), None)
    record.instance_id, record.attempt = "batch-7", 2
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "activity embed failed" and line["level"] == "WARNING"
    assert (line["instance_id"], line["attempt"], line["logger"]) == ("batch-7", 2, "pgdurable_async.activities")
    assert line["time"].endswith("+00:00") and "args" not in line and "msg" not in line
