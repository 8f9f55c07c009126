"""The graph interpreter's built-ins: what an app registers so its workers run graphs.

:func:`builtin_orchestrations` and :func:`builtin_activities` are the
``pgdurable.graph`` orchestration (graphs started from SQL with ``df.start``),
the transactional SQL-node activity and the HTTP activity; ``App.install_builtins``
registers them and every Runtime calls it.  :func:`graph_function` builds the
orchestration behind ``App.graph``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._base.definitions import ActivityDef, OrchestrationDef, TransactionContext
from .._base.types import RetryPolicy
from .._engine import OrchestrationContext
from .._store import node_store
from .compiler import compile_graph
from .http import HTTP_RETRY, http_node
from .interpreter import (
    GRAPH_ORCHESTRATION,
    HTTP_ACTIVITY,
    SEMANTICS_CHANGE,
    SQL_ACTIVITY,
    Interpreter,
    run_graph_input,
)

GRAPH_ATTR = "__pgdurable_graph__"
SQL_RETRY = RetryPolicy(max_attempts=3, initial_interval=0.2, backoff=2.0, max_interval=5.0,
                        non_retryable=("GraphError", "NodeRefused"))


async def graph_orchestration(ctx: OrchestrationContext, data: Any) -> Any:
    """``pgdurable.graph``: input ``{graph, vars, role, search_path, label}``."""
    return await run_graph_input(ctx, data)


async def sql_node(ctx: TransactionContext, data: dict[str, Any]) -> dict[str, Any]:
    """Run one SQL node as the submitting role; commits with its completion record."""
    assert ctx.conn is not None
    return await node_store.run_node_sql(  # as the instance's recorded submitter, never a role named in `data`
        ctx.conn, schema=ctx.schema, instance_id=ctx.instance_id, query=data["query"],
        params=list(data.get("params") or []), search_path=data.get("search_path") or "public",
        node_id=str(data.get("node")),
    )


async def http_grant(ctx: TransactionContext, data: dict[str, Any]) -> None:
    """Before each HTTP request of a ``df.start`` graph: its submitter still holds the df.http grant."""
    assert ctx.conn is not None
    await node_store.check_http_grant(ctx.conn, instance_id=ctx.instance_id)


def builtin_orchestrations() -> list[OrchestrationDef]:
    return [OrchestrationDef(GRAPH_ORCHESTRATION, graph_orchestration)]


def builtin_activities() -> list[ActivityDef]:
    return [
        ActivityDef(SQL_ACTIVITY, sql_node, SQL_RETRY, transactional=True),
        ActivityDef(HTTP_ACTIVITY, http_node, HTTP_RETRY, transactional=False, check=http_grant),
    ]


def graph_function(name: str, graph: Any) -> Any:
    """The orchestration function that runs ``graph`` (a dsl node or graph JSON); its input is ``$input``.

    Raises ``GraphError`` if the graph is invalid.
    """
    to_json = getattr(graph, "to_json", None)
    raw = to_json() if callable(to_json) else graph
    tree = compile_graph(raw, bound=frozenset({"input"}))

    async def run(ctx: OrchestrationContext, data: Any) -> Any:
        return await run_registered(ctx, tree, data)

    run.__name__ = run.__qualname__ = f"graph_{name}"
    setattr(run, GRAPH_ATTR, tree)
    return run


async def run_registered(ctx: OrchestrationContext, tree: dict[str, Any], data: Any) -> Any:
    """Run a graph registered with ``App.graph``; ``data`` is its input (or a continue-as-new carry).

    Its loops are not paced: an app's graph is the app's own code (``df.start`` graphs are).
    """
    if isinstance(data, dict) and data.get(GRAPH_ATTR):
        bound, resume = data.get("bound") or {}, data.get("resume")
    else:
        bound, resume = {"input": data}, None
    semantics = ctx.version(SEMANTICS_CHANGE, default=1, latest=2)
    interp = Interpreter(ctx, bound=bound, semantics=semantics)
    return await interp.run_root(tree, {GRAPH_ATTR: True}, resume)


def graph_of(orchestrations: Mapping[str, OrchestrationDef], name: str) -> dict[str, Any] | None:
    """The compiled graph registered under ``name`` with ``App.graph``, if any."""
    definition = orchestrations.get(name)
    tree = getattr(definition.fn, GRAPH_ATTR, None) if definition else None
    return tree if isinstance(tree, dict) else None
