"""What each page shows, gathered through the client and the store (no HTML here)."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson

from .._app import App
from .._base.errors import InvalidArgument
from .._base.types import HistoryEvent, InstanceState, Status
from .._client import Client
from .._graph.compiler import children
from .._graph.mermaid import graph_for, node_label, node_states
from .._store import dashboard_store as store
from .._store import instance_store, queue_store
from . import _charts, _timeline

THROUGHPUT_MINUTES = 15
PAGE_SIZE, MAX_PAGE_SIZE = 50, 500
MAX_HISTORY_ROWS = 1000
_SERIES = ("activity_completed", "activity_failed", "orchestration_started", "orchestration_completed",
           "orchestration_failed")


# -- overview ---------------------------------------------------------------------------
async def overview(client: Client) -> dict[str, Any]:
    """Counts per status, queues, throughput per minute and recent failures."""
    async def read(conn: Any) -> dict[str, Any]:
        queues = await store.queues(conn)  # None for a client role
        return {
            "counts": await store.status_counts(conn),
            "queues": queues,
            "flow_queues": await queue_store.queue_depths(conn) if queues is not None else None,
            "throughput": await store.throughput(conn, minutes=THROUGHPUT_MINUTES),
            "failures": await store.recent_failures(conn, limit=10),
            "now": await store.now(conn),
        }

    data = await (await client.ready_db()).run(read, transaction=False)
    counts = {s.value: data["counts"].get(s.value, 0) for s in Status}
    data["counts"], data["total"] = counts, sum(counts.values())
    data["minutes"] = _minutes(data["throughput"], data["now"])
    data["charts"] = _charts.charts(data["minutes"])
    return data


def _minutes(per_minute: dict[tuple[datetime, str], int], now: datetime) -> list[dict[str, Any]]:
    """The last minutes, oldest first, each with a count per series (zeros included)."""
    this = now.replace(second=0, microsecond=0)
    minutes = []
    for back in range(THROUGHPUT_MINUTES - 1, -1, -1):
        minute = this - timedelta(minutes=back)
        row: dict[str, Any] = {"minute": minute}
        row.update({s: per_minute.get((minute, s), 0) for s in _SERIES})
        minutes.append(row)
    return minutes


# -- instance list ----------------------------------------------------------------------
def encode_cursor(created_at: datetime, instance_id: str) -> str:
    """An opaque keyset cursor: where the next page starts."""
    return base64.urlsafe_b64encode(orjson.dumps([created_at.isoformat(), instance_id])).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, instance_id = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(created), str(instance_id)
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise InvalidArgument(f"not a cursor this dashboard gave out: {cursor!r}") from None


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


@dataclass
class Filters:
    """The ``status``, ``name``, ``q``, ``cursor`` (or ``after``, ``next``) and ``limit`` query parameters, checked."""

    status: str | None = None
    name: str | None = None
    q: str | None = None
    cursor: str | None = None
    limit: int = PAGE_SIZE
    after: tuple[datetime, str] | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, params: Any) -> Filters:
        status = params.get("status") or None
        if status is not None and status not in {s.value for s in Status}:
            raise InvalidArgument(f"unknown status {status!r}; one of {', '.join(Status)}")
        raw_limit = params.get("limit") or str(PAGE_SIZE)
        try:
            limit = int(raw_limit)
        except ValueError:
            raise InvalidArgument(f"limit must be an integer, not {raw_limit!r}") from None
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise InvalidArgument(f"limit must be between 1 and {MAX_PAGE_SIZE}")
        cursor = params.get("cursor") or params.get("after") or params.get("next") or None
        return cls(status, params.get("name") or None, params.get("q") or None, cursor, limit,
                   decode_cursor(cursor) if cursor else None)


async def instances_page(client: Client, filters: Filters) -> tuple[list[InstanceState], str | None]:
    """One keyset page of instances, newest first, and the cursor of the next (None at the end)."""
    async def read(conn: Any) -> tuple[list[InstanceState], str | None]:
        rows = await store.page(conn, status=filters.status, name=filters.name,
                                pattern=_like(filters.q) if filters.q else None, after=filters.after,
                                limit=filters.limit + 1)
        more = len(rows) > filters.limit
        rows = rows[: filters.limit]
        states = await instance_store.get_instances(conn, instance_ids=[r[0] for r in rows])
        return states, encode_cursor(rows[-1][1], rows[-1][0]) if more and rows else None

    return await (await client.ready_db()).run(read, transaction=False)


# -- one instance -----------------------------------------------------------------------
@dataclass
class GraphNode:
    id: str
    label: str
    state: str
    children: list[GraphNode]


def _graph_tree(tree: dict[str, Any], states: dict[str, str]) -> GraphNode:
    return GraphNode(tree["id"], node_label(tree), states.get(tree["id"], "pending"),
                     [_graph_tree(c, states) for c in children(tree)])


async def instance(client: Client, instance_id: str, app: App | None = None) -> dict[str, Any]:
    """State, waits (with live attempts), timeline, graph and history of one instance."""
    state = await client.status(instance_id)
    history = await client.history(instance_id)

    async def read(conn: Any) -> tuple[dict[int, store.WorkAttempt], datetime]:
        live = await store.work_attempts(conn, instance_id=instance_id, execution_id=state.execution_id)
        return live, await store.now(conn)

    attempts, now = await client.db.run(read, transaction=False)
    finished = state.status.is_terminal
    timeouts = {w["timer_task_id"]: w["name"] for w in state.waiting_on if "timer_task_id" in w}
    timeline = _timeline.build(history, finished=finished, now=now, attempts=attempts, timeouts=timeouts)
    graph = None
    tree = graph_for(state, app.orchestrations if app is not None else None)
    if tree is not None:
        graph = _graph_tree(tree, node_states(state, history, tree))
    waits = [dict(w, attempt=attempts.get(w["task_id"])) if w["kind"] == "activity" else w
             for w in state.waiting_on]
    return {
        "state": state, "history": history[:MAX_HISTORY_ROWS], "history_total": len(history),
        "timeline": _timeline.layout(timeline), "graph": graph, "waits": waits, "now": now,
    }


def history_json(events: list[HistoryEvent]) -> dict[str, Any]:
    """``{"events": [{seq, kind, data, recorded_at}, ...]}``."""
    return {"events": [{"seq": e.seq, "kind": e.kind, "data": e.data, "recorded_at": e.recorded_at,
                        "execution_id": e.execution_id} for e in events]}
