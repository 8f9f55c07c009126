"""Graph JSON: the one representation both graph front ends compile to.

The SQL ``df`` layer (``schema/0002_graph.sql``) and :mod:`pgdurable_async.dsl`
both build a tree of JSON nodes, each an object with a ``"type"``::

    sql {query}                    seq {steps}              join {branches}
    race {branches}                bind {name, node}        if {cond, then, else}
    if_rows {name | cond, then, else}                       loop {body, cond, continue_on_failure}
    break {value}                  sleep {seconds}          wait_for_schedule {cron}
    wait_for_signal {name, timeout}                         http {url, method, body, headers, timeout}
    http_multipart {url, method, parts, headers, timeout}   call {name, input}
    activity {name, input, key?, priority?}                  fan_out {over, step, limit, as}

Any node may also carry ``result_name`` (what ``df.as`` / ``|=>`` set, as in pg_durable):
its result is bound under that name once it completes, like a ``bind`` around it.

:func:`compile_graph` checks a tree (unknown types, malformed fields, bad cron,
``$name`` references used before a ``bind`` binds them on every path), flattens
nested ``seq`` nodes and gives every node a stable path-based ``id`` (``n0``,
``n0.1``, ...).  It raises :class:`GraphError` before anything is written, also for
what the worker could not carry: a graph more than :data:`MAX_DEPTH` nodes deep (seqs
flattened), JSON nested more than :data:`MAX_JSON_DEPTH` levels, a sleep or timeout
beyond :data:`MAX_SECONDS`, NaN, a NUL character.  ``df.start`` makes the same checks
in SQL (``df._check``), so a graph it accepts is one the worker runs.  Nothing here
recurses deeper than the node depth: values are copied iteratively.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from .._base.errors import GraphError
from .._base.names import is_reserved
from .tokens import references

NODE_TYPES = frozenset({
    "sql", "seq", "join", "race", "bind", "if", "if_rows", "loop", "break", "sleep",
    "wait_for_schedule", "wait_for_signal", "http", "http_multipart", "call", "activity", "fan_out",
})
MAX_DEPTH = 256  # nodes from the root to the deepest leaf, nested seqs flattened (as in pg_durable)
MAX_JSON_DEPTH = 2 * MAX_DEPTH + 88  # JSON levels in a compiled graph (a join nests two per node)
MAX_SECONDS = 100 * 366 * 86400  # the longest sleep or timeout (100 years): a timer must fit in a datetime
HTTP_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"})
# Fields holding child nodes, in id order.
_CHILD_FIELDS: dict[str, tuple[str, ...]] = {
    "bind": ("node",),
    "if": ("cond", "then", "else"),
    "if_rows": ("cond", "then", "else"),
    "loop": ("body", "cond"),
    "fan_out": ("step",),
}


def children(node: dict[str, Any]) -> list[dict[str, Any]]:
    """The child nodes of a compiled node, in id order (absent optional children skipped)."""
    kind = node["type"]
    if kind == "seq":
        return list(node["steps"])
    if kind in ("join", "race"):
        return list(node["branches"])
    return [node[f] for f in _CHILD_FIELDS.get(kind, ()) if node.get(f) is not None]


def walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every node of a compiled tree, depth first, parents before children."""
    yield node
    for child in children(node):
        yield from walk(child)


def compile_graph(graph: Any, *, bound: frozenset[str] = frozenset(), submitted: bool = False) -> dict[str, Any]:
    """A checked, id-stamped copy of ``graph`` (see the module docstring).

    ``submitted``: the graph came from a role (``df.start``), not from the app's code:
    calls of the built-ins (``pgdurable.*``) are refused (``df.start`` checked the grants
    for HTTP and activity nodes when it accepted the graph).
    """
    if not isinstance(graph, dict):
        raise GraphError(f"a graph node must be a JSON object, got {type(graph).__name__}")
    tree = _normalize(graph, "n0", 1, 1)
    _check_bindings(tree, set(bound))
    if submitted:
        _check_submitted(tree)
    return tree


def _check_submitted(tree: dict[str, Any]) -> None:
    for node in walk(tree):
        if node["type"] in ("call", "activity") and is_reserved(node["name"]):
            raise GraphError(f"{node['name']} is a built-in and cannot be called", node_id=node["id"])


# -- normalisation --------------------------------------------------------------------
def _too_deep(node_id: str) -> GraphError:
    return GraphError(f"the graph is more than {MAX_DEPTH} nodes deep (the limit is {MAX_DEPTH})", node_id=node_id)


def _normalize(raw: Any, node_id: str, depth: int, level: int) -> dict[str, Any]:
    """A checked copy of the node ``raw``, ``depth`` nodes and ``level`` JSON levels below the root.

    The node depth is checked before anything else, so the recursion is bounded; values in
    fields that hold no nodes are copied without recursion, at most :data:`MAX_JSON_DEPTH` deep.
    """
    if depth > MAX_DEPTH:
        raise _too_deep(node_id)
    node: Any = raw
    if isinstance(node, str):  # a bare string in a node position is SQL (auto-wrap)
        node = {"type": "sql", "query": node}
    if not isinstance(node, dict):
        raise GraphError(f"a graph node must be a JSON object, got {type(node).__name__}", node_id=node_id)
    kind = node.get("type")
    if not isinstance(kind, str) or kind not in NODE_TYPES:
        raise GraphError(f"unknown node type {_show(kind)}; known: {', '.join(sorted(NODE_TYPES))}", node_id=node_id)
    child_fields = _CHILD_FIELDS.get(kind, ())
    nodes_in = {"seq": ("steps",), "join": ("branches",), "race": ("branches",)}.get(kind, child_fields)
    node = {k: v if k in nodes_in else _copy_value(v, level + 1, node_id) for k, v in node.items()}
    node["id"] = node_id
    checked: dict[str, Any] = node
    if kind == "seq":
        steps = _flatten_seq(_list(node, "steps", node_id), node_id)
        if not steps:
            raise GraphError("a seq needs at least one step", node_id=node_id)
        node["steps"] = [_normalize(s, f"{node_id}.{i}", depth + 1, level + 2) for i, s in enumerate(steps)]
    elif kind in ("join", "race"):
        branches = _list(node, "branches", node_id)
        if not branches:
            raise GraphError(f"a {kind} needs at least one branch", node_id=node_id)
        node["branches"] = [_normalize(b, f"{node_id}.{i}", depth + 1, level + 2) for i, b in enumerate(branches)]
    else:
        for i, field in enumerate(child_fields):
            if node.get(field) is not None:
                node[field] = _normalize(node[field], f"{node_id}.{i}", depth + 1, level + 1)
    _check_fields(checked, node_id)
    return checked


def _copy_value(value: Any, level: int, node_id: str) -> Any:
    """A copy of a JSON value that starts ``level`` JSON levels deep, checked for what the store can hold.

    Iterative, so a value nested thousands of levels deep costs no recursion.  Raises
    :class:`GraphError` past :data:`MAX_JSON_DEPTH`, and for a NUL character, an integer
    beyond 64 bits or a NaN / infinite float (PostgreSQL or JSON cannot hold them).
    """
    if not isinstance(value, (dict, list, tuple)):
        return _leaf(value, node_id)
    root: Any = {} if isinstance(value, dict) else []
    stack: list[tuple[Any, Any, int]] = [(value, root, level)]
    while stack:
        source, target, at = stack.pop()
        if at > MAX_JSON_DEPTH:
            raise GraphError(f"the graph's JSON nests more than {MAX_JSON_DEPTH} levels deep", node_id=node_id)
        items = source.items() if isinstance(source, dict) else enumerate(source)
        for key, item in items:
            copy: Any = _leaf(item, node_id)
            if isinstance(item, (dict, list, tuple)):
                copy = {} if isinstance(item, dict) else []
                stack.append((item, copy, at + 1))
            if isinstance(target, dict):
                target[_leaf(key, node_id)] = copy
            else:
                target.append(copy)
    return root


_INT64 = range(-(2**63), 2**64)  # orjson writes signed and unsigned 64-bit integers


def _leaf(value: Any, node_id: str) -> Any:
    if isinstance(value, str):
        if "\x00" in value:
            raise GraphError("the graph holds a NUL character, which PostgreSQL cannot store", node_id=node_id)
    elif isinstance(value, bool):
        pass
    elif isinstance(value, int):
        if value not in _INT64:
            raise GraphError("the graph holds an integer beyond 64 bits", node_id=node_id)
    elif isinstance(value, float) and not math.isfinite(value):
        raise GraphError(f"the graph holds {value}, which JSON cannot represent", node_id=node_id)
    return value


def _flatten_seq(steps: list[Any], node_id: str) -> list[Any]:
    """The steps of a seq with the steps of the seqs nested in it spliced in (iteratively)."""
    flat: list[Any] = []
    stack: list[tuple[Iterator[Any], int]] = [(iter(steps), id(steps))]
    open_seqs = {id(steps)}  # the step lists being spliced: one seen again is a cycle
    while stack:
        for step in stack[-1][0]:
            inner = (step.get("steps") if isinstance(step, dict) and step.get("type") == "seq"
                     and step.get("result_name") is None else None)  # a named seq keeps its own result
            if isinstance(inner, list):
                if id(inner) in open_seqs:
                    raise GraphError("a seq contains itself", node_id=node_id)
                stack.append((iter(inner), id(inner)))
                open_seqs.add(id(inner))
                break
            flat.append(step)
        else:
            open_seqs.discard(stack.pop()[1])
    return flat


def _list(node: dict[str, Any], field: str, node_id: str) -> list[Any]:
    value = node.get(field)
    if not isinstance(value, list):
        raise GraphError(f"{node['type']}.{field} must be a list", node_id=node_id)
    return value


def _text(node: dict[str, Any], field: str, node_id: str, *, optional: bool = False) -> None:
    value = node.get(field)
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        raise GraphError(f"{node['type']}.{field} must be a non-empty string", node_id=node_id)


def _number(node: dict[str, Any], field: str, node_id: str, *, optional: bool = False,
            minimum: float = 0, maximum: float = MAX_SECONDS) -> None:
    value = node.get(field)
    if value is None and optional:
        return
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, float) and not math.isfinite(value)) or not minimum <= value <= maximum):
        raise GraphError(f"{node['type']}.{field} must be a number from {minimum:g} to {maximum:g}", node_id=node_id)


def _check_fields(node: dict[str, Any], node_id: str) -> None:
    kind = node["type"]
    name = node.get("result_name")
    if name is not None and not (isinstance(name, str) and _is_identifier(name)):
        raise GraphError(f"result_name {name!r} is not a valid identifier", node_id=node_id)
    if kind == "sql":
        _text(node, "query", node_id)
    elif kind == "bind":
        _text(node, "name", node_id)
        if not _is_identifier(node["name"]):
            raise GraphError(f"bind name {node['name']!r} must be an identifier", node_id=node_id)
        if node.get("node") is None:
            raise GraphError("bind needs a node", node_id=node_id)
    elif kind == "if":
        if node.get("cond") is None or node.get("then") is None:
            raise GraphError("if needs cond and then", node_id=node_id)
    elif kind == "if_rows":
        if node.get("then") is None or (node.get("cond") is None and not isinstance(node.get("name"), str)):
            raise GraphError("if_rows needs a result name (or a cond node) and then", node_id=node_id)
    elif kind == "loop":
        if node.get("body") is None:
            raise GraphError("loop needs a body", node_id=node_id)
        node["continue_on_failure"] = bool(node.get("continue_on_failure", False))
    elif kind == "sleep":
        _number(node, "seconds", node_id)
    elif kind == "wait_for_schedule":
        _text(node, "cron", node_id)
        check_cron(node["cron"], node_id)
    elif kind == "wait_for_signal":
        _text(node, "name", node_id)
        _number(node, "timeout", node_id, optional=True)
    elif kind in ("http", "http_multipart"):
        _text(node, "url", node_id)
        method = node.get("method") or "POST"
        if not isinstance(method, str) or method.upper() not in HTTP_METHODS:
            raise GraphError(f"unsupported HTTP method {_show(method)}", node_id=node_id)
        method = method.upper()
        node["method"] = method
        _number(node, "timeout", node_id, optional=True)
        if node.get("headers") is not None and not isinstance(node["headers"], dict):
            raise GraphError("http.headers must be a JSON object", node_id=node_id)
        if kind == "http_multipart" and method not in ("POST", "PUT", "PATCH"):
            raise GraphError(f"unsupported HTTP method {method!r} for multipart (POST, PUT or PATCH)",
                             node_id=node_id)
        if kind == "http_multipart" and not (
            isinstance(node.get("parts"), list) and node["parts"]
            and all(isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("data_b64"), str)
                    for p in node["parts"])):
            raise GraphError("http_multipart.parts must be a non-empty list of {name, data_b64, ...} objects",
                             node_id=node_id)
    elif kind in ("call", "activity"):
        _text(node, "name", node_id)
        if kind == "activity" and node.get("key") is not None and not isinstance(node["key"], str):
            raise GraphError("activity.key must be a string (or a $name reference)", node_id=node_id)
        priority = node.get("priority")
        if kind == "activity" and priority is not None and (isinstance(priority, bool)
                                                            or not isinstance(priority, int)):
            raise GraphError("activity.priority must be an integer", node_id=node_id)
    elif kind == "fan_out":
        _text(node, "over", node_id)
        if node.get("step") is None:
            raise GraphError("fan_out needs a step", node_id=node_id)
        _number(node, "limit", node_id, optional=True, minimum=1, maximum=math.inf)
        node.setdefault("as", "item")
        if not isinstance(node["as"], str) or not _is_identifier(node["as"]):
            raise GraphError(f"fan_out.as {_show(node['as'])} must be an identifier", node_id=node_id)


def _show(value: Any) -> str:
    """A short repr of any value for a message (a huge integer has no repr)."""
    try:
        text = repr(value)
    except ValueError:
        return f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def _is_identifier(name: str) -> bool:
    return bool(name) and (name[0].isalpha() or name[0] == "_") and all(c.isalnum() or c == "_" for c in name)


def check_cron(expr: str, node_id: str | None = None) -> None:
    """Raise :class:`GraphError` if ``expr`` is not a valid 5-field cron expression."""
    try:
        from cronsim import CronSim, CronSimError
    except ImportError:
        raise GraphError(
            "wait_for_schedule needs the cronsim package (a dependency of pgdurable_async): reinstall the package",
            node_id=node_id
        ) from None
    from datetime import UTC, datetime

    if len(expr.split()) != 5:
        raise GraphError(f"bad cron expression {expr!r}: expected 5 fields", node_id=node_id)
    try:
        CronSim(expr, datetime.now(UTC))
    except CronSimError as exc:
        raise GraphError(f"bad cron expression {expr!r}: {exc}", node_id=node_id) from None


# -- reference checking -----------------------------------------------------------------
def _texts_of(node: dict[str, Any]) -> list[str]:
    """The strings of a node that may hold ``$name`` references."""
    kind = node["type"]
    if kind == "sql":
        return [node["query"]]
    if kind in ("http", "http_multipart"):
        out = [node["url"]]
        if isinstance(node.get("body"), str):
            out.append(node["body"])
        out.extend(str(v) for v in (node.get("headers") or {}).values())
        out.extend(p["data_b64"] for p in node.get("parts") or [] if isinstance(p, dict)
                   and isinstance(p.get("data_b64"), str))
        return out
    return []


def _check_bindings(node: dict[str, Any], bound: set[str]) -> set[str]:
    """Check references against what is bound on every path; return what is bound after."""
    after = _check_node_bindings(node, bound)
    name = node.get("result_name")
    return after | {name} if isinstance(name, str) else after


def _check_node_bindings(node: dict[str, Any], bound: set[str]) -> set[str]:
    kind, node_id = node["type"], node["id"]
    for text in _texts_of(node):
        for ref in references(text, sql=kind == "sql"):
            if ref.name not in bound and not ref.null_safe:
                raise GraphError(
                    f"${ref.name} is used before it is bound on every path (bind it with |=> '{ref.name}')",
                    node_id=node_id,
                )
    if kind == "seq":
        for step in node["steps"]:
            bound = _check_bindings(step, bound)
        return bound
    if kind == "join":
        after = set(bound)
        for branch in node["branches"]:
            after |= _check_bindings(branch, set(bound))
        return after
    if kind == "race":
        outs = [_check_bindings(b, set(bound)) for b in node["branches"]]
        return set.intersection(*outs)
    if kind == "bind":
        return _check_bindings(node["node"], bound) | {node["name"]}
    if kind in ("if", "if_rows"):
        if kind == "if_rows" and node.get("cond") is None and node["name"] not in bound:
            raise GraphError(f"if_rows tests {node['name']!r}, which is not bound here", node_id=node_id)
        if node.get("cond") is not None:
            bound = _check_bindings(node["cond"], bound)
        then = _check_bindings(node["then"], set(bound))
        other = _check_bindings(node["else"], set(bound)) if node.get("else") is not None else set(bound)
        return then & other
    if kind == "loop":  # the body runs at least once; the condition after each iteration of it
        inner = _check_bindings(node["body"], set(bound))
        if node.get("cond") is not None:
            inner = _check_bindings(node["cond"], inner)
        return inner
    if kind == "wait_for_signal":
        return bound | {node["name"]}
    if kind == "fan_out":
        if node["over"] not in bound:
            raise GraphError(f"fan_out over {node['over']!r}, which is not bound here", node_id=node_id)
        _check_bindings(node["step"], bound | {node["as"]})
        return bound
    return bound
