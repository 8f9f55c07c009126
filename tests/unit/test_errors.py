"""The error hierarchy: one root, structured fields, clean pickling, unswallowable cancellation."""

from __future__ import annotations

import builtins
import copy
import inspect
import pickle
from typing import Any

import pytest

import pgdurable_async as pgd
from pgdurable_async._base import errors as _errors

ERROR_CLASSES = [
    obj
    for _, obj in inspect.getmembers(_errors, inspect.isclass)
    if issubclass(obj, BaseException) and obj.__module__ in (_errors.__name__, pgd.__name__)
]

#: One instance of every error, built the way the library builds it, and the fields it must keep.
SAMPLES: list[tuple[BaseException, dict[str, Any]]] = [
    (pgd.PgDurableError("root", detail=1), {"detail": 1}),
    (pgd.ConfigurationError("bad settings", setting="dsn"), {"setting": "dsn"}),
    (pgd.SchemaVersionError("too new", found=9, supported=3), {"found": 9, "supported": 3}),
    (pgd.InvalidArgument("bad id", value="a\x00b"), {"value": "a\x00b"}),
    (pgd.DatabaseError("down", transient=True, sqlstate="08006"), {"transient": True, "sqlstate": "08006"}),
    (pgd.SerializationError("too big", what="output", size=10, limit=5), {"what": "output", "size": 10, "limit": 5}),
    (pgd.UnknownNameError("nobody", kind="activity", name="embed"), {"kind": "activity", "name": "embed"}),
    (pgd.InstanceNotFound("batch-7"), {"instance_id": "batch-7"}),
    (pgd.InstanceAlreadyExists("batch-7"), {"instance_id": "batch-7"}),
    (pgd.ScheduleNotFound("nightly"), {"schedule_id": "nightly"}),
    (pgd.ScheduleAlreadyExists("nightly"), {"schedule_id": "nightly"}),
    (
        pgd.InstanceFailed("batch-7", {"type": "ValueError", "message": "bad", "traceback": "tb"}),
        {"instance_id": "batch-7", "error": {"type": "ValueError", "message": "bad", "traceback": "tb"}},
    ),
    (
        pgd.ActivityError(activity_name="embed", error_type="HTTPError", error_message="503", traceback="tb",
                          attempts=5),
        {"activity_name": "embed", "error_type": "HTTPError", "error_message": "503", "traceback": "tb",
         "attempts": 5},
    ),
    (
        pgd.SubOrchestrationError(instance_id="child-1", error={"type": "KeyError", "message": "k"}),
        {"instance_id": "child-1", "error": {"type": "KeyError", "message": "k"}},
    ),
    (pgd.TimeoutError("no approval", event="approval"), {"event": "approval"}),
    (pgd.NonDeterminismError("command #3 differs", instance_id="i-1"), {"instance_id": "i-1"}),
    (_errors.GraphError("unknown node type", node_id="n0.1"), {"node_id": "n0.1"}),
    (pgd.Cancelled("cancelled by ops", instance_id="i-1", reason="shutdown"), {"instance_id": "i-1",
                                                                                "reason": "shutdown"}),
    (_errors.InstanceCancelled("instance 'i-1' was cancelled", instance_id="i-1", reason="shutdown"),
     {"instance_id": "i-1", "reason": "shutdown"}),
]


def test_every_error_class_has_a_sample() -> None:
    assert {type(e) for e, _ in SAMPLES} == set(ERROR_CLASSES)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_error_is_a_pgdurable_error(cls: type[BaseException]) -> None:
    assert issubclass(cls, pgd.PgDurableError)


def test_hierarchy_details() -> None:
    assert issubclass(pgd.SchemaVersionError, pgd.ConfigurationError)
    assert issubclass(pgd.InvalidArgument, ValueError)
    assert issubclass(pgd.TimeoutError, builtins.TimeoutError)
    assert pgd.TimeoutError is not builtins.TimeoutError
    for cls in ERROR_CLASSES:
        if cls is not pgd.Cancelled:
            assert issubclass(cls, Exception), cls


def test_cancelled_is_not_swallowed_by_except_exception() -> None:
    err = pgd.Cancelled("stop", instance_id="i", reason="r")
    assert isinstance(err, pgd.PgDurableError)
    assert issubclass(pgd.Cancelled, pgd.PgDurableError)
    assert not isinstance(err, Exception)
    with pytest.raises(pgd.Cancelled):
        try:
            raise err
        except Exception:  # noqa: BLE001 - the point: this must not catch it
            pytest.fail("except Exception swallowed Cancelled")


def test_cancelled_is_not_caught_by_except_pgdurable_error() -> None:
    # `except` matches on the real class hierarchy and ignores the isinstance hook, so a
    # generic `except pgd.PgDurableError` cannot swallow a cancellation either.
    with pytest.raises(pgd.Cancelled):
        try:
            raise pgd.Cancelled()
        except pgd.PgDurableError:
            pytest.fail("except PgDurableError swallowed Cancelled")


def test_a_clients_cancelled_is_an_ordinary_error_too() -> None:
    # outside the orchestration there is nothing to unwind: a service's `except` catches it
    err = _errors.InstanceCancelled("instance 'i' was cancelled", instance_id="i", reason="ops")
    assert isinstance(err, pgd.Cancelled) and isinstance(err, Exception)
    for catch in (pgd.PgDurableError, Exception, pgd.Cancelled):
        try:
            raise err
        except catch as caught:
            assert caught is err
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is _errors.InstanceCancelled and (copy.instance_id, copy.reason, str(copy)) == (
        "i", "ops", "instance 'i' was cancelled")


def test_other_base_exceptions_are_not_pgdurable_errors() -> None:
    assert not isinstance(KeyboardInterrupt(), pgd.PgDurableError)
    assert not isinstance(ValueError(), pgd.PgDurableError)
    assert not issubclass(BaseException, pgd.PgDurableError)


@pytest.mark.parametrize(("err", "fields"), SAMPLES, ids=[type(e).__name__ for e, _ in SAMPLES])
def test_errors_keep_fields_and_pickle(err: BaseException, fields: dict[str, Any]) -> None:
    for key, value in fields.items():
        assert getattr(err, key) == value
    for clone in (pickle.loads(pickle.dumps(err)), copy.deepcopy(err)):
        assert type(clone) is type(err)
        assert str(clone) == str(err)
        assert clone.args == err.args
        for key, value in fields.items():
            assert getattr(clone, key) == value, key


def test_a_raised_error_pickles_with_its_fields() -> None:
    try:
        raise pgd.ActivityError(activity_name="a", error_type="T", error_message="m", attempts=2)
    except pgd.ActivityError as exc:
        clone = pickle.loads(pickle.dumps(exc))
    assert clone.attempts == 2 and clone.error_type == "T"


def test_messages() -> None:
    assert str(pgd.InstanceNotFound("x")) == "instance 'x' not found"
    assert str(pgd.InstanceAlreadyExists("x")) == "instance 'x' already exists"
    failed = pgd.InstanceFailed("x", {"type": "ValueError", "message": "bad"})
    assert str(failed) == "instance 'x' failed: ValueError: bad"
    assert str(pgd.InstanceFailed("x", "plain")) == "instance 'x' failed: plain"
    assert str(pgd.ActivityError(activity_name="embed", error_type="E", error_message="m")) == (
        "activity 'embed' failed: E: m"
    )
    assert str(pgd.ActivityError("custom", activity_name="embed")) == "custom"
    assert str(pgd.SubOrchestrationError(instance_id="c")) == "sub-orchestration 'c' failed"
    child_error = {"type": "ValueError", "message": "child broke"}
    assert str(pgd.SubOrchestrationError(instance_id="c", error=child_error)) == (
        "sub-orchestration 'c' failed: ValueError: child broke"
    )
    assert str(pgd.Cancelled()) == "cancelled"


def test_module_docstring_draws_every_error() -> None:
    doc = _errors.__doc__ or ""
    for cls in ERROR_CLASSES:
        assert cls.__name__ in doc, cls
