"""OpenTelemetry spans, when ``opentelemetry-api`` is installed (``pip install 'pgdurable_async[otel]'``).

The only module that imports OpenTelemetry; without it every function here is a no-op.
Spans are made only while a real tracer provider is set (an SDK's, or any but the API's
default proxy), so a process that traces nothing pays nothing, not even a query for the
stored trace context.

Spans: ``pgdurable.start`` (``Client.start``), ``pgdurable.turn`` (one per instance and
committed turn) and ``pgdurable.activity`` (one per attempt), with the attributes
``pgdurable.instance_id``, ``pgdurable.name`` and (activities) ``pgdurable.attempt``.
``Client.start`` stores the W3C trace context of its span with the instance (its
``traceparent`` and ``tracestate``: a *carrier*); turn and activity spans take it as their
parent, so they join the caller's trace whichever process runs them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from .version import __version__

try:
    from opentelemetry import trace as _trace
    from opentelemetry.trace import Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # the otel extra is not installed: spans are no-ops
    _trace = None  # type: ignore[assignment]

START = "pgdurable.start"
TURN = "pgdurable.turn"
ACTIVITY = "pgdurable.activity"
INSTANCE_ID = "pgdurable.instance_id"
NAME = "pgdurable.name"
ATTEMPT = "pgdurable.attempt"

Carrier = dict[str, str]
Attributes = Mapping[str, str | int]

_propagator = TraceContextTextMapPropagator() if _trace is not None else None


def installed() -> bool:
    """Whether ``opentelemetry-api`` could be imported."""
    return _trace is not None


def active() -> bool:
    """Whether spans are recorded: the API is installed and a tracer provider is set."""
    if _trace is None:
        return False
    provider = _trace.get_tracer_provider()
    return not isinstance(provider, _trace.ProxyTracerProvider | _trace.NoOpTracerProvider)


def _tracer() -> Any:
    assert _trace is not None
    return _trace.get_tracer("pgdurable_async", __version__)


def _context(parent: Carrier | None) -> Any:
    return None if parent is None or _propagator is None else _propagator.extract(parent)


@contextmanager
def span(name: str, attributes: Attributes, *, parent: Carrier | None = None) -> Iterator[None]:
    """A span around the block, current inside it; a child of ``parent`` (a stored carrier),
    else of the current span.  An exception leaving the block is recorded on it."""
    if not active():
        yield
        return
    with _tracer().start_as_current_span(name, context=_context(parent), attributes=dict(attributes)):
        yield


def record(name: str, attributes: Attributes, *, parent: Carrier | None, start_ns: int, end_ns: int) -> None:
    """A span that already happened (a turn, made once its transaction committed)."""
    if not active():
        return
    s = _tracer().start_span(name, context=_context(parent), attributes=dict(attributes), start_time=start_ns)
    s.end(end_time=end_ns)


def carrier() -> Carrier | None:
    """The current span's W3C trace context (``traceparent``, maybe ``tracestate``), or None."""
    if _propagator is None or not active() or not _trace.get_current_span().get_span_context().is_valid:
        return None
    found: Carrier = {}
    _propagator.inject(found)
    return found or None


def fail_current(error_type: str, message: str) -> None:
    """Mark the current span failed (an activity attempt that raised: its error is data, not an exception)."""
    if not active():
        return
    current = _trace.get_current_span()
    current.set_attribute("exception.type", error_type)
    current.set_status(Status(StatusCode.ERROR, f"{error_type}: {message}"[:1000]))
