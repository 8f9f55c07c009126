"""The one JSON codec (orjson) of inputs, outputs and event payloads, with a size limit."""

from __future__ import annotations

import json
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


def _leaf(value: Any) -> Any:
    """What orjson makes of a value the standard library cannot encode (datetime, UUID, ...)."""
    return orjson.loads(_dumps(value))


def _dumps(value: Any) -> bytes:
    """orjson's encoding; past orjson's fixed 255-level nesting limit, the standard library's.

    A graph may nest 256 nodes, two JSON levels each for ``join``, so deep values are real.
    Raises TypeError (what orjson raises) for anything that cannot be encoded, and ValueError
    for NaN or Infinity in a value too deep for orjson.
    """
    try:
        return orjson.dumps(value, default=_default, option=_OPTIONS)
    except orjson.JSONEncodeError as exc:
        if "Recursion limit" not in str(exc):
            raise
    try:
        text = json.dumps(value, default=_leaf, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode()
    except RecursionError:
        raise TypeError("the value nests too deep to encode") from None
    except UnicodeEncodeError:
        raise TypeError("str is not valid UTF-8: surrogates not allowed") from None


def encode(value: Any, *, what: str = "value", limit: int = DEFAULT_MAX_PAYLOAD_BYTES) -> str:
    """Encode ``value`` as JSON text, or raise :class:`SerializationError`."""
    try:
        raw = _dumps(value)
    except TypeError as exc:
        raise SerializationError(f"{what} is not JSON-serializable: {exc}", what=what) from None
    except ValueError:
        raise SerializationError(f"{what} contains NaN or Infinity, which JSON cannot represent", what=what) from None
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
    """Whether a float in ``value`` is NaN or infinite (iteratively: values may nest deep)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


def dumps(value: Any) -> str:
    """JSON text of a value the engine itself built (no size or content checks: see :func:`encode`)."""
    return _dumps(value).decode()


def decode(text: str | bytes) -> Any:
    """Decode JSON text produced by :func:`encode` or read from a jsonb column."""
    return orjson.loads(text)


def normalize(value: Any) -> Any:
    """The value as it reads back from the database (tuples become lists, and so on)."""
    return orjson.loads(_dumps(value))
