"""The Starlette application: routes, error pages, security headers, the client's lifetime."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._app import App
from .._base.errors import ConfigurationError, InstanceNotFound, InvalidArgument, PgDurableError
from .._client import Client
from . import _api, _format, _pages

_CSP = ("default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
_HEADERS = [
    (b"content-security-policy", _CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
_STATIC = {"dashboard.css": "text/css; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8"}


@dataclass
class Dashboard:
    """What every handler needs: the client, the settings, the templates.

    A client the dashboard made itself is remade when requests arrive on another event loop
    (a pool belongs to one loop: Starlette's ``TestClient`` without ``with`` runs each request
    on a loop of its own); a client handed in is the caller's to manage.
    """

    allow_actions: bool
    token: str | None
    app: App | None
    templates: Environment
    given: Client | None
    dsn: str | None
    schema: str
    _client: Client | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    @property
    def client(self) -> Client:
        if self.given is not None:
            return self.given
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client, self._loop = Client(self.dsn, schema=self.schema), loop
        return self._client

    async def close(self) -> None:
        if self.given is None and self._client is not None and self._loop is asyncio.get_running_loop():
            client, self._client = self._client, None
            await client.close()

    def render(self, request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        base = request.scope.get("root_path", "")
        page = self.templates.get_template(name).render(base=base, allow_actions=self.allow_actions, **context)
        return HTMLResponse(page, status_code=status_code)


class _SecurityHeaders:
    """Adds a strict Content-Security-Policy (no inline script or style) and friends to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *(h for h in _HEADERS if h[0] not in names)]
            await send(message)

        await self.app(scope, receive, with_headers)


def _templates() -> Environment:
    env = Environment(loader=PackageLoader("pgdurable_async.dashboard", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(_format.FILTERS)
    return env


async def _static(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in _STATIC:
        return Response("not found", status_code=404, media_type="text/plain")
    body = resources.files(__package__).joinpath("static", name).read_bytes()
    return Response(body, media_type=_STATIC[name])


def _error_handler(status_code: int) -> Any:
    async def handle(request: Request, exc: Exception) -> Response:
        message = str(exc) or type(exc).__name__
        if request.url.path.startswith(request.scope.get("root_path", "") + "/api/"):
            return _api.error(status_code, message)
        dashboard: Dashboard = request.app.state.dashboard
        return dashboard.render(request, "error.html", status_code=status_code, status_code_=status_code, page="error",
                                message=message)

    return handle


def create_app(
    dsn: str | None = None,
    *,
    schema: str = "pgdurable",
    allow_actions: bool = False,
    token: str | None = None,
    app: App | None = None,
    client: Client | None = None,
) -> Starlette:
    """The dashboard as an ASGI app (mount it in a service, or run it with uvicorn).

    Read-only unless ``allow_actions``; then cancel, terminate and raise-event need
    ``Authorization: Bearer <token>``.  ``app`` lets the graph view show ``App.graph``
    workflows; ``client`` reuses a client (else one is made on ``dsn`` and closed at shutdown).
    """
    if allow_actions and not token:
        raise ConfigurationError("the dashboard's actions need a token (--token or PGDURABLE_DASHBOARD_TOKEN)")
    if client is None and not dsn:
        raise ConfigurationError("the dashboard needs a DSN (postgresql://user@host:port/dbname) or a client")
    dashboard = Dashboard(allow_actions, token, app, _templates(), client, dsn, schema)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await dashboard.close()

    routes = [
        Route("/", _pages.overview),
        Route("/instances", _pages.instances),
        Route("/instances/{instance_id:path}", _pages.instance),
        Route("/static/{name}", _static),
        Route("/api/instances", _api.list_instances),
        Route("/api/instances/{instance_id:path}/history", _api.history),
        Route("/api/instances/{instance_id:path}/cancel", _api.cancel, methods=["POST"]),
        Route("/api/instances/{instance_id:path}/terminate", _api.terminate, methods=["POST"]),
        Route("/api/instances/{instance_id:path}/raise-event", _api.raise_event, methods=["POST"]),
        Route("/api/instances/{instance_id:path}", _api.instance),
    ]
    handlers: dict[Any, Any] = {
        InstanceNotFound: _error_handler(404),
        InvalidArgument: _error_handler(400),
        PgDurableError: _error_handler(503),
    }
    starlette = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers,
                          middleware=[Middleware(_SecurityHeaders)])
    starlette.state.dashboard = dashboard
    return starlette
