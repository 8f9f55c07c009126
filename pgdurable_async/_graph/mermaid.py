"""Node states of a graph instance, and its Mermaid rendering.

The states are the ones the interpreter recorded as ``graph_node`` facts while the
instance ran (``df.nodes`` reads the same facts, with the same rules):

* a node's own state is its latest fact (a SQL or HTTP node without one, in a history
  recorded before facts existed, takes it from its activity's events);
* a node whose latest fact precedes the latest iteration of a loop around it belongs to
  an earlier iteration: it reads ``pending`` (it will run again);
* a node that has not finished (in this iteration) under a finished ancestor was left
  behind (an untaken branch, the rest of a failed sequence, a race's loser): ``skipped``;
  so is every unfinished node once the instance itself has finished.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .._base import events as ev
from .._base.definitions import OrchestrationDef
from .._base.types import HistoryEvent, InstanceState
from .builtins import graph_of
from .compiler import children, compile_graph, walk
from .interpreter import GRAPH_ORCHESTRATION

STATES = ("pending", "running", "completed", "failed", "skipped")
_TERMINAL = ("completed", "failed")
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


def recorded_states(history: Iterable[HistoryEvent]) -> tuple[dict[str, tuple[str, tuple[int, int]]],
                                                            dict[str, tuple[int, int]]]:
    """From every execution's events: node id -> (latest state, its position), loop id -> latest iteration."""
    facts: dict[str, tuple[str, tuple[int, int]]] = {}
    iterations: dict[str, tuple[int, int]] = {}
    activities: dict[tuple[int, int], str] = {}  # (execution, task id) -> node id, for histories before facts
    fallback: dict[str, tuple[str, tuple[int, int]]] = {}
    for e in sorted(history, key=lambda e: (e.execution_id, e.seq)):
        at = (e.execution_id, e.seq)
        if e.kind == ev.GRAPH_NODE and isinstance(e.data.get("node"), str):
            facts[e.data["node"]] = (str(e.data.get("state")), at)
            if "iteration" in e.data:
                iterations[e.data["node"]] = at
        elif e.kind == ev.ACTIVITY_SCHEDULED and isinstance(e.data.get("input"), dict):
            node = e.data["input"].get("node")
            if isinstance(node, str):
                activities[(e.execution_id, e.data.get("task_id", -1))] = node
                fallback[node] = ("running", at)
        elif e.kind in (ev.ACTIVITY_COMPLETED, ev.ACTIVITY_FAILED):
            node = activities.get((e.execution_id, e.data.get("task_id", -1)))
            if node is not None:
                fallback[node] = ("completed" if e.kind == ev.ACTIVITY_COMPLETED else "failed", at)
    return {**fallback, **facts}, iterations


def node_states(
    state: InstanceState, history: Iterable[HistoryEvent], tree: dict[str, Any]
) -> dict[str, str]:
    """Every node id of ``tree`` mapped to its state, from the facts in ``history`` (all executions)."""
    facts, iterations = recorded_states(history)
    out: dict[str, str] = {}

    def visit(node: dict[str, Any], decided: bool, loops: list[str]) -> None:
        own, at = facts.get(node["id"], ("pending", (0, 0)))
        superseded = any(iterations.get(loop, (0, 0)) > at for loop in loops)
        if own in _TERMINAL and not superseded:
            value = own
        elif decided:
            value = "skipped"
        elif superseded:
            value = "pending"
        else:
            value = own
        out[node["id"]] = value
        inner = [*loops, node["id"]] if node["type"] == "loop" else loops
        for child in children(node):
            visit(child, decided or value in _TERMINAL, inner)

    visit(tree, False, [])
    if state.status.is_terminal:  # nothing runs any more
        out = {k: ("skipped" if v in ("pending", "running") else v) for k, v in out.items()}
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
        "http_multipart": f"{node.get('method')} {node.get('url')}",
        "call": node.get("name"),
        "activity": node.get("name"),
        "fan_out": f"over ${node.get('over')}" + (f", {node.get('limit')} at once" if node.get("limit") else ""),
        "if_rows": f"${node['name']} has rows" if node.get("name") else None,
        "loop": "while cond" if node.get("cond") else "forever",
    }.get(kind)
    text = kind if not detail else f"{kind}: {' '.join(str(detail).split())}"
    if node.get("result_name"):
        text += f" |=> {node['result_name']}"
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
