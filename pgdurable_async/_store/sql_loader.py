"""Loads ``sql/queries.sql`` once: every runtime and client query, by name."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@cache
def queries() -> dict[str, str]:
    """All named queries of ``queries.sql``."""
    text = resources.files(__package__).joinpath("sql", "queries.sql").read_text(encoding="utf-8")
    parts = _HEADER.split(text)
    found: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line for line in body.strip().splitlines() if not line.lstrip().startswith("--")]
        found[name] = "\n".join(lines).rstrip().rstrip(";")
    return found


def q(name: str) -> str:
    """The SQL text of the query called ``name``."""
    return queries()[name]
