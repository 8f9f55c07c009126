"""The HTTP nodes (``df.http``, ``df.http_multipart``): one request behind a host allow-list
(deny by default), answered with pg_durable's envelope."""

from __future__ import annotations

import base64
import os
import time
from typing import Any
from urllib.parse import urlsplit

from .._base.definitions import ActivityContext
from .._base.errors import ConfigurationError, PgDurableError
from .._base.types import RetryPolicy

HTTP_ALLOW_ENV = "PGDURABLE_HTTP_ALLOW"
HTTP_RETRY = RetryPolicy(max_attempts=3, initial_interval=1.0,
                         non_retryable=("HttpNotAllowed", "GraphError", "InvalidPart", "NodeRefused"))
_ERROR_PREVIEW = 512  # characters of a 5xx body kept in the error
_http_allow: set[str] = set()


class HttpNotAllowed(PgDurableError):
    """The HTTP node's host is not on the allow-list (deny by default)."""


class InvalidPart(PgDurableError):
    """A ``df.http_multipart`` part cannot be sent (its data is not base64)."""


class HttpServerError(PgDurableError):
    """The server answered 5xx: the attempt fails and is retried (4xx responses complete)."""


def allow_http(*hosts: str) -> None:
    """Allow HTTP nodes to call these hosts (also: ``$PGDURABLE_HTTP_ALLOW``, comma-separated; ``*``: any)."""
    _http_allow.update(h.strip().lower() for h in hosts if h.strip())


def _allowed_hosts() -> set[str]:
    env = {h.strip().lower() for h in os.environ.get(HTTP_ALLOW_ENV, "").split(",") if h.strip()}
    return _http_allow | env


def _multipart(parts: list[dict[str, Any]]) -> list[tuple[str, tuple[str | None, bytes, str]]]:
    """httpx ``files=`` for ``df.http_multipart`` parts ``{name, data_b64, filename?, content_type?}``."""
    files = []
    for part in parts:
        try:
            payload = base64.b64decode("".join(str(part["data_b64"]).split()), validate=True)
        except (ValueError, KeyError):
            raise InvalidPart(f"part {part.get('name')!r}: data_b64 is not valid base64") from None
        files.append((str(part["name"]), (part.get("filename"), payload,
                                          str(part.get("content_type") or "application/octet-stream"))))
    return files


async def http_node(ctx: ActivityContext, data: dict[str, Any]) -> dict[str, Any]:
    """One HTTP request behind the host allow-list; returns pg_durable's envelope."""
    host = (urlsplit(data["url"]).hostname or "").lower()
    allowed = _allowed_hosts()
    if "*" not in allowed and host not in allowed:
        raise HttpNotAllowed(
            f"HTTP to {host!r} is not allowed: add it to ${HTTP_ALLOW_ENV} or call dsl.allow_http({host!r})"
        )
    try:
        import httpx
    except ImportError:
        raise ConfigurationError(
            "df.http needs the httpx package (a dependency of pgdurable_async): reinstall the package") from None
    started = time.monotonic()
    body = data.get("body")
    headers = data.get("headers") or None
    files = _multipart(data["parts"]) if data.get("parts") else None
    if files is not None and headers:  # multipart owns the Content-Type (its boundary)
        headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
    async with httpx.AsyncClient(timeout=float(data.get("timeout") or 30)) as client:
        response = await client.request(
            data.get("method", "POST"), data["url"], headers=headers,
            content=None if body is None or files is not None else str(body).encode(), files=files,
        )
    content_type = response.headers.get("content-type", "")
    textual = content_type.startswith("text/") or "json" in content_type or "xml" in content_type or not content_type
    body_text = response.text if textual else base64.b64encode(response.content).decode()
    if response.is_server_error:
        raise HttpServerError(f"HTTP {response.request.method} {data['url']} returned {response.status_code}: "
                              f"{body_text[:_ERROR_PREVIEW]}")
    return {
        "status": response.status_code,
        "ok": response.is_success,
        "body": body_text,
        "encoding": "text" if textual else "base64",
        "headers": dict(response.headers),
        "duration_ms": round((time.monotonic() - started) * 1000, 1),
    }


