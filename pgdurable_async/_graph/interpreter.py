"""The graph interpreter: one built-in orchestration that walks graph JSON.

Every leaf is a durable primitive (a transactional SQL activity, an HTTP
activity, a timer, an event wait, a child orchestration), so each node's result
is checkpointed in history and replay resumes exactly where a crash stopped.
``seq`` awaits in order, ``join`` uses ``ctx.all``, ``race`` uses ``ctx.any``,
``fan_out`` uses ``ctx.all(limit=...)``.  A loop on the root's spine (the root
itself, or a step of a root ``seq``) continues as new every
:data:`LOOP_GENERATION` iterations, carrying the bound results, so a forever
loop keeps a bounded history.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from .._base.errors import GraphError
from .._base.errors import TimeoutError as DurableTimeout
from .._engine import ContinueAsNew, OrchestrationContext
from .._store.node_store import COLUMNS_KEY
from .compiler import compile_graph, walk
from .references import ReferenceError_, columns_of, is_rows, public, rewrite, scalar, substitute_text
from .tokens import references

GRAPH_ORCHESTRATION = "pgdurable.graph"
SQL_ACTIVITY = "pgdurable.graph.sql"
HTTP_ACTIVITY = "pgdurable.graph.http"
LOOP_GENERATION = 50  # iterations per execution of a spine loop
DEFAULT_SEARCH_PATH = '"$user", public'

Observer = Callable[[str, str], None]  # (node id, state)


class BreakLoop(Exception):  # noqa: N818 - control flow
    def __init__(self, value: Any) -> None:
        super().__init__("break")
        self.value = value


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


class Interpreter:
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
        observer: Observer | None = None,
    ) -> None:
        self.ctx = ctx
        self.bound: dict[str, Any] = dict(bound or {})
        self.label = label
        # pg_durable's system variables win over df.setvar variables of the same name
        self.variables = {**(variables or {}), "sys_instance_id": ctx.instance_id, "sys_label": label or ""}
        self.role = role
        self.search_path = search_path or DEFAULT_SEARCH_PATH
        self.observer = observer

    def _mark(self, node: dict[str, Any], state: str) -> None:
        if self.observer is not None:
            self.observer(node["id"], state)

    # -- entry ----------------------------------------------------------------------
    async def run_root(self, tree: dict[str, Any], carry: dict[str, Any], resume: dict[str, Any] | None) -> Any:
        """Run the root; ``carry`` is the input a spine loop continues as new with."""
        if tree["type"] == "loop":
            return public(await self._spine_loop(tree, carry, resume))
        if tree["type"] == "seq":
            self._mark(tree, "running")
            result: Any = None
            skipping = resume is not None
            for step in tree["steps"]:
                if skipping and resume is not None and step["id"] != resume["node"]:
                    self._mark_done_subtree(step)
                    continue
                if step["type"] == "loop":
                    result = await self._spine_loop(step, carry, resume if skipping else None)
                else:
                    result = await self.run(step)
                skipping = False
            self._mark(tree, "completed")
            return public(result)
        return public(await self.run(tree))

    def _mark_done_subtree(self, node: dict[str, Any]) -> None:
        for sub in walk(node):
            self._mark(sub, "completed")

    async def _spine_loop(self, node: dict[str, Any], carry: dict[str, Any], resume: dict[str, Any] | None) -> Any:
        start = int(resume["iteration"]) if resume else 0

        def roll_over(iteration: int) -> None:
            if iteration - start >= LOOP_GENERATION:
                self.ctx.continue_as_new(
                    {**carry, "bound": self.bound, "resume": {"node": node["id"], "iteration": iteration}}
                )

        self._mark(node, "running")
        try:
            result = await self._loop(node, start, roll_over)
        except BaseException as exc:
            if not isinstance(exc, ContinueAsNew):
                self._mark(node, "failed")
            raise
        self._mark(node, "completed")
        return result

    # -- dispatch -----------------------------------------------------------------------
    async def run(self, node: dict[str, Any]) -> Any:
        self._mark(node, "running")
        try:
            result = await getattr(self, "_" + node["type"])(node)
        except BreakLoop:
            self._mark(node, "completed")
            raise
        except BaseException:
            self._mark(node, "failed")
            raise
        self._mark(node, "completed")
        return result

    async def _sql(self, node: dict[str, Any]) -> Any:
        try:
            query, params = rewrite(node["query"], self.bound, self.variables)
        except ReferenceError_ as exc:
            raise GraphError(str(exc), node_id=node["id"]) from None
        return await self.ctx.call_activity(
            SQL_ACTIVITY,
            # "role" stays in the input for the histories recorded before it was ignored (replay compares
            # inputs); the store runs the statement as the instance's recorded submitter.
            {"node": node["id"], "query": query, "params": params, "role": self.role,
             "search_path": self.search_path},
        )

    async def _seq(self, node: dict[str, Any]) -> Any:
        result = None
        for step in node["steps"]:
            result = await self.run(step)
        return result

    async def _join(self, node: dict[str, Any]) -> Any:
        return await self.ctx.all([self.run(b) for b in node["branches"]])

    async def _race(self, node: dict[str, Any]) -> Any:
        winner = await self.ctx.any([self.run(b) for b in node["branches"]])
        return winner.result()

    async def _bind(self, node: dict[str, Any]) -> Any:
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
        while True:
            if roll_over is not None:
                roll_over(iteration)
            try:
                await self.run(node["body"])
            except BreakLoop as brk:
                return brk.value
            except Exception:
                if not node.get("continue_on_failure"):
                    raise
            iteration += 1
            if node.get("cond") is not None and not truthy(await self.run(node["cond"])):
                return None

    async def _break(self, node: dict[str, Any]) -> Any:
        raise BreakLoop(node.get("value"))

    async def _sleep(self, node: dict[str, Any]) -> Any:
        seconds = float(node["seconds"])
        await self.ctx.sleep(timedelta(seconds=seconds))
        return {"slept": True, "seconds": int(seconds) if seconds.is_integer() else seconds}

    async def _wait_for_schedule(self, node: dict[str, Any]) -> Any:
        from cronsim import CronSim

        now = self.ctx.now()
        fire_at = next(CronSim(node["cron"], now.replace(second=0, microsecond=0)))
        if fire_at <= now:
            fire_at = next(CronSim(node["cron"], fire_at))
        await self.ctx.sleep(fire_at - now)
        return {"scheduled": True}

    async def _wait_for_signal(self, node: dict[str, Any]) -> Any:
        name = node["name"]
        timeout = node.get("timeout")
        try:
            data = await self.ctx.wait_for_event(name, timeout=None if timeout is None else float(timeout))
        except DurableTimeout:
            result: dict[str, Any] = {"signal_name": name, "timed_out": True, "data": None}
        else:
            result = dict(data) if isinstance(data, dict) else {}
            result.update({"signal_name": name, "timed_out": False, "data": data})
        self.bound[name] = result  # pg_durable: a signal's result is readable as $<signal name>
        return result

    async def _http(self, node: dict[str, Any]) -> Any:
        try:
            url = substitute_text(node["url"], self.bound, self.variables)
            body = node.get("body")
            if isinstance(body, str):
                body = substitute_text(body, self.bound, self.variables)
            headers = {k: substitute_text(str(v), self.bound, self.variables)
                       for k, v in (node.get("headers") or {}).items()}
        except ReferenceError_ as exc:
            raise GraphError(str(exc), node_id=node["id"]) from None
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme not in ("http", "https"):
            raise GraphError(f"{url!r} is not an http(s) URL (after variable substitution)", node_id=node["id"])
        return await self.ctx.call_activity(
            HTTP_ACTIVITY,
            {"node": node["id"], "url": url, "method": node.get("method", "POST"), "body": body,
             "headers": headers, "timeout": node.get("timeout") or 30},
        )

    async def _call(self, node: dict[str, Any]) -> Any:
        return await self.ctx.call_orchestration(node["name"], self._input(node.get("input")))

    async def _activity(self, node: dict[str, Any]) -> Any:
        return await self.ctx.call_activity(node["name"], self._input(node.get("input")))

    def _input(self, value: Any) -> Any:
        """Resolve ``"$name"`` / ``"$name.column"`` strings (whole values only) in an input."""
        if isinstance(value, str) and value.startswith("$"):
            refs = references(value, sql=False)
            if len(refs) == 1 and refs[0].start == 0 and refs[0].end == len(value) and refs[0].column != "*":
                ref = refs[0]
                if ref.column is None and not ref.null_safe and ref.name in self.bound:
                    return public(self.bound[ref.name])
                try:
                    return scalar(self.bound, ref)[0]
                except ReferenceError_ as exc:
                    raise GraphError(str(exc)) from None
            return value
        if isinstance(value, dict):
            return {k: self._input(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._input(v) for v in value]
        return value

    async def _fan_out(self, node: dict[str, Any]) -> Any:
        source: Any = self.bound.get(node["over"])
        plain: list[Any]
        if is_rows(source):
            meta = [[c, t] for c, t in columns_of(source)]
            items: list[Any] = [{"rows": [row], "row_count": 1, COLUMNS_KEY: meta} for row in source["rows"]]
            plain = list(source["rows"])
        else:
            plain = list(source) if isinstance(source, list) else [source]
            items = plain
        step, alias = node["step"], node["as"]

        async def one(index: int) -> Any:
            scope = Interpreter(self.ctx, bound={**self.bound, alias: items[index]}, variables=self.variables,
                                label=self.label, role=self.role, search_path=self.search_path, observer=self.observer)
            if step["type"] == "activity" and step.get("input") is None:
                scope._mark(step, "running")
                result = await self.ctx.call_activity(step["name"], plain[index])
                scope._mark(step, "completed")
                return result
            return await scope.run(step)

        limit = node.get("limit")
        return await self.ctx.all([one(i) for i in range(len(items))], limit=int(limit) if limit else None)


async def run_graph_input(ctx: OrchestrationContext, data: Any, observer: Observer | None = None) -> Any:
    """The body of ``pgdurable.graph``: ``{graph, vars, role, search_path, bound?, resume?}``."""
    if not isinstance(data, dict) or "graph" not in data:
        raise GraphError("pgdurable.graph needs an input object with a 'graph'")
    bound = data.get("bound") or {}
    tree = compile_graph(data["graph"], bound=frozenset(bound), submitted=True)
    interp = Interpreter(ctx, bound=bound, variables=data.get("vars"), label=data.get("label"), role=data.get("role"),
                         search_path=data.get("search_path"), observer=observer)
    carry = {k: v for k, v in data.items() if k not in ("bound", "resume")}
    return await interp.run_root(tree, carry, data.get("resume"))
