"""OpenTelemetry traces of requests: one trace per HTTP request, from the API through the scheduler's window into
each expert's actor and back.

- The API's middleware opens the request's span and returns its trace id (``x-concilium-trace-id``); the
  service adds the cache lookup, the store writes and the answer's figures; the scheduler adds the window,
  the routing decision and the aggregation (``engine.spans``).
- An expert's actor makes its own span for each traced row of a call (``workers.spans``), under the context
  the row's prompt carries (W3C ``traceparent``), and sends it back with the result: an actor has no exporter
  of its own to configure, and its span joins the request's trace here (``adopt``).
- The API process's spans are always made, so the trace id is always there; the actors make theirs only while
  an exporter is on (``carrier``), as they would be sent back only to be dropped.
- Spans are exported only where an exporter is on: ``server.otel_endpoint`` (an OTLP/HTTP traces URL) or the
  standard ``OTEL_EXPORTER_OTLP_ENDPOINT``; off by default. ``exporting`` adds another (a test's in-memory
  exporter, the bench's).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

SERVICE = "concilium"
TRACE_HEADER = "x-concilium-trace-id"
OTLP_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
_PROPAGATOR = TraceContextTextMapPropagator()


class _Relay(SpanProcessor):
    """The provider's one processor: hands each finished span to the exporters on now. Written here because the
    SDK's processors cannot be removed once added, and the bench and tests switch exporters on and off."""

    def __init__(self) -> None:
        self.processors: list[SpanProcessor] = []
        self._lock = threading.Lock()

    def add(self, processor: SpanProcessor) -> None:
        with self._lock:
            self.processors = [*self.processors, processor]

    def remove(self, processor: SpanProcessor, shutdown: bool = True) -> None:
        with self._lock:
            self.processors = [p for p in self.processors if p is not processor]
        if shutdown:
            processor.shutdown()

    def on_end(self, span: ReadableSpan) -> None:
        for processor in self.processors:
            processor.on_end(span)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return all(p.force_flush(timeout_millis) for p in self.processors)

    def shutdown(self) -> None:
        for processor in self.processors:
            processor.shutdown()


_RESOURCE = Resource.create({"service.name": SERVICE})
_RELAY = _Relay()
_PROVIDER = TracerProvider(resource=_RESOURCE)
_PROVIDER.add_span_processor(_RELAY)
TRACER = _PROVIDER.get_tracer("concilium")
_OTLP: tuple[str | None, SpanProcessor] | None = None
"""The OTLP exporter that is on, and the endpoint it was configured with."""


def configure(endpoint: str | None) -> None:
    """Export to ``endpoint`` (an OTLP/HTTP traces URL), else to ``$OTEL_EXPORTER_OTLP_ENDPOINT`` when it is set,
    else not at all. At start and on reload; the process has one OTLP exporter."""
    global _OTLP
    wanted = endpoint or os.environ.get(OTLP_ENV)
    if _OTLP is not None and (_OTLP[0] == endpoint and wanted):
        return
    if _OTLP is not None:
        _RELAY.remove(_OTLP[1])
        _OTLP = None
    if wanted:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter())
        _RELAY.add(processor)
        _OTLP = (endpoint, processor)


def flush() -> bool:
    """Send what the exporters hold now (a batch exporter waits up to 5 s otherwise)."""
    return _RELAY.force_flush()


@contextlib.contextmanager
def exporting(exporter: SpanExporter) -> Iterator[None]:
    """Export every span that ends inside the block to ``exporter``, synchronously."""
    processor = SimpleSpanProcessor(exporter)
    _RELAY.add(processor)
    try:
        yield
    finally:
        _RELAY.remove(processor, shutdown=False)  # the exporter is the caller's, to read after the block


def current() -> otel_context.Context | None:
    """The context to trace a request's work in: the current one, when a span is open in it."""
    return otel_context.get_current() if trace.get_current_span().get_span_context().is_valid else None


def describe(response_figures: dict[str, object]) -> None:
    """Put an answer's figures on the request's span (what the trace is searched by)."""
    trace.get_current_span().set_attributes({f"concilium.{k}": v for k, v in response_figures.items()
                                             if v is not None})


def carrier(context: otel_context.Context | None) -> dict[str, str] | None:
    """The W3C headers that carry ``context`` across a Ray call; None when there is no trace to join, or nothing
    would export the actor's spans."""
    if not _RELAY.processors or context is None or not trace.get_current_span(context).get_span_context().is_valid:
        return None
    headers: dict[str, str] = {}
    _PROPAGATOR.inject(headers, context=context)
    return headers


def adopt(records: list[dict]) -> None:
    """Spans an actor made (``workers.spans.record``), exported here as they were made there."""
    if not records or not _RELAY.processors:
        return
    for r in records:
        resource = _resource(tuple(sorted(r["resource"].items())))
        sampled = TraceFlags(TraceFlags.SAMPLED)
        status = Status(StatusCode.ERROR, r["error"]) if r.get("error") else Status(StatusCode.OK)
        span = ReadableSpan(
            name=r["name"], kind=SpanKind.INTERNAL, attributes=r["attributes"], start_time=r["start"], status=status,
            end_time=r["end"], resource=resource,
            context=SpanContext(r["trace_id"], r["span_id"], is_remote=False, trace_flags=sampled),
            parent=SpanContext(r["trace_id"], r["parent_id"], is_remote=True, trace_flags=sampled),
        )
        _RELAY.on_end(span)


@functools.lru_cache(maxsize=256)
def _resource(attributes: tuple[tuple[str, object], ...]) -> Resource:
    """An actor's resource, made once per actor process: ``Resource.create`` reads the environment each time."""
    return Resource.create(dict(attributes))


def trace_id() -> str | None:
    """The current trace's id in hex, as the header and the console show it."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None
