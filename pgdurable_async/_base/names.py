"""Ids and registered names: validation, and the name a decorated function is known by."""

from __future__ import annotations

from typing import Any

from .errors import InvalidArgument, UnknownNameError

MAX_ID_LENGTH = 200
#: Names under this prefix belong to the built-ins (the graph interpreter and its activities).
RESERVED_PREFIX = "pgdurable."
#: The attribute ``@app.activity`` / ``@app.orchestration`` set on a function: its registered name.
NAME_ATTR = "__pgdurable_name__"


def check_id(value: Any, what: str = "instance_id") -> str:
    """Validate an id or name (always bound as a parameter, never spliced into SQL)."""
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{what} must be a non-empty string")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(f"{what} is {len(value)} characters long; the limit is {MAX_ID_LENGTH}")
    if "\x00" in value:
        raise InvalidArgument(f"{what} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} is not valid UTF-8 (a lone surrogate?)") from None
    return value


def name_of(ref: Any, *, kind: str) -> str:
    """The registered name of an orchestration or activity given by function or name."""
    if isinstance(ref, str):
        return check_id(ref, f"{kind} name")
    name = getattr(ref, NAME_ATTR, None)
    if isinstance(name, str):
        return name
    raise UnknownNameError(
        f"{getattr(ref, '__qualname__', ref)!r} is not a registered {kind}; "
        f"decorate it with @app.{kind} or pass its registered name",
        kind=kind,
        name=str(getattr(ref, "__qualname__", ref)),
    )


def is_reserved(name: str) -> bool:
    """True for the built-ins' names: no app may register them, no client or graph may start them."""
    return name.startswith(RESERVED_PREFIX)
