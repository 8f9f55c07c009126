"""The JSON API: instances, one instance with ``waiting_on``, its history; the guarded actions.

Timestamps are ISO 8601 strings.  Actions (cancel, terminate, raise-event) are refused
(403) unless the dashboard runs with ``--allow-actions``; then they need the token as
``Authorization: Bearer <token>``: 401 without one, 403 for a wrong one.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from .._base.errors import InstanceNotFound, InvalidArgument
from .._base.types import InstanceState
from . import _views

if TYPE_CHECKING:
    from ._app import Dashboard


def json_response(value: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS, default=str)
    return Response(body, status_code=status_code, media_type="application/json", headers=headers)


def error(status_code: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": message}, status_code, headers)


def _dashboard(request: Request) -> Dashboard:
    dashboard: Dashboard = request.app.state.dashboard
    return dashboard


async def state_of(request: Request) -> InstanceState:
    """The instance named in the path; an id that cannot exist is unknown too (404)."""
    instance_id = request.path_params["instance_id"]
    try:
        return await _dashboard(request).client.status(instance_id)
    except InvalidArgument:
        raise InstanceNotFound(instance_id) from None


async def list_instances(request: Request) -> Response:
    filters = _views.Filters.parse(request.query_params)
    states, cursor = await _views.instances_page(_dashboard(request).client, filters)
    return json_response({"instances": states, "next": cursor})


async def instance(request: Request) -> Response:
    return json_response(await state_of(request))


async def history(request: Request) -> Response:
    state = await state_of(request)
    events = await _dashboard(request).client.history(state.instance_id)
    return json_response(_views.history_json(events))


# -- actions --------------------------------------------------------------------------
def _refusal(request: Request) -> Response | None:
    dashboard = _dashboard(request)
    if not dashboard.allow_actions or not dashboard.token:
        return error(403, "actions are disabled: start the dashboard with --allow-actions and a token")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return error(401, "this action needs the dashboard's token as 'Authorization: Bearer <token>'",
                     {"WWW-Authenticate": 'Bearer realm="pgdurable_async dashboard"'})
    if not hmac.compare_digest(given.strip().encode(), dashboard.token.encode()):
        return error(403, "wrong token")
    return None


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidArgument("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return body


def _reason(body: dict[str, Any]) -> str | None:
    reason = body.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise InvalidArgument("reason must be a string")
    return reason or None


async def _done(request: Request, action: str, before: InstanceState) -> Response:
    after = await _dashboard(request).client.status(before.instance_id)
    note = f"already {before.status.value}: nothing to do" if before.status.is_terminal else "requested"
    return json_response({"ok": True, "action": action, "instance_id": after.instance_id,
                          "status": after.status, "note": note})


async def cancel(request: Request) -> Response:
    if (refused := _refusal(request)) is not None:
        return refused
    body = await _body(request)
    state = await state_of(request)
    await _dashboard(request).client.cancel(state.instance_id, _reason(body))
    return await _done(request, "cancel", state)


async def terminate(request: Request) -> Response:
    if (refused := _refusal(request)) is not None:
        return refused
    body = await _body(request)
    state = await state_of(request)
    await _dashboard(request).client.terminate(state.instance_id, _reason(body))
    return await _done(request, "terminate", state)


async def raise_event(request: Request) -> Response:
    if (refused := _refusal(request)) is not None:
        return refused
    body = await _body(request)
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidArgument("raise-event needs a body {\"name\": ..., \"data\": ...}")
    state = await state_of(request)
    await _dashboard(request).client.raise_event(state.instance_id, name, body.get("data"))
    return await _done(request, "raise-event", state)
