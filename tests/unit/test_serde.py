"""JSON payloads (``_serde``) and ``RetryPolicy`` arithmetic."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import orjson
import pytest

import pgdurable_async as pgd
from pgdurable_async._base.events import error_payload
from pgdurable_async._base.serde import DEFAULT_MAX_PAYLOAD_BYTES, decode, encode, normalize


# -- encode ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "null"),
        ([1, "a", 2.5, True], '[1,"a",2.5,true]'),
        ({"k": (1, 2)}, '{"k":[1,2]}'),
        ({1: "one"}, '{"1":"one"}'),
        ("żółw ✓", '"żółw ✓"'),
        (uuid.UUID(int=1), '"00000000-0000-0000-0000-000000000001"'),
        (dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC), '"2024-01-02T03:04:05+00:00"'),
    ],
)
def test_encode(value: Any, text: str) -> None:
    assert encode(value) == text
    assert decode(text) == decode(encode(value))


@pytest.mark.parametrize("value", [object(), {1, 2}, b"bytes", {"nested": [object()]}, 2**70],
                         ids=["object", "set", "bytes", "nested", "huge-int"])
def test_unserializable_value_is_a_serialization_error(value: Any) -> None:
    with pytest.raises(pgd.SerializationError) as info:
        encode(value, what="input of activity 'embed'")
    err = info.value
    assert isinstance(err, pgd.PgDurableError)
    assert err.what == "input of activity 'embed'"
    assert str(err).startswith("input of activity 'embed' is not JSON-serializable")
    assert err.__cause__ is None and err.__suppress_context__  # no orjson internals chained


def test_over_the_limit_names_the_size() -> None:
    value = "x" * 98  # 100 bytes encoded, with the quotes
    assert encode(value, limit=100) == f'"{value}"'
    with pytest.raises(pgd.SerializationError) as info:
        encode(value + "x", what="orchestration output", limit=100)
    err = info.value
    assert (err.size, err.limit, err.what) == (101, 100, "orchestration output")
    assert "orchestration output is 101 bytes encoded, over the 100-byte payload limit" == str(err)


def test_default_limit() -> None:
    assert DEFAULT_MAX_PAYLOAD_BYTES == 4 * 1024 * 1024
    with pytest.raises(pgd.SerializationError):
        encode("x" * DEFAULT_MAX_PAYLOAD_BYTES)


@pytest.mark.parametrize("value", ["a\x00b", {"k\x00": 1}, ["ok", {"deep": "\x00"}]], ids=["value", "key", "nested"])
def test_nul_characters_are_rejected(value: Any) -> None:
    with pytest.raises(pgd.SerializationError, match="NUL character"):
        encode(value, what="custom status")


def test_a_backslash_before_u0000_is_not_a_nul() -> None:
    text = "C:\\u0000dir"  # a backslash, then the characters u0000: no NUL anywhere
    assert "\x00" not in text
    assert decode(encode(text)) == text


def test_normalize_is_what_the_database_gives_back() -> None:
    assert normalize({"t": (1, 2), 3: [None]}) == {"t": [1, 2], "3": [None]}
    value = {"a": [1, 2.5, "s", None, True]}
    assert normalize(value) == value == orjson.loads(encode(value))


def test_error_payload() -> None:
    try:
        raise ValueError("bad input")
    except ValueError as exc:
        payload = error_payload(exc)
    assert payload["type"] == "ValueError" and payload["message"] == "bad input"
    assert payload["traceback"].startswith("Traceback") and "test_error_payload" in payload["traceback"]
    assert error_payload(KeyError("k"))["traceback"] == "KeyError: 'k'\n"  # never raised: no frames


# -- RetryPolicy --------------------------------------------------------------------------------------
def test_retry_delay_grows_by_backoff_up_to_the_cap() -> None:
    policy = pgd.RetryPolicy(max_attempts=10, initial_interval=0.5, backoff=2.0, max_interval=3.0)
    assert [policy.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert all(isinstance(policy.delay(n), float) for n in range(1, 4))
    flat = pgd.RetryPolicy(initial_interval=2, backoff=1.0)
    assert flat.delay(1) == flat.delay(5) == 2.0


def test_retry_defaults() -> None:
    policy = pgd.RetryPolicy()
    assert (policy.max_attempts, policy.initial_interval, policy.backoff, policy.max_interval) == (3, 1.0, 2.0, 60.0)
    assert policy.non_retryable == ()


def test_should_retry() -> None:
    policy = pgd.RetryPolicy(max_attempts=3, non_retryable=("ValueError",))
    assert policy.should_retry(1, "HTTPError")
    assert policy.should_retry(2, "HTTPError")
    assert not policy.should_retry(3, "HTTPError")  # the third attempt was the last
    assert not policy.should_retry(1, "ValueError")
    assert not pgd.RetryPolicy(max_attempts=1).should_retry(1, "HTTPError")


@pytest.mark.parametrize(
    "kwargs",
    [{"max_attempts": 0}, {"initial_interval": -1}, {"max_interval": -0.5}, {"backoff": 0.5}],
)
def test_retry_policy_rejects_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        pgd.RetryPolicy(**kwargs)


def test_retry_policy_is_frozen_and_hashable() -> None:
    policy = pgd.RetryPolicy(non_retryable=("A",))
    with pytest.raises(AttributeError):
        policy.max_attempts = 9  # type: ignore[misc]
    assert hash(policy) == hash(pgd.RetryPolicy(non_retryable=("A",)))


# -- deep values (orjson encodes at most 255 levels) ------------------------------------------------
def _nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def test_values_deeper_than_orjson_goes_are_encoded() -> None:
    """A graph 256 nodes deep nests 512 JSON levels (two per join); history must hold it."""
    value = {"graph": _nested(600, {"k": "żółw", "d": dt.datetime(2024, 1, 2, tzinfo=dt.UTC), "u": uuid.UUID(int=1)})}
    text = encode(value)
    assert decode(text) == normalize(value) == decode(encode(normalize(value)))
    assert '"d":"2024-01-02T00:00:00+00:00"' in text and '"u":"00000000-0000-0000-0000-000000000001"' in text


@pytest.mark.parametrize("leaf", [float("nan"), {1, 2}, "\ud800"], ids=["nan", "set", "surrogate"])
def test_a_deep_value_that_cannot_be_encoded_is_a_serialization_error(leaf: Any) -> None:
    with pytest.raises(pgd.SerializationError):
        encode(_nested(300, leaf))


def test_a_value_deeper_than_the_interpreter_goes_is_a_serialization_error() -> None:
    with pytest.raises(pgd.SerializationError, match="nests too deep"):
        encode(_nested(100_000, 1))
