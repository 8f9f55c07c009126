"""The web dashboard: ``pip install 'pgdurable_async[dashboard]'``, then
``python -m pgdurable_async dashboard`` or, mounted in a service,
``pgdurable_async.dashboard.create_app(dsn)`` (a Starlette app).

Pages ``/``, ``/instances``, ``/instances/{id}`` and the JSON API under ``/api``; read-only
unless created with ``allow_actions=True`` and a ``token``.  Self-contained HTML, CSS and
SVG: no external script, font or CDN.  Nothing in the runtime imports this package.
"""

from __future__ import annotations

try:
    import jinja2  # noqa: F401
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"the dashboard needs its extra ({exc.name} is missing): pip install 'pgdurable_async[dashboard]'"
    ) from exc

from ._app import create_app

__all__ = ["create_app"]
