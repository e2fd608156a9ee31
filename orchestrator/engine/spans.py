"""The scheduler's part of a request's trace: its window, and in it the routing decision and the aggregation.

A window serves many requests at once, so each traced request gets a span of its own for it. The window's
span is opened when the window starts and is the context the request's prompts carry into the experts'
actors (``QueryRequest.trace``); the routing and aggregation spans are made when the window ends, with the
times the window recorded, so no span is held open across phases that serve other requests too.
"""

from __future__ import annotations

import time

from opentelemetry.trace import Span, set_span_in_context

from orchestrator.engine.requests import InFlight
from orchestrator.tracing import TRACER
from routers.aggregation import Aggregated


class WindowSpans:
    def __init__(self, live: list[InFlight]) -> None:
        self.started = self.routed = self.solved = time.time_ns()
        self._spans: dict[int, Span] = {}
        for i, p in enumerate(live):
            if p.request.trace is None:
                continue
            span = TRACER.start_span("window", context=p.request.trace, start_time=self.started, attributes={
                "concilium.window_size": len(live), "concilium.queue_s": p.timings.get("queue_s", 0.0)})
            p.request.trace = set_span_in_context(span, p.request.trace)
            self._spans[i] = span

    def mark_routed(self) -> None:
        self.routed = time.time_ns()

    def mark_solved(self) -> None:
        self.solved = time.time_ns()

    def close(self, live: list[InFlight], results: dict[int, Aggregated]) -> None:
        ended = time.time_ns()
        for i, span in self._spans.items():
            p, context = live[i], live[i].request.trace
            if p.decision is not None:
                TRACER.start_span("routing", context=context, start_time=self.started, attributes={
                    "concilium.router": str(p.decision.trace.get("router", "")),
                    "concilium.experts": list(p.decision.experts), "concilium.k": p.request.options.k,
                    "concilium.policy": str(p.request.options.policy)}).end(end_time=self.routed)
            done = results.get(i)
            TRACER.start_span("aggregation", context=context, start_time=self.solved, attributes={
                "concilium.aggregation": str(p.request.aggregation),
                "concilium.aggregator": (done.aggregator if done else None) or "",
                "concilium.skipped": (done.skipped if done else None) or ""}).end(end_time=ended)
            span.set_attribute("concilium.answers", len(p.answers))
            span.end(end_time=ended)
