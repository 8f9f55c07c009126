"""``dashboard``: serve the web dashboard with uvicorn (the ``[dashboard]`` extra)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import sys
from typing import Any

from .._base.errors import ConfigurationError
from .._client import Client
from .admin import CLIENT_RETRY_SECONDS
from .worker import load_app

TOKEN_ENV = "PGDURABLE_DASHBOARD_TOKEN"
_LOOPBACK_NAMES = ["localhost", "127.0.0.1", "::1", "[::1]"]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


async def cmd_dashboard(args: argparse.Namespace) -> int:
    """Serve the dashboard until SIGINT/SIGTERM; read-only unless ``--allow-actions``."""
    try:
        import uvicorn
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        from ..dashboard import create_app
    except ImportError as exc:
        raise ConfigurationError(f"the dashboard needs its extra: pip install 'pgdurable_async[dashboard]' ({exc})") \
            from None
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if args.allow_actions and token is None:
        token = secrets.token_urlsafe(24)
        print(f"actions token (send it as 'Authorization: Bearer ...'; set {TOKEN_ENV} to choose one): {token}",
              file=sys.stderr, flush=True)
    app = load_app(args.app) if args.app else None
    client = Client(args.dsn, schema=args.schema)
    client.db.retry_for = CLIENT_RETRY_SECONDS
    try:
        await client.ready_db()  # a wrong DSN or a missing schema is one line now, not a 503 page later
        client.db.retry_for = 30.0
        asgi: Any = create_app(client=client, allow_actions=args.allow_actions, token=token, app=app)
        if _is_loopback(args.host):  # a page on another site cannot reach us by rebinding its DNS name
            asgi = TrustedHostMiddleware(asgi, allowed_hosts=[*_LOOPBACK_NAMES, args.host])
        server = uvicorn.Server(uvicorn.Config(asgi, host=args.host, port=args.port, log_level="warning",
                                               access_log=False, lifespan="on"))
        shown = f"[{args.host}]" if ":" in args.host else args.host
        mode = "actions enabled" if args.allow_actions else "read-only"
        print(f"dashboard on http://{shown}:{args.port}/ ({mode})", file=sys.stderr, flush=True)
        await server.serve()
        if not server.started:
            raise ConfigurationError(f"the dashboard could not listen on {args.host}:{args.port}")
    finally:
        await client.close()
    return 0
