"""``concilium bench tracing``: what tracing costs a ``/v1/query``, exporter on (the SDK's in-memory exporter)
against off, side by side in one server.

The API runs in this process (uvicorn in a thread, on local Ray), so the exporter can be switched on and off
between requests: blocks of ``block`` requests alternate, and the medians of each side are compared. The
experts are simulated, 2 of them with a synthesis, so a request has the spans a real one has (the window, the
routing, each expert's call in its actor, the aggregation) and a short generation that does not hide the cost.
With the exporter off the API process's spans are still made (the trace id is always returned) and the actors
make none: what the figure measures is the actors' spans and exporting them all.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orchestrator import tracing
from orchestrator.api.app import create_app
from orchestrator.bench.fault_proxy import AppThread
from orchestrator.client import wait_until_ready
from orchestrator.config import parse_config
from orchestrator.engine.runtime import init_ray

SIM = {"backend": "simulated", "memory_gb": 0.1, "load_s": 0.0, "step_s": 0.001}


@dataclass
class TracingReport:
    on_ms: list[float] = field(default_factory=list)
    off_ms: list[float] = field(default_factory=list)
    spans_per_request: float = 0.0

    @property
    def on_p50(self) -> float:
        return statistics.median(self.on_ms)

    @property
    def off_p50(self) -> float:
        return statistics.median(self.off_ms)


def _config() -> dict:
    return {"ray": {"namespace": f"bench-tracing-{uuid.uuid4().hex[:6]}"},
            "routing": {"aggregation": "synthesize", "k": 2, "max_wait_ms": 0},
            "server": {"cache_ttl_s": 0},
            "experts": [{"name": "sim-a", **SIM}, {"name": "sim-b", **SIM}]}


def _ask(http: httpx.Client, i: int) -> float:
    t0 = time.perf_counter()
    r = http.post("/v1/query", json={"query": f"Name colour number {i}.", "max_tokens": 4})
    r.raise_for_status()
    return (time.perf_counter() - t0) * 1000


def run_tracing(requests: int, block: int, progress: Callable[[str], None]) -> TracingReport:
    config = parse_config(_config(), "bench tracing")
    init_ray(config.ray)
    server = AppThread(create_app(config))
    url = server.base_url.removesuffix("/v1")
    report, memory = TracingReport(), InMemorySpanExporter()
    try:
        wait_until_ready(url, 180)
        with httpx.Client(base_url=url, timeout=60) as http:
            for i in range(block):  # warm: the experts loaded, the connection open
                _ask(http, i)
            while len(report.on_ms) < requests:
                done = len(report.on_ms)
                progress(f"{done} of {requests} requests on each side")
                with tracing.exporting(memory):
                    report.on_ms += [_ask(http, 2 * done + j) for j in range(block)]
                report.off_ms += [_ask(http, 2 * done + block + j) for j in range(block)]
        report.spans_per_request = len(memory.get_finished_spans()) / max(1, len(report.on_ms))
    finally:
        server.stop()
    return report
