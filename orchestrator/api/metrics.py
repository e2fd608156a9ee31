"""Prometheus metrics of one API process, in their own registry.

A registry per app (not the global default) lets several apps live in one
process, as tests and Ray Serve replicas do, without duplicate-metric errors.
Pool and scheduler figures are read at scrape time from their own counters,
so there is one source of truth for loads and queue depth.
"""

from __future__ import annotations

from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


LIVE = (
    (CounterMetricFamily, "concilium_model_loads", "models loaded into memory", "loads"),
    (CounterMetricFamily, "concilium_load_failures", "model loads that failed (the expert is then unavailable)",
     "load_failures"),
    (GaugeMetricFamily, "concilium_queue_depth", "requests waiting for a scheduler window", "queue_depth"),
    (GaugeMetricFamily, "concilium_resident_experts", "experts resident in memory", "resident"),
    (CounterMetricFamily, "concilium_scheduled", "requests the scheduler's windows processed", "scheduled"),
    (CounterMetricFamily, "concilium_windows", "scheduler windows run (loads per window: model_loads / windows)",
     "windows"),
    (CounterMetricFamily, "concilium_generated_tokens", "completion tokens the experts generated, for answered and "
                                                        "cancelled rows alike", "generated_tokens"),
    (GaugeMetricFamily, "concilium_pending", "requests admitted and not yet answered", "pending"),
    (CounterMetricFamily, "concilium_rejected", "requests refused because max_pending were admitted", "rejected"),
    (GaugeMetricFamily, "concilium_store_up", "1 while the store answers, 0 while the cache and jobs are off",
     "store_up"),
)


class _Live:
    """Figures owned by the pool and the scheduler, read when scraped."""

    def __init__(self, read: Callable[[], dict[str, float]]) -> None:
        self.read = read

    def collect(self):  # noqa: ANN201  (prometheus-client's collector protocol)
        figures = self.read()
        for family, name, doc, key in LIVE:
            metric = family(name, doc)
            metric.add_metric([], figures.get(key, 0.0))
            yield metric


class Metrics:
    def __init__(self, live: Callable[[], dict[str, float]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("concilium_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram("concilium_request_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.routed = Counter("concilium_routed", "recruitments per expert", ["expert"], registry=r)
        self.cache = Counter("concilium_cache", "exact response cache lookups", ["result"], registry=r)
        self.semantic = Counter("concilium_semantic_cache", "semantic cache lookups after an exact miss",
                                ["result"], registry=r)
        self.similarity = Histogram("concilium_semantic_similarity", "similarity of each semantic hit",
                                    buckets=(0.9, 0.92, 0.94, 0.96, 0.98, 0.99, 1.0), registry=r)
        self.cache_lookup = Histogram("concilium_cache_lookup_seconds", "one cache lookup", ["kind"],
                                      buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1), registry=r)
        self.store_errors = Counter("concilium_store_errors", "store calls that failed", ["use"], registry=r)
        self.feedback = Counter("concilium_feedback", "feedback received", ["expert"], registry=r)
        self.cancelled = Counter("concilium_cancelled", "requests cancelled because the client went away",
                                 registry=r)
        self.consensus = Counter("concilium_consensus_skips", "answers whose experts agreed, so the aggregator "
                                 "call was skipped", registry=r)
        self.timeouts = Counter("concilium_timeouts", "requests past server.request_timeout_s", registry=r)
        self.retries = Counter("concilium_remote_retries", "remote expert calls tried again before they answered",
                               ["expert"], registry=r)
        r.register(_Live(live))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> WSGIServer:
        """This registry on a port of its own (``server.metrics_port``), for a scraper that holds no API key.
        prometheus-client's own server, in a daemon thread; ``shutdown()`` then ``server_close()`` stop it."""
        server, _ = start_http_server(port, host, registry=self.registry)
        return server
