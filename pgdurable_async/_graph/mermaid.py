"""Node states of a graph instance, and its Mermaid rendering.

The states are exact and cost nothing at run time: the instance's recorded
history is replayed through the interpreter with an observer that notes each
node's transitions (the pure replay engine runs no I/O).  A node never reached
is ``pending``, or ``skipped`` once the instance has finished; a node still
running when the instance finished (a race's loser) is ``skipped`` too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .._base.definitions import OrchestrationDef
from .._base.types import HistoryEvent, InstanceState
from .._engine import Event, Execution, OrchestrationContext
from .builtins import graph_of, run_registered
from .compiler import children, compile_graph, walk
from .interpreter import GRAPH_ORCHESTRATION, run_graph_input

STATES = ("pending", "running", "completed", "failed", "skipped")
_STYLE = {
    "pending": "fill:#eeeeee,stroke:#9e9e9e,color:#616161",
    "running": "fill:#bbdefb,stroke:#1565c0,color:#0d47a1",
    "completed": "fill:#c8e6c9,stroke:#2e7d32,color:#1b5e20",
    "failed": "fill:#ffcdd2,stroke:#c62828,color:#b71c1c",
    "skipped": "fill:#fafafa,stroke:#bdbdbd,color:#9e9e9e,stroke-dasharray:4 3",
}


def graph_for(
    state: InstanceState, orchestrations: Mapping[str, OrchestrationDef] | None = None
) -> dict[str, Any] | None:
    """The compiled graph an instance runs: from its input (``df.start``) or the app's registry (``App.graph``)."""
    if state.name == GRAPH_ORCHESTRATION:
        data = state.input
        if isinstance(data, dict) and isinstance(data.get("graph"), dict):
            return compile_graph(data["graph"], bound=frozenset(data.get("bound") or {}))
        return None
    return graph_of(orchestrations, state.name) if orchestrations is not None else None


def node_states(
    state: InstanceState, history: Iterable[HistoryEvent], tree: dict[str, Any]
) -> dict[str, str]:
    """Every node id of ``tree`` mapped to its state, by replaying ``history``."""
    seen: dict[str, str] = {}

    def observe(node_id: str, node_state: str) -> None:
        seen[node_id] = node_state

    async def fn(ctx: OrchestrationContext, data: Any) -> Any:
        if state.name == GRAPH_ORCHESTRATION:
            return await run_graph_input(ctx, data, observe)
        return await run_registered(ctx, tree, data, observe)

    execution = Execution(fn, instance_id=state.instance_id, execution_id=state.execution_id, name=state.name)
    try:
        execution.replay(Event(e.kind, e.data, e.recorded_at) for e in history if e.recorded_at is not None)
    finally:
        execution.close()
    finished = state.status.is_terminal
    out: dict[str, str] = {}
    for node in walk(tree):
        value = seen.get(node["id"], "pending")
        if finished and value in ("pending", "running"):
            value = "skipped"
        out[node["id"]] = value
    return out


def _label(node: dict[str, Any]) -> str:
    return node_label(node).replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")


def node_label(node: dict[str, Any]) -> str:
    """A node's type and its gist (query, name, duration...), at most 60 characters, as plain text."""
    kind = node["type"]
    detail = {
        "sql": node.get("query"),
        "bind": f"as ${node.get('name')}",
        "sleep": f"{node.get('seconds')} s",
        "wait_for_schedule": node.get("cron"),
        "wait_for_signal": node.get("name") if node.get("timeout") is None
        else f"{node.get('name')} ({node.get('timeout')} s)",
        "http": f"{node.get('method')} {node.get('url')}",
        "call": node.get("name"),
        "activity": node.get("name"),
        "fan_out": f"over ${node.get('over')}" + (f", {node.get('limit')} at once" if node.get("limit") else ""),
        "if_rows": f"${node['name']} has rows" if node.get("name") else None,
        "loop": "while cond" if node.get("cond") else "forever",
    }.get(kind)
    text = kind if not detail else f"{kind}: {' '.join(str(detail).split())}"
    if len(text) > 60:
        text = text[:57] + "..."
    return text


def _edge_label(parent: dict[str, Any], index: int) -> str:
    kind = parent["type"]
    if kind in ("if", "if_rows"):
        fields = [f for f in ("cond", "then", "else") if parent.get(f) is not None]
        return fields[index] if index < len(fields) else ""
    if kind == "loop":
        return "body" if index == 0 else "cond"
    if kind == "seq":
        return str(index + 1)
    return ""


def to_mermaid(tree: dict[str, Any], states: dict[str, str] | None = None) -> str:
    """A ``flowchart TD`` of the graph, each node classed (and labelled) by its state."""
    states = states or {}
    lines = ["flowchart TD"]
    for node in walk(tree):
        key = node["id"].replace(".", "_")
        state = states.get(node["id"], "pending")
        lines.append(f'    {key}["{_label(node)}<br/><i>{state}</i>"]:::{state}')
    for node in walk(tree):
        for i, child in enumerate(children(node)):
            label = _edge_label(node, i)
            arrow = f"-->|{label}|" if label else "-->"
            lines.append(f"    {node['id'].replace('.', '_')} {arrow} {child['id'].replace('.', '_')}")
    for state in STATES:
        lines.append(f"    classDef {state} {_STYLE[state]}")
    return "\n".join(lines)
