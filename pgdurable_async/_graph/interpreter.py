"""The graph interpreter: one built-in orchestration that walks graph JSON.

Every leaf is a durable primitive (see :mod:`.leaves`), so each node's result is
checkpointed in history and replay resumes exactly where a crash stopped.
``seq`` awaits in order, ``join`` uses ``ctx.all``, ``race`` uses ``ctx.any``,
``fan_out`` uses ``ctx.all(limit=...)``.  A loop on the root's spine (the root
itself, or a step of a root ``seq``) continues as new every
:data:`LOOP_GENERATION` iterations, carrying the bound results, so a forever
loop keeps a bounded history.

Node states are recorded, not guessed: every change of a node's state is one
``graph_node`` history fact (see :mod:`pgdurable_async._base.events`), written
as it happens.  ``df.nodes``, ``df.explain`` and the Mermaid picture read them.

Semantics version 2 (what every instance started by this code runs; an instance
whose history predates it replays with version 1): a race's losers and a failed
(or broken) join's other branches stop at their next node and are recorded
``failed`` with a ``cancelled: ...`` reason; a loop that ends because its
condition is false returns its body's last result; and in graphs started with
``df.start`` a loop iteration takes at least :data:`MIN_LOOP_ITERATION` seconds,
as pg_durable paces them (a loop with no real wait cannot spin).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Any

from .._base import events as ev
from .._base.errors import ActivityError, Cancelled, GraphError, SubOrchestrationError
from .._engine import ContinueAsNew, OrchestrationContext
from .compiler import compile_graph, walk
from .leaves import HTTP_ACTIVITY, SQL_ACTIVITY, LeafNodes
from .references import columns_of, is_rows, public

__all__ = ["GRAPH_ORCHESTRATION", "HTTP_ACTIVITY", "SQL_ACTIVITY", "Interpreter", "run_graph_input", "truthy"]

GRAPH_ORCHESTRATION = "pgdurable.graph"
LOOP_GENERATION = 50  # iterations per execution of a spine loop
MIN_LOOP_ITERATION = 1.0  # seconds: pg_durable's floor on one loop iteration (df.start graphs)
SEMANTICS_CHANGE = "pgdurable.graph.semantics"
DEFAULT_SEARCH_PATH = '"$user", public'
_UNSET: Any = object()


class BreakLoop(Exception):  # noqa: N818 - control flow
    def __init__(self, value: Any) -> None:
        super().__init__("break")
        self.value = value


class BranchLost(BaseException):  # noqa: N818 - control flow: a branch nobody waits for any more
    """Raised in a race's loser (or a stopped join's branch) when it reaches its next node."""


class _Scope:
    """One branch of a race or join; ``lost`` is set once nobody waits for the branch."""

    __slots__ = ("parent", "lost")

    def __init__(self, parent: _Scope | None) -> None:
        self.parent = parent
        self.lost: str | None = None

    def lost_reason(self) -> str | None:
        scope: _Scope | None = self
        while scope is not None:
            if scope.lost is not None:
                return scope.lost
            scope = scope.parent
        return None


def truthy(value: Any) -> bool:
    """pg_durable's condition rule: the first column of the first row of a rows result (no rows: false)."""
    if is_rows(value):
        if not value["rows"]:
            return False
        columns = columns_of(value)
        if columns and isinstance(value["rows"][0], dict):
            value = value["rows"][0].get(columns[0][0])
    return _truthy_value(value)


def _truthy_value(value: Any) -> bool:
    """false, 0, '', null, [], {} and the strings false/f/no or a zero number are falsy."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, (int, float)):
        return value != 0
    if not isinstance(value, str):
        return bool(value)
    text = value.strip().lower()
    if text in ("", "false", "f", "no"):
        return False
    if text in ("true", "t", "yes") or "_" in text:
        return True
    try:
        return float(text) != 0
    except ValueError:
        return True


def error_text(exc: BaseException) -> str:
    """The message a failed node records: the remote message of an activity, not our wrapper's."""
    if isinstance(exc, ActivityError):
        return str(getattr(exc, "error_message", "") or exc)
    error = getattr(exc, "error", None)
    if isinstance(exc, SubOrchestrationError) and isinstance(error, dict):
        return str(error.get("message") or exc)
    if isinstance(exc, Cancelled):
        return f"cancelled: {exc.reason}" if exc.reason else "cancelled"
    return str(exc) or type(exc).__name__


def _stop_reason(exc: BaseException) -> str:
    if isinstance(exc, Cancelled):
        return error_text(exc)
    if isinstance(exc, BreakLoop):
        return "cancelled: a parallel branch broke out of the loop"
    return "cancelled: a parallel branch failed"


class Interpreter(LeafNodes):
    """Walks one compiled graph for one execution."""

    def __init__(
        self,
        ctx: OrchestrationContext,
        *,
        bound: dict[str, Any] | None = None,
        variables: dict[str, str] | None = None,
        label: str | None = None,
        role: str | None = None,
        search_path: str | None = None,
        semantics: int = 2,
        min_iteration: float = 0.0,
    ) -> None:
        self.ctx = ctx
        self.bound: dict[str, Any] = dict(bound or {})
        self.label = label
        # pg_durable's system variables win over df.setvar variables of the same name
        self.variables = {**(variables or {}), "sys_instance_id": ctx.instance_id, "sys_label": label or ""}
        self.role = role
        self.search_path = search_path or DEFAULT_SEARCH_PATH
        self.semantics = semantics
        self.min_iteration = min_iteration if semantics >= 2 else 0.0
        self.states: dict[str, str] = {}  # node id -> last recorded state (shared by branch copies)
        self.scope: _Scope | None = None
        self.record = True

    # -- node facts -----------------------------------------------------------------
    def _note_state(self, node: dict[str, Any], state: str, *, result: Any = _UNSET, error: str | None = None,
                    iteration: int | None = None) -> None:
        """Record a node's new state (one ``graph_node`` fact; nothing when it did not change)."""
        if not self.record:
            return
        node_id = node["id"]
        if self.states.get(node_id) == state and iteration is None:
            return
        self.states[node_id] = state
        fact: dict[str, Any] = {"node": node_id, "state": state}
        if iteration is not None:
            fact["iteration"] = iteration
        if error is not None:
            fact["error"] = error
        if result is not _UNSET and result is not None:
            if self.ctx._note(ev.GRAPH_NODE, {**fact, "result": public(result)}):
                return
            fact["result_omitted"] = True  # too large to record twice; the activity's own event holds it
        self.ctx._note(ev.GRAPH_NODE, fact)

    def _stop_running(self, node: dict[str, Any], reason: str) -> None:
        """The loops of ``node``'s subtree still running are recorded failed (nobody waits for them).

        As pg_durable shows them: a stopped loop is a terminal ``failed`` with the reason; any
        other node left running reads ``skipped`` under its finished ancestor.
        """
        for sub in walk(node):
            if sub["type"] == "loop" and self.states.get(sub["id"]) == "running":
                self._note_state(sub, "failed", error=reason)

    def _copy(self, *, scope: _Scope | None = None, bound: dict[str, Any] | None = None) -> Interpreter:
        twin = copy.copy(self)  # shares ctx, bound, states (unless given)
        if scope is not None:
            twin.scope = scope
        if bound is not None:
            twin.bound = bound
            twin.record = False
        return twin

    def _item_copy(self, bound: dict[str, Any]) -> Interpreter:
        return self._copy(bound=bound)

    # -- entry ----------------------------------------------------------------------
    async def run_root(self, tree: dict[str, Any], carry: dict[str, Any], resume: dict[str, Any] | None) -> Any:
        """Run the root; ``carry`` is the input a spine loop continues as new with."""
        if tree["type"] == "loop":
            return public(await self._spine_loop(tree, carry, resume))
        if tree["type"] == "seq" and tree.get("result_name") is None:

            async def steps() -> Any:
                result: Any = None
                skipping = resume is not None
                for step in tree["steps"]:
                    if skipping and resume is not None and step["id"] != resume["node"]:
                        for sub in walk(step):  # done in an earlier execution (its facts are there)
                            self.states[sub["id"]] = "completed"
                        continue
                    if step["type"] == "loop":
                        result = await self._spine_loop(step, carry, resume if skipping else None)
                    else:
                        result = await self.run(step)
                    skipping = False
                return result

            if resume is not None:
                self.states[tree["id"]] = "running"  # recorded by the first execution
            return public(await self.run(tree, steps))
        return public(await self.run(tree))

    async def _spine_loop(self, node: dict[str, Any], carry: dict[str, Any], resume: dict[str, Any] | None) -> Any:
        start = int(resume["iteration"]) if resume else 0

        def roll_over(iteration: int) -> None:
            if iteration - start >= LOOP_GENERATION:
                self.ctx.continue_as_new(
                    {**carry, "bound": self.bound, "resume": {"node": node["id"], "iteration": iteration}}
                )

        return await self.run(node, lambda: self._loop(node, start, roll_over))

    # -- dispatch -----------------------------------------------------------------------
    async def run(self, node: dict[str, Any], body: Callable[[], Coroutine[Any, Any, Any]] | None = None) -> Any:
        """Run one node (``body`` overrides its handler), recording its state changes."""
        self._check_scope()
        if node["type"] != "loop":  # a loop records `running` per iteration
            self._note_state(node, "running")
        try:
            result = await (body() if body is not None else getattr(self, "_" + node["type"])(node))
        except BreakLoop as brk:
            self._check_scope()
            self._note_state(node, "completed", result=brk.value)
            raise
        except (BranchLost, ContinueAsNew, GeneratorExit):
            raise  # a lost branch was recorded when it lost; a continuing loop stays running
        except BaseException as exc:
            if not self._lost():
                self._note_state(node, "failed", error=error_text(exc))
            raise
        self._check_scope()  # a loser whose step finished after the race was decided goes no further
        name = node.get("result_name")
        if name:
            self.bound[name] = result
        self._note_state(node, "completed", result=result)
        return result

    def _lost(self) -> bool:
        return self.scope is not None and self.scope.lost_reason() is not None

    def _check_scope(self) -> None:
        reason = self.scope.lost_reason() if self.scope is not None else None
        if reason is not None:
            raise BranchLost(reason)

    async def _seq(self, node: dict[str, Any]) -> Any:
        result = None
        for step in node["steps"]:
            result = await self.run(step)
        return result

    def _branches(self, node: dict[str, Any]) -> tuple[list[_Scope], list[Coroutine[Any, Any, Any]], list[int]]:
        """One scope per branch, its coroutine, and the order in which branches finish."""
        scopes = [_Scope(self.scope) for _ in node["branches"]]
        finished: list[int] = []

        async def branch(index: int) -> Any:
            try:
                return await self._copy(scope=scopes[index]).run(node["branches"][index])
            finally:
                finished.append(index)

        return scopes, [branch(i) for i in range(len(scopes))], finished

    def _stop(self, node: dict[str, Any], scopes: list[_Scope], keep: set[int], reason: str) -> None:
        if self.semantics < 2:
            return
        for index, scope in enumerate(scopes):
            if index not in keep:
                scope.lost = reason
                self._stop_running(node["branches"][index], reason)

    async def _join(self, node: dict[str, Any]) -> Any:
        scopes, branches, finished = self._branches(node)
        try:
            return await self.ctx.all(branches)
        except (ContinueAsNew, GeneratorExit):
            raise
        except BaseException as exc:
            self._stop(node, scopes, set(finished), _stop_reason(exc))
            raise

    async def _race(self, node: dict[str, Any]) -> Any:
        scopes, branches, finished = self._branches(node)
        try:
            winner = await self.ctx.any(branches)
        except (ContinueAsNew, GeneratorExit):
            raise
        except BaseException as exc:
            self._stop(node, scopes, set(finished), _stop_reason(exc))
            raise
        first = finished[0] if finished else -1
        self._stop(node, scopes, {first}, f"cancelled: lost the race to branch {first + 1}")
        return winner.result()

    async def _bind(self, node: dict[str, Any]) -> Any:  # graphs of the Python DSL (and of df before v10)
        result = await self.run(node["node"])
        self.bound[node["name"]] = result
        return result

    async def _if(self, node: dict[str, Any]) -> Any:
        chosen = node["then"] if truthy(await self.run(node["cond"])) else node.get("else")
        return None if chosen is None else await self.run(chosen)

    async def _if_rows(self, node: dict[str, Any]) -> Any:
        if node.get("cond") is not None:
            value = await self.run(node["cond"])
        else:
            value = self.bound.get(node["name"])
        has_rows = value["row_count"] > 0 if is_rows(value) else bool(value)
        chosen = node["then"] if has_rows else node.get("else")
        return None if chosen is None else await self.run(chosen)

    async def _loop(
        self, node: dict[str, Any], start: int = 0, roll_over: Callable[[int], None] | None = None
    ) -> Any:
        iteration = start
        result: Any = None
        while True:
            if roll_over is not None:
                roll_over(iteration)
            self._note_state(node, "running", iteration=iteration)
            began = self.ctx.now()
            try:
                result = await self.run(node["body"])
            except BreakLoop as brk:
                return brk.value
            except Exception:
                if not node.get("continue_on_failure"):
                    raise
            iteration += 1
            if node.get("cond") is not None:
                try:
                    go_on = truthy(await self.run(node["cond"]))
                except BreakLoop as brk:  # df.break() in the condition ends the loop with its value
                    return brk.value
                if not go_on:
                    return result if self.semantics >= 2 else None
            elapsed = (self.ctx.now() - began).total_seconds()
            if elapsed < self.min_iteration:
                await self.ctx.sleep(timedelta(seconds=self.min_iteration - elapsed))

    async def _break(self, node: dict[str, Any]) -> Any:
        raise BreakLoop(node.get("value"))


async def run_graph_input(ctx: OrchestrationContext, data: Any) -> Any:
    """The body of ``pgdurable.graph``: ``{graph, vars, role, search_path, label, bound?, resume?}``."""
    if not isinstance(data, dict) or "graph" not in data:
        raise GraphError("pgdurable.graph needs an input object with a 'graph'")
    bound = data.get("bound") or {}
    tree = compile_graph(data["graph"], bound=frozenset(bound), submitted=True)
    semantics = ctx.version(SEMANTICS_CHANGE, default=1, latest=2)
    interp = Interpreter(ctx, bound=bound, variables=data.get("vars"), label=data.get("label"), role=data.get("role"),
                         search_path=data.get("search_path"), semantics=semantics, min_iteration=MIN_LOOP_ITERATION)
    carry = {k: v for k, v in data.items() if k not in ("bound", "resume")}
    return await interp.run_root(tree, carry, data.get("resume"))
