"""``python -m pgdurable_async demo NAME``: run one of the graph examples in ``examples/``."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from ._errors import ConfigurationError

EXAMPLES = ("document_batch", "embedding_pipeline", "outbox", "maintenance")


def examples_dir() -> Path:
    """``./examples`` when it has the examples, else the source checkout's ``examples/``."""
    for candidate in (Path(os.getcwd()) / "examples", Path(__file__).resolve().parent.parent / "examples"):
        if (candidate / f"{EXAMPLES[0]}.py").is_file():
            return candidate
    raise ConfigurationError("the examples/ directory was not found (run from a source checkout)")


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (``-`` and ``_`` are interchangeable in ``name``)."""
    key = name.replace("-", "_")
    if key not in EXAMPLES:
        raise ConfigurationError(f"no example named {name!r}; choose one of: {', '.join(EXAMPLES)}")
    path = examples_dir() / f"{key}.py"
    spec = importlib.util.spec_from_file_location(f"pgdurable_examples.{key}", path)
    if spec is None or spec.loader is None:
        raise ConfigurationError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def run_example(name: str, dsn: str, out: TextIO) -> Any:
    """Run an example's ``run(dsn, out=...)`` and return what it returns."""
    return await load_example(name).run(dsn, out=out)
