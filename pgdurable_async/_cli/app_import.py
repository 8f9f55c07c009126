"""Importing the module of ``--app module:attr``, with one-line errors that point into it.

A syntax error names the file and line; an exception while the module runs names
where in the user's code it happened; only a module that really is not there reads
"no module named".
"""

from __future__ import annotations

import importlib
import traceback
from types import ModuleType

from .._base.errors import ConfigurationError


def import_app_module(module_name: str, spec: str) -> ModuleType:
    """``importlib.import_module(module_name)``; failures become one :class:`ConfigurationError` line."""
    try:
        return importlib.import_module(module_name)
    except SyntaxError as exc:
        where = f"{exc.filename}, line {exc.lineno}" if exc.filename else f"line {exc.lineno}"
        raise ConfigurationError(f"--app {spec}: syntax error in {where}: {exc.msg}") from None
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigurationError(
                f"--app {spec}: no module named {exc.name!r} (run from the directory that holds it, "
                "or put it on PYTHONPATH)"
            ) from None
        raise ConfigurationError(f"--app {spec}: importing {module_name!r} failed at {_where(exc)}: "
                                 f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any error the module raises while it runs
        raise ConfigurationError(f"--app {spec}: importing {module_name!r} failed at {_where(exc)}: "
                                 f"{type(exc).__name__}: {exc}") from None


def _where(exc: BaseException) -> str:
    """``file, line N`` of the innermost frame outside the import machinery."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<frozen ")]
    if not frames:
        return "import time"
    last = frames[-1]
    return f"{last.filename}, line {last.lineno}"
