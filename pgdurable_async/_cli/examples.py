"""``python -m pgdurable_async demo NAME``: run one of the graph examples.

The examples live in ``examples/`` of the repository and ship inside the wheel as
``pgdurable_async/examples`` (package data), so ``demo NAME`` works either way.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from types import ModuleType

from .._base.errors import ConfigurationError

EXAMPLES = ("document_batch", "embedding_pipeline", "outbox", "maintenance")


def examples_dir() -> Traversable:
    """The examples shipped in the wheel, else the source checkout's ``examples/``."""
    packaged = resources.files("pgdurable_async").joinpath("examples")
    for candidate in (packaged, Path(__file__).resolve().parents[2] / "examples"):
        if candidate.joinpath(f"{EXAMPLES[0]}.py").is_file():
            return candidate
    raise ConfigurationError("the examples are missing from this installation (reinstall pgdurable_async)")


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (``-`` and ``_`` are interchangeable in ``name``)."""
    key = name.replace("-", "_")
    if key not in EXAMPLES:
        raise ConfigurationError(f"no example named {name!r}; choose one of: {', '.join(EXAMPLES)}")
    with resources.as_file(examples_dir().joinpath(f"{key}.py")) as path:
        spec = importlib.util.spec_from_file_location(f"pgdurable_examples.{key}", path)
        if spec is None or spec.loader is None:
            raise ConfigurationError(f"cannot load the example {key!r} from {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses and pickling look a class's module up there
        spec.loader.exec_module(module)
    return module
