"""The graph interpreter's leaf nodes: each one a durable primitive of the engine.

A SQL node is a transactional activity, an HTTP node an activity, ``sleep`` and
``wait_for_schedule`` timers, ``wait_for_signal`` an event wait, ``call`` a child
orchestration, ``activity`` an app activity, ``fan_out`` one step per row (run by
copies of the interpreter that record no node facts of their own).
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from .._base.errors import GraphError
from .._base.errors import TimeoutError as DurableTimeout
from .._engine import OrchestrationContext
from .._store.node_store import COLUMNS_KEY
from .references import ReferenceError_, columns_of, is_rows, public, rewrite, scalar, substitute_text
from .tokens import references

if TYPE_CHECKING:
    from .interpreter import Interpreter

SQL_ACTIVITY = "pgdurable.graph.sql"
HTTP_ACTIVITY = "pgdurable.graph.http"


class LeafNodes:
    """The leaf node handlers of :class:`~pgdurable_async._graph.interpreter.Interpreter`."""

    ctx: OrchestrationContext
    bound: dict[str, Any]
    variables: dict[str, str]
    role: str | None
    search_path: str

    def _item_copy(self, bound: dict[str, Any]) -> Interpreter:  # pragma: no cover - Interpreter's
        raise NotImplementedError

    def _note_state(self, node: dict[str, Any], state: str, *, result: Any = None, error: str | None = None,
                    iteration: int | None = None) -> None:  # pragma: no cover - Interpreter's
        raise NotImplementedError

    async def run(self, node: dict[str, Any]) -> Any:  # pragma: no cover - Interpreter's
        raise NotImplementedError

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

    def _http_request(self, node: dict[str, Any]) -> dict[str, Any]:
        """URL, body and headers after ``{var}`` and ``$name`` substitution, as the HTTP activity takes them."""
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
        return {"node": node["id"], "url": url, "method": node.get("method", "POST"), "body": body,
                "headers": headers, "timeout": node.get("timeout") or 30}

    async def _http(self, node: dict[str, Any]) -> Any:
        return await self.ctx.call_activity(HTTP_ACTIVITY, self._http_request(node))

    async def _http_multipart(self, node: dict[str, Any]) -> Any:
        request = self._http_request({**node, "body": None})
        parts = []
        for part in node.get("parts") or []:
            data = part.get("data_b64")
            if isinstance(data, str) and data.startswith("$"):  # a whole-value reference only
                data = self._input(data)
                if not isinstance(data, str):
                    raise GraphError(f"part {part.get('name')!r}: {part.get('data_b64')} is not a base64 string",
                                     node_id=node["id"])
            parts.append({**part, "data_b64": data})
        return await self.ctx.call_activity(HTTP_ACTIVITY, {**request, "parts": parts})

    async def _call(self, node: dict[str, Any]) -> Any:
        return await self.ctx.call_orchestration(node["name"], self._input(node.get("input")))

    async def _activity(self, node: dict[str, Any]) -> Any:
        return await self.ctx.call_activity(node["name"], self._input(node.get("input")), **self._queueing(node))

    def _queueing(self, node: dict[str, Any]) -> dict[str, Any]:
        """An activity node's ``key`` (a reference resolves) and ``priority``, for its queue."""
        return {"key": self._input(node.get("key")), "priority": int(node.get("priority") or 0)}

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
            scope = self._item_copy({**self.bound, alias: items[index]})
            if step["type"] == "activity" and step.get("input") is None:
                return await self.ctx.call_activity(step["name"], plain[index], **scope._queueing(step))
            return await scope.run(step)

        # The items share the step's node ids: the step records one state for all of them.
        self._note_state(step, "running")
        limit = node.get("limit")
        try:
            result = await self.ctx.all([one(i) for i in range(len(items))], limit=int(limit) if limit else None)
        except Exception as exc:
            self._note_state(step, "failed", error=str(exc))
            raise
        self._note_state(step, "completed")
        return result
