"""The HTML pages: overview, instance list, one instance (templates in ``templates/``)."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response

from .._base.types import Status
from . import _api, _views
from ._timeline import COLOURS

if TYPE_CHECKING:
    from ._app import Dashboard


def _dashboard(request: Request) -> Dashboard:
    dashboard: Dashboard = request.app.state.dashboard
    return dashboard


async def overview(request: Request) -> Response:
    dashboard = _dashboard(request)
    data = await _views.overview(dashboard.client)
    return dashboard.render(request, "overview.html", page="overview", **data)


async def instances(request: Request) -> Response:
    dashboard = _dashboard(request)
    filters = _views.Filters.parse(request.query_params)
    states, cursor = await _views.instances_page(dashboard.client, filters)
    return dashboard.render(request, "instances.html", page="instances", states=states, filters=filters,
                            statuses=[s.value for s in Status], next_query=_query(filters, cursor) if cursor else None,
                            first_query=_query(filters, None) if filters.cursor else None)


def _query(filters: _views.Filters, cursor: str | None) -> str:
    """The list's query string for the same filters at ``cursor`` (None: the first page)."""
    params = {"status": filters.status, "name": filters.name, "q": filters.q, "cursor": cursor,
              "limit": str(filters.limit) if filters.limit != _views.PAGE_SIZE else None}
    return "?" + urlencode({k: v for k, v in params.items() if v})


async def instance(request: Request) -> Response:
    dashboard = _dashboard(request)
    state = await _api.state_of(request)
    data = await _views.instance(dashboard.client, state.instance_id, dashboard.app)
    return dashboard.render(request, "instance.html", page="instance", colours=COLOURS, **data)
