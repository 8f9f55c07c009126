"""The one JSON codec (orjson) of inputs, outputs and event payloads, with a size limit."""

from __future__ import annotations

import math
import re
from typing import Any

import orjson

from .errors import SerializationError

DEFAULT_MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
# A JSON-escaped NUL: \u0000 preceded by an even number of backslashes.
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def _default(value: Any) -> Any:
    """Encode subclasses of the JSON scalar types (such as ``ctx.random()``) as their base type."""
    for base in (float, int, str):
        if isinstance(value, base):
            return base(value)
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def encode(value: Any, *, what: str = "value", limit: int = DEFAULT_MAX_PAYLOAD_BYTES) -> str:
    """Encode ``value`` as JSON text, or raise :class:`SerializationError`."""
    try:
        raw = orjson.dumps(value, default=_default, option=_OPTIONS)
    except TypeError as exc:
        raise SerializationError(f"{what} is not JSON-serializable: {exc}", what=what) from None
    if b"null" in raw and _has_non_finite(value):
        raise SerializationError(f"{what} contains NaN or Infinity, which JSON cannot represent", what=what)
    if len(raw) > limit:
        raise SerializationError(
            f"{what} is {len(raw)} bytes encoded, over the {limit}-byte payload limit",
            what=what,
            size=len(raw),
            limit=limit,
        )
    if _NUL_ESCAPE.search(raw):
        raise SerializationError(f"{what} contains a NUL character, which PostgreSQL cannot store", what=what)
    return raw.decode()


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_non_finite(v) for v in value)
    return False


def dumps(value: Any) -> str:
    """JSON text of a value the engine itself built (no size or content checks: see :func:`encode`)."""
    return orjson.dumps(value, default=_default, option=_OPTIONS).decode()


def decode(text: str | bytes) -> Any:
    """Decode JSON text produced by :func:`encode` or read from a jsonb column."""
    return orjson.loads(text)


def normalize(value: Any) -> Any:
    """The value as it reads back from the database (tuples become lists, and so on)."""
    return orjson.loads(orjson.dumps(value, default=_default, option=_OPTIONS))
