"""OpenTelemetry's SDK for the tracing tests: an in-memory exporter behind the global tracer provider.

The provider is set for one test and reset after it (as opentelemetry's own test utilities
do), so the other tests run without tracing.  ``FileSpanExporter`` is what a worker process
(tests/acceptance/trace_app.py) uses to hand its spans to the test process.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once


def install(exporter: SpanExporter) -> TracerProvider:
    """Make a provider exporting to ``exporter`` (at each span's end) the global one."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def reset() -> None:
    """Back to the API's default (no provider: pgdurable makes no spans)."""
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = install(exporter)
    try:
        yield exporter
    finally:
        provider.shutdown()
        reset()


def as_dict(span: ReadableSpan) -> dict[str, Any]:
    """The parts of a span the tests compare, with ids as 32/16 hex digits."""
    ctx = span.get_span_context()
    assert ctx is not None
    return {
        "name": span.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": f"{span.parent.span_id:016x}" if span.parent is not None else None,
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
    }


class FileSpanExporter(SpanExporter):
    """Appends each finished span to a file as one JSON line (``as_dict``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self.path.open("a", encoding="utf-8") as out:
            for span in spans:
                out.write(json.dumps(as_dict(span)) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass
