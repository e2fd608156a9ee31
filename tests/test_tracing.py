"""OpenTelemetry traces (``orchestrator/tracing.py``): a real query through real Ray actors, its spans taken by
the SDK's in-memory exporter, the tree asserted down to the span each expert's actor made in its own process;
and the OTLP/HTTP exporter against a receiver on 127.0.0.1 that decodes what it is sent.

The experts are simulated (real Ray actors that write words as a model decodes): the trace, not the text, is
under test.
"""

from __future__ import annotations

import os
import time
import uuid

import httpx
import pytest
from fastapi import FastAPI, Request
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orchestrator import tracing
from orchestrator.bench.fault_proxy import AppThread
from tests.live import ThreadServer

pytestmark = pytest.mark.ray

SIM = {"backend": "simulated", "memory_gb": 0.1, "load_s": 0.0, "step_s": 0.005}


def config(**server: object) -> dict:
    return {"ray": {"namespace": f"trace-{uuid.uuid4().hex[:6]}"},
            "routing": {"aggregation": "synthesize", "k": 2, "max_wait_ms": 2},
            "server": {"cache_ttl_s": 0, **server},
            "experts": [{"name": "sim-a", **SIM}, {"name": "sim-b", **SIM}]}


@pytest.fixture(scope="module")
def server(ray_cluster):
    s = ThreadServer(config())
    yield s
    s.stop()


def by_name(spans: list) -> dict[str, list]:
    found: dict[str, list] = {}
    for span in spans:
        found.setdefault(span.name, []).append(span)
    return found


def test_one_query_is_one_trace_down_into_the_actors(server):
    memory = InMemorySpanExporter()
    with tracing.exporting(memory):
        r = httpx.post(f"{server.url}/v1/query", json={"query": "Name a colour.", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.text
    spans = by_name(memory.get_finished_spans())
    (root,) = spans["POST /v1/query"]
    assert r.headers["x-concilium-trace-id"] == format(root.context.trace_id, "032x")
    assert root.parent is None and {s.context.trace_id for v in spans.values() for s in v} == {root.context.trace_id}

    def children(parent: object, name: str) -> list:
        return [s for s in spans.get(name, []) if s.parent is not None and s.parent.span_id == parent.context.span_id]

    (lookup,) = children(root, "cache.lookup")
    assert lookup.attributes["concilium.cache"] == "off"  # cache_ttl_s 0
    (window,) = children(root, "window")
    assert window.attributes["concilium.window_size"] >= 1
    (routing,) = children(window, "routing")
    assert sorted(routing.attributes["concilium.experts"]) == ["sim-a", "sim-b"]
    assert routing.attributes["concilium.k"] == 2
    (aggregation,) = children(window, "aggregation")
    assert aggregation.attributes["concilium.aggregation"] == "synthesize"
    calls = children(window, "expert.generate")
    assert len(calls) >= 2 and {c.attributes["concilium.expert"] for c in calls} == {"sim-a", "sim-b"}
    for call in calls:  # made in the actor's process, and sent back with its result
        assert call.resource.attributes["service.name"] == "concilium-expert"
        assert call.resource.attributes["process.pid"] != os.getpid()
        assert call.attributes["concilium.completion_tokens"] >= 1
        assert window.start_time <= call.start_time <= call.end_time <= window.end_time
    assert children(root, "store.write")
    body = r.json()
    assert root.attributes["concilium.answer_id"] == body["id"]
    assert root.attributes["concilium.cost_usd"] == body["cost_usd"]
    assert root.attributes["concilium.completion_tokens"] == body["total_usage"]["completion_tokens"]
    assert root.attributes["concilium.cache_hit"] == "none" and root.attributes["http.response.status_code"] == 200


def test_a_stream_is_traced_to_its_end_and_nothing_is_exported_when_off(server):
    memory = InMemorySpanExporter()
    with tracing.exporting(memory):
        with httpx.stream("POST", f"{server.url}/v1/query", timeout=60, json={
                "query": "Name a fruit.", "max_tokens": 4, "stream": True}) as r:
            trace_id = r.headers["x-concilium-trace-id"]
            events = [line for line in r.iter_lines() if line.startswith("data:")]
        deadline = time.monotonic() + 5  # the request's span ends once the server has sent the last byte
        while time.monotonic() < deadline and "POST /v1/query" not in by_name(memory.get_finished_spans()):
            time.sleep(0.02)
    assert events[-1] == "data: [DONE]"
    spans = by_name(memory.get_finished_spans())
    (root,) = spans["POST /v1/query"]
    assert format(root.context.trace_id, "032x") == trace_id and len(spans["expert.generate"]) >= 2
    off = InMemorySpanExporter()  # made, not switched on
    r = httpx.post(f"{server.url}/v1/query", json={"query": "Name a tree.", "max_tokens": 4}, timeout=60)
    assert len(r.headers["x-concilium-trace-id"]) == 32 and off.get_finished_spans() == ()


def test_the_otlp_exporter_sends_the_trace_to_its_endpoint(ray_cluster):
    received: list[ExportTraceServiceRequest] = []
    app = FastAPI()

    @app.post("/v1/traces")
    async def traces(request: Request) -> dict:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.body())
        received.append(message)
        return {}

    receiver = AppThread(app)
    server = ThreadServer(config(otel_endpoint=f"{receiver.base_url}/traces"))
    try:
        r = httpx.post(f"{server.url}/v1/query", json={"query": "Name a river.", "max_tokens": 4}, timeout=60)
        assert tracing.flush()
        names = {s.name for m in received for rs in m.resource_spans for ss in rs.scope_spans for s in ss.spans
                 if s.trace_id.hex() == r.headers["x-concilium-trace-id"]}
        assert {"POST /v1/query", "window", "routing", "expert.generate", "aggregation"} <= names
    finally:
        server.stop()
        tracing.configure(None)  # the exporter off again for the other tests of this process
        receiver.stop()
