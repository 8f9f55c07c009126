"""Jinja filters: times, durations, JSON and errors as text (the templates escape the result)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import quote

import orjson


def iso(value: datetime | None) -> str:
    return "-" if value is None else value.isoformat(timespec="milliseconds")


def clock(value: datetime | None) -> str:
    """``HH:MM:SS.mmm`` (UTC), for tables where the date is implied."""
    return "-" if value is None else value.strftime("%H:%M:%S.") + f"{value.microsecond // 1000:03d}"


def stamp(value: datetime | None) -> str:
    """``YYYY-MM-DD HH:MM:SS`` in the value's own zone (the database's, UTC by default)."""
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def ago(value: datetime | None, now: datetime) -> str:
    """How long before ``now`` (or ``in ...`` after it)."""
    if value is None:
        return "-"
    delta = (now - value).total_seconds()
    return f"{seconds(delta)} ago" if delta >= 0 else f"in {seconds(-delta)}"


def pretty(value: Any) -> str:
    """JSON, indented."""
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS, default=str).decode()


def short(value: Any, width: int = 120) -> str:
    """JSON on one line, cut to ``width`` characters."""
    text = value if isinstance(value, str) else orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS,
                                                            default=str).decode()
    return text if len(text) <= width else text[: width - 1] + "…"


def error_text(error: Any) -> str:
    if isinstance(error, dict) and "message" in error:
        return f"{error.get('type') or 'Error'}: {error.get('message')}"
    return "-" if error is None else short(error)


def path(value: str) -> str:
    """A path segment (an instance id), percent-encoded; ``/`` too."""
    return quote(value, safe="")


FILTERS: dict[str, Callable[..., Any]] = {
    "iso": iso, "clock": clock, "stamp": stamp, "seconds": seconds, "ago": ago, "pretty": pretty, "short": short,
    "error_text": error_text, "path": path,
}
