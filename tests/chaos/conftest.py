"""Chaos-marked tests are opt-in: they run only with ``-m chaos`` (or ``PGDURABLE_CHAOS=1``)."""

from __future__ import annotations

import os

import pytest


def _opted_in(config: pytest.Config) -> bool:
    markexpr = str(config.getoption("markexpr") or "")
    return os.environ.get("PGDURABLE_CHAOS") == "1" or ("chaos" in markexpr and "not chaos" not in markexpr)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _opted_in(config):
        return
    skip = pytest.mark.skip(reason="long chaos run: opt in with -m chaos or PGDURABLE_CHAOS=1")
    for item in items:
        if item.get_closest_marker("chaos") is not None:
            item.add_marker(skip)
