"""The Python mirror of pg_durable's SQL DSL.

Build a graph from node functions and operators, then register it with
``app.graph(name, graph)`` (it starts like any orchestration, its input bound as
``$input``) or start it ad hoc with :func:`start`::

    from pgdurable_async import dsl

    batch = (
        dsl.sql("SELECT id FROM documents WHERE processed = false LIMIT 100").bind("batch")
        >> "UPDATE documents SET processed = true WHERE id IN (SELECT id FROM $batch.*)"
    )
    app.graph("process_batch", batch)

Operators: ``a >> b`` is pg_durable's ``a ~> b`` (sequence), ``a & b`` runs both
and waits for all, ``a | b`` races them.  A plain string in an operator position
is a SQL node (``sql("...") >> "SELECT 2"``).  Binding has one spelling,
``node.bind("name")`` (``df.as`` / ``|=>``); :func:`as_` is its function form.
Beyond pg_durable: :func:`activity` (a Python step) and :func:`fan_out` (one step
per row of a bound result, at most ``limit`` at once).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from ._base.errors import GraphError
from ._base.names import name_of
from ._client import Client, InstanceHandle
from ._graph.compiler import compile_graph
from ._graph.http import allow_http


class Node:
    """One graph node; ``to_json()`` gives its graph JSON."""

    __slots__ = ("data",)

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = _json(self.data)
        return out

    def __repr__(self) -> str:
        return f"dsl.Node({self.to_json()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Node) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(repr(self))

    # -- operators --------------------------------------------------------------------
    def __rshift__(self, other: Node | str) -> Node:
        return seq(self, other)

    def __rrshift__(self, other: Node | str) -> Node:
        return seq(other, self)

    def __and__(self, other: Node | str) -> Node:
        return join(self, other)

    def __rand__(self, other: Node | str) -> Node:
        return join(other, self)

    def __or__(self, other: Node | str) -> Node:
        return race(self, other)

    def __ror__(self, other: Node | str) -> Node:
        return race(other, self)

    def bind(self, name: str) -> Node:
        """Name this node's result (pg_durable ``|=> 'name'``); later SQL reads it as ``$name``."""
        return Node({"type": "bind", "name": name, "node": self})


def _node(value: Node | str) -> Node:
    if isinstance(value, Node):
        return value
    if isinstance(value, str):
        return sql(value)
    raise GraphError(f"expected a dsl node or a SQL string, got {type(value).__name__}")


def _json(value: Any) -> Any:
    """The graph JSON of a node tree, built without recursion: ``a >> b >> ...`` nests one
    seq per operator, so a long pipeline is a deep tree (the compiler flattens it)."""
    top: list[Any] = [None]
    stack: list[tuple[Any, Any, Any]] = [(value, top, 0)]
    while stack:
        item, target, key = stack.pop()
        while isinstance(item, Node):
            item = item.data
        if isinstance(item, dict):
            out: Any = dict.fromkeys(item)
            stack.extend((v, out, k) for k, v in item.items())
        elif isinstance(item, (list, tuple)):
            out = [None] * len(item)
            stack.extend((v, out, i) for i, v in enumerate(item))
        else:
            out = item
        target[key] = out
    return top[0]


# -- node functions (pg_durable's df.*) -------------------------------------------------------
def sql(query: str) -> Node:
    """A SQL node: runs as a transactional activity (exactly once)."""
    if not isinstance(query, str) or not query.strip():
        raise GraphError("sql() needs a non-empty query string")
    return Node({"type": "sql", "query": query})


def seq(*steps: Node | str) -> Node:
    """Run ``steps`` in order (``>>``); the result is the last step's."""
    return Node({"type": "seq", "steps": [_node(s) for s in steps]})


def as_(node: Node | str, name: str) -> Node:
    """Function form of ``node.bind(name)``."""
    return _node(node).bind(name)


def join(*branches: Node | str) -> Node:
    """Run ``branches`` at once and wait for all (``&``); the result is the list of results."""
    return Node({"type": "join", "branches": [_node(b) for b in branches]})


def race(*branches: Node | str) -> Node:
    """Run ``branches`` at once; the first to finish wins (``|``)."""
    return Node({"type": "race", "branches": [_node(b) for b in branches]})


def if_(cond: Node | str, then: Node | str, else_: Node | str | None = None) -> Node:
    """Run ``then`` if ``cond``'s result is truthy (first column of the first row), else ``else_``."""
    return Node({"type": "if", "cond": _node(cond), "then": _node(then),
                 "else": None if else_ is None else _node(else_)})


def if_rows(name: str | Node, then: Node | str, else_: Node | str | None = None) -> Node:
    """Run ``then`` if the bound result ``name`` (or the result of a node) has rows."""
    head: dict[str, Any] = {"name": name} if isinstance(name, str) else {"cond": _node(name)}
    return Node({"type": "if_rows", **head, "then": _node(then),
                 "else": None if else_ is None else _node(else_)})


def loop(body: Node | str, cond: Node | str | None = None, *, continue_on_failure: bool = False) -> Node:
    """Repeat ``body`` forever, or while ``cond`` (checked after each iteration) is truthy."""
    return Node({"type": "loop", "body": _node(body), "cond": None if cond is None else _node(cond),
                 "continue_on_failure": continue_on_failure})


def break_(value: Any = None) -> Node:
    """Leave the enclosing loop; the loop's result is ``value``."""
    return Node({"type": "break", "value": value})


def sleep(seconds: float | timedelta) -> Node:
    """A durable timer."""
    secs = seconds.total_seconds() if isinstance(seconds, timedelta) else seconds
    return Node({"type": "sleep", "seconds": secs})


def wait_for_schedule(cron: str) -> Node:
    """Sleep until the next time the 5-field cron expression matches (UTC; needs cronsim)."""
    return Node({"type": "wait_for_schedule", "cron": cron})


def wait_for_signal(name: str, timeout: float | timedelta | None = None) -> Node:
    """Wait for a signal; result ``{signal_name, timed_out, data}``."""
    secs = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
    return Node({"type": "wait_for_signal", "name": name, "timeout": secs})


def http(url: str, method: str = "POST", body: str | None = None, headers: dict[str, str] | None = None,
         timeout: float = 30) -> Node:
    """An HTTP request (hosts must be allowed: :func:`allow_http`); result is pg_durable's envelope."""
    return Node({"type": "http", "url": url, "method": method, "body": body, "headers": headers,
                 "timeout": timeout})


def call(orchestration: Any, input: Any = None) -> Node:
    """Run a registered orchestration or graph as a sub-workflow; ``"$name"`` strings in input resolve."""
    return Node({"type": "call", "name": name_of(orchestration, kind="orchestration"), "input": input})


def activity(fn: Any, input: Any = None, *, key: str | None = None, priority: int | None = None) -> Node:
    """A Python step: a registered activity (function or name).

    ``key`` and ``priority`` are those of ``ctx.call_activity`` (for the activity's queue);
    ``key`` may be a reference such as ``"$item.tenant"``.
    """
    data: dict[str, Any] = {"type": "activity", "name": name_of(fn, kind="activity"), "input": input}
    if key is not None:
        data["key"] = key
    if priority is not None:
        data["priority"] = priority
    return Node(data)


def fan_out(*, over: str, step: Node | str, limit: int | None = None, as_: str = "item") -> Node:
    """Run ``step`` once per row of the bound result ``over`` (``$item`` in the step), ``limit`` at once.

    An :func:`activity` step with no input receives the row as a dict.
    """
    return Node({"type": "fan_out", "over": over, "step": _node(step), "limit": limit, "as": as_})


# -- helpers ------------------------------------------------------------------------------------
def compile(graph: Node | str | dict[str, Any], *, bound: frozenset[str] = frozenset()) -> dict[str, Any]:  # noqa: A001
    """Check a graph and return its compiled JSON; raises :class:`GraphError`."""
    raw = graph.to_json() if isinstance(graph, Node) else sql(graph).to_json() if isinstance(graph, str) else graph
    return compile_graph(raw, bound=bound)


async def start(
    client: Client, graph: Node | str | dict[str, Any], *, instance_id: str | None = None,
    vars: dict[str, str] | None = None, label: str | None = None,
) -> InstanceHandle:
    """Validate and start an ad-hoc graph, as ``df.start`` does: its SQL runs as the client's own role.

    The client's role needs the ``df`` grant (``df.grant_usage``), and for activity or HTTP
    nodes ``df.grant_activities`` / the ``include_http`` option, as from SQL.
    """
    compile(graph)  # a GraphError before anything is sent
    return await client.start_graph(graph.to_json() if isinstance(graph, Node) else
                                    sql(graph).to_json() if isinstance(graph, str) else graph,
                                    label=label, vars=vars, instance_id=instance_id)


__all__ = [
    "GraphError", "Node", "activity", "allow_http", "as_", "break_", "call", "compile", "fan_out", "http",
    "if_", "if_rows", "join", "loop", "race", "seq", "sleep", "sql", "start", "wait_for_schedule",
    "wait_for_signal",
]
