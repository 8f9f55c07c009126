"""The public API is explicit: ``pgdurable_async.__all__`` is pinned here (STYLE item 8).

Adding or removing a public name is a deliberate change: update ``EXPORTED`` with it.
"""

from __future__ import annotations

import dataclasses
import inspect
import pickle
import re
import traceback
from pathlib import Path

import pytest

import pgdurable_async as pgd
from pgdurable_async._base import events as ev

EXPORTED = [
    "ActivityContext",
    "ActivityError",
    "App",
    "Cancelled",
    "Client",
    "ConfigurationError",
    "DatabaseError",
    "HistoryEvent",
    "InstanceAlreadyExists",
    "InstanceFailed",
    "InstanceHandle",
    "InstanceNotFound",
    "InstanceState",
    "InvalidArgument",
    "NonDeterminismError",
    "OrchestrationContext",
    "PgDurableError",
    "Queue",
    "RateLimit",
    "RetryPolicy",
    "Runtime",
    "ScheduleAlreadyExists",
    "ScheduleInfo",
    "ScheduleNotFound",
    "SchemaVersionError",
    "SerializationError",
    "Status",
    "SubOrchestrationError",
    "Task",
    "TimeoutError",
    "TransactionContext",
    "UnknownNameError",
    "__version__",
    "migrate",
]

#: Every name DESIGN.md section 2 uses as ``pgd.<name>``.
DESIGN_NAMES = {
    "App",
    "RetryPolicy",
    "ActivityContext",
    "TransactionContext",
    "OrchestrationContext",
    "Runtime",
    "Client",
    "InstanceHandle",
    "InstanceState",
    "HistoryEvent",
    "Status",
    "PgDurableError",
    "ActivityError",
    "InstanceFailed",
    "InstanceNotFound",
    "InstanceAlreadyExists",
    "Cancelled",
    "TimeoutError",
    "SerializationError",
    "NonDeterminismError",
}


def test_all_is_sorted_and_pinned() -> None:
    assert pgd.__all__ == sorted(pgd.__all__)
    assert pgd.__all__ == EXPORTED


def test_every_exported_name_exists() -> None:
    for name in pgd.__all__:
        assert hasattr(pgd, name), name


def test_design_names_are_exported() -> None:
    assert DESIGN_NAMES <= set(pgd.__all__)


def test_design_document_names_are_exported() -> None:
    design = Path("/work/shared/DESIGN.md")
    if not design.exists():
        pytest.skip("DESIGN.md lives outside the repository; DESIGN_NAMES above is its copy")
    section = design.read_text().split("## 2.", 1)[1].split("## 3.", 1)[0]
    used = set(re.findall(r"\bpgd\.([A-Za-z_]\w*)", section))
    assert used <= set(pgd.__all__), used - set(pgd.__all__)
    assert used <= DESIGN_NAMES, used - DESIGN_NAMES


def test_exports_look_public() -> None:
    """Reprs and tracebacks name ``pgdurable_async.X``, not the private module that defines X."""
    for name in pgd.__all__:
        obj = getattr(pgd, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__ == "pgdurable_async", (name, obj.__module__)
            assert f"{obj.__module__}.{obj.__qualname__}" == f"pgdurable_async.{name}"
        assert not name.startswith("_") or name == "__version__"
    err = pgd.InstanceFailed("i-1", {"type": "ValueError", "message": "bad"})
    assert "pgdurable_async.InstanceFailed" in "".join(traceback.format_exception_only(type(err), err))
    assert pickle.loads(pickle.dumps(err)).error == err.error


def test_package_is_typed() -> None:
    assert (Path(pgd.__file__).parent / "py.typed").exists()
    assert isinstance(pgd.__version__, str) and pgd.__version__


def test_status_values() -> None:
    assert [s.value for s in pgd.Status] == ["pending", "running", "completed", "failed", "cancelled", "terminated"]
    assert pgd.Status.COMPLETED == "completed"  # a str enum
    assert {s for s in pgd.Status if s.is_terminal} == {
        pgd.Status.COMPLETED, pgd.Status.FAILED, pgd.Status.CANCELLED, pgd.Status.TERMINATED,
    }


def test_value_type_fields() -> None:
    state_fields = {f.name for f in dataclasses.fields(pgd.InstanceState)}
    assert {"instance_id", "name", "status", "input", "output", "error", "custom_status", "created_at",
            "updated_at"} <= state_fields
    assert {"seq", "kind", "data", "recorded_at"} <= {f.name for f in dataclasses.fields(pgd.HistoryEvent)}
    assert {"instance_id", "activity_id", "name", "attempt"} <= {
        f.name for f in dataclasses.fields(pgd.ActivityContext)
    }
    assert "conn" in {f.name for f in dataclasses.fields(pgd.TransactionContext)}


def test_orchestration_context_surface() -> None:
    for method in ("call_activity", "call_orchestration", "sleep", "wait_for_event", "all", "any",
                   "set_custom_status", "set_value", "continue_as_new", "now", "new_uuid", "random", "version"):
        assert callable(getattr(pgd.OrchestrationContext, method)), method
    assert "limit" in inspect.signature(pgd.OrchestrationContext.all).parameters
    assert "timeout" in inspect.signature(pgd.OrchestrationContext.wait_for_event).parameters
    assert "instance_id" in inspect.signature(pgd.OrchestrationContext.call_orchestration).parameters
    assert {"default", "latest"} <= set(inspect.signature(pgd.OrchestrationContext.version).parameters)


def test_client_surface() -> None:
    for method in ("start", "status", "wait", "history", "list", "raise_event", "cancel", "terminate", "purge",
                   "close", "get_value", "wait_value", "fork", "purge_finished"):
        assert inspect.iscoroutinefunction(getattr(pgd.Client, method)), method
    assert inspect.iscoroutinefunction(pgd.InstanceHandle.result)
    assert "instance_id" in inspect.signature(pgd.Client.start).parameters
    assert {"at_seq", "new_instance_id"} <= set(inspect.signature(pgd.Client.fork).parameters)
    assert {"default"} <= set(inspect.signature(pgd.Client.get_value).parameters)
    assert {"timeout"} <= set(inspect.signature(pgd.Client.wait_value).parameters)
    assert "retention" in inspect.signature(pgd.Runtime).parameters


def test_testing_kit_surface() -> None:
    from pgdurable_async import testing

    assert testing.__all__ == ["Environment", "replay"]
    assert {"dsn", "time_skipping"} <= set(inspect.signature(testing.Environment).parameters)
    assert not inspect.iscoroutinefunction(testing.replay)  # a plain function: the engine is pure


def test_history_event_kinds_of_the_contract() -> None:
    design_kinds = {
        "orchestration_started", "activity_scheduled", "activity_completed", "activity_failed", "timer_created",
        "timer_fired", "event_received", "sub_orchestration_scheduled", "sub_orchestration_completed",
        "sub_orchestration_failed", "custom_status_set", "cancel_requested", "continued_as_new",
        "orchestration_completed", "orchestration_failed", "orchestration_terminated",
        "value_set", "forked_from",  # section 10
    }
    assert design_kinds <= ev.ALL_KINDS
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", k) for k in ev.ALL_KINDS)
