"""Spans of an expert's calls, made in its actor and sent back with the result (``GenerationResult.spans``).

A row whose prompt carries a trace context (W3C ``traceparent``, in ``Prompt.trace``) gets one span for the
call that generated it, a child of that context, made with the OpenTelemetry SDK in the actor's process. The
actor exports nothing itself: its spans travel back as plain records, picklable and small, and the process
that asked joins them to the request's trace (``orchestrator.tracing.adopt``). A worker knows nothing of what
the trace belongs to.
"""

from __future__ import annotations

import os
import socket

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, TracerProvider
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from workers.types import Completion, Prompt

_RESOURCE = {"service.name": "concilium-expert", "process.pid": os.getpid(), "host.name": socket.gethostname()}
_TRACER = TracerProvider(resource=Resource.create(_RESOURCE)).get_tracer("concilium.worker")
_PROPAGATOR = TraceContextTextMapPropagator()


class CallSpans:
    """One span per traced row of a call: opened when the call starts, closed with the row's outcome."""

    def __init__(self, expert: str, backend: str, prompts: list[Prompt]) -> None:
        self._spans: list[tuple[int, Span]] = []
        for row, prompt in enumerate(prompts):
            if prompt.trace:
                attributes = {"concilium.expert": expert, "concilium.backend": backend,
                              "concilium.batch_size": len(prompts), "concilium.row": row}
                span = _TRACER.start_span("expert.generate", context=_PROPAGATOR.extract(prompt.trace),
                                          attributes=attributes)
                self._spans.append((row, span))

    def close(self, completions: list[Completion] | None, error: BaseException | None = None) -> list[dict]:
        """End every span with its row's figures (or the call's error) and return them as records."""
        for row, span in self._spans:
            if completions is not None:
                c = completions[row]
                span.set_attributes({"concilium.prompt_tokens": c.prompt_tokens,
                                     "concilium.completion_tokens": c.completion_tokens,
                                     "concilium.finish_reason": c.finish_reason,
                                     "concilium.retries": int(c.meta.get("retries", 0))})
                if c.error is not None:
                    span.set_status(Status(StatusCode.ERROR, c.error))
            elif error is not None:
                span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
            span.end()
        return [record(span) for _, span in self._spans]


def record(span: ReadableSpan) -> dict:
    """What the asking process needs to export the span as it was made."""
    return {"name": span.name, "trace_id": span.context.trace_id, "span_id": span.context.span_id,
            "parent_id": span.parent.span_id if span.parent else 0, "start": span.start_time,
            "end": span.end_time, "attributes": dict(span.attributes or {}),
            "resource": dict(span.resource.attributes), "error": span.status.description
            if span.status.status_code == StatusCode.ERROR else None}
