"""``concilium bench api``: what HTTP adds on top of the pipeline.

One process, one event loop: the service, uvicorn serving the app on
127.0.0.1, and an httpx client. Every query text is new and the response cache
is off, so nothing is served from a cache.

- Answers (``run_api_bench``): each round runs, back to back, the same kind of
  query three ways: ``pipeline.ask`` directly, ``POST /v1/query``, and
  ``POST /v1/route`` (routing only). With the default simulated experts (1 ms
  per step, nothing to load) the experts' own time is small, so the difference
  of medians is the API's overhead: validation, JSON, HTTP and the store's
  answer record.
- Streams (``run_stream_bench``): time to the first token and to the end, for
  one expert's stream straight from the pool, the same expert through
  ``/v1/chat/completions`` with ``stream: true``, and a synthesised answer,
  whose first token comes from the aggregator after the experts answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import uvicorn

from orchestrator import env
from orchestrator.api.app import create_app
from orchestrator.api.schemas import QueryBody
from orchestrator.api.service import Service
from orchestrator.config import ConciliumConfig
from routers.vocabulary import Aggregation
from workers.config import SimulatedExpert
from workers.types import GenerationResult


@dataclass
class LatencyFigures:
    path: str
    n: int
    p50_ms: float
    p99_ms: float


def default_experts() -> list[SimulatedExpert]:
    return [
        SimulatedExpert(backend="simulated", name=name, memory_gb=0.1, load_s=0.0, step_s=0.001)
        for name in ("sim-a", "sim-b")
    ]


def _p(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


@dataclass
class StreamFigures:
    path: str
    n: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    total_p50_ms: float
    total_p99_ms: float


WARM_UP = 5
"""Rounds run first and not counted: loads, caches and the JIT settle."""


@contextlib.asynccontextmanager
async def serving(config: ConciliumConfig) -> AsyncIterator[tuple[Service, httpx.AsyncClient]]:
    """The service with its response cache off, served on a free loopback port, and a client for it."""
    config = config.model_copy(update={"server": config.server.model_copy(update={"cache_ttl_s": 0.0})})
    service = await Service.start(config)
    port = env.free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(config, service=service), host=env.LOOPBACK, port=port,
                                           log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient(base_url=f"http://{env.LOOPBACK}:{port}", timeout=600) as http:
            yield service, http
    finally:
        server.should_exit = True
        await task
        await service.close()


async def run_api_bench(config: ConciliumConfig, n: int, progress: Callable[[str], None]) -> list[LatencyFigures]:
    times: dict[str, list[float]] = {"pipeline.ask (direct)": [], "POST /v1/query": [], "POST /v1/route": []}
    async with serving(config) as (service, http):
        for i in range(-WARM_UP, n):
            if i % 50 == 0:
                progress(f"round {max(i, 0)}/{n}")
            body = {"query": f"Question {i}: what is {i} + {i}?", "max_tokens": 4, "aggregation": Aggregation.BEST.value}
            t0 = time.perf_counter()
            await service.pipeline.ask(service.to_request(QueryBody.model_validate(body)))
            t1 = time.perf_counter()
            (await http.post("/v1/query", json={**body, "query": body["query"] + " (http)"})).raise_for_status()
            t2 = time.perf_counter()
            (await http.post("/v1/route", json={"query": body["query"]})).raise_for_status()
            t3 = time.perf_counter()
            if i >= 0:
                for path, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                    times[path].append(dt)
    return [LatencyFigures(path, len(v), statistics.median(v) * 1000, _p(v, 99)) for path, v in times.items()]


async def _pool_stream(service: Service, expert: str, question: str, max_tokens: int) -> tuple[float, float]:
    """(first token, end) in seconds for one call of ``expert`` straight from the pool, as the API would ask it."""
    body = QueryBody(query=question, max_tokens=max_tokens, experts=[expert], k=1)
    request = service.to_request(body)
    t0, first = time.perf_counter(), None
    async for item in service.pipeline.expert_stream(request, expert, f"bench-{time.time_ns()}"):
        if first is None and not isinstance(item, GenerationResult) and any(d.text for d in item):
            first = time.perf_counter() - t0
    return first if first is not None else time.perf_counter() - t0, time.perf_counter() - t0


async def _api_stream(http: httpx.AsyncClient, body: dict[str, object]) -> tuple[float, float]:
    """(first content chunk, ``[DONE]``) in seconds for one streamed chat completion."""
    t0, first = time.perf_counter(), None
    async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: {"):
                choices = json.loads(line[len("data: "):]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    first = time.perf_counter() - t0
    return first if first is not None else time.perf_counter() - t0, time.perf_counter() - t0


async def run_stream_bench(config: ConciliumConfig, n: int, max_tokens: int,
                           progress: Callable[[str], None]) -> list[StreamFigures]:
    """Per round, a new question three ways: the first expert's stream from the pool, the same expert through
    the API, and a synthesis over every expert (its first token is the aggregator's)."""
    expert = config.experts[0].name
    paths = {f"{expert}: pool stream (direct)": [], f"{expert}: POST /v1/chat/completions stream": [],
             "synthesis: POST /v1/chat/completions stream": []}
    async with serving(config) as (service, http):
        for i in range(-WARM_UP, n):
            progress(f"round {max(i, 0)}/{n}")
            question = f"In one sentence, what is {i} + {i + 1}?"
            chat = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens}
            synthesis = {**chat, "model": "concilium", "aggregation": Aggregation.SYNTHESIZE.value,
                         "k": len(config.experts), "messages": [{"role": "user", "content": question + " Explain."}]}
            timings = [await _pool_stream(service, expert, question, max_tokens),
                       await _api_stream(http, {**chat, "model": expert}), await _api_stream(http, synthesis)]
            if i >= 0:
                for path, t in zip(paths, timings):
                    paths[path].append(t)
    return [StreamFigures(path, len(v), statistics.median(t for t, _ in v) * 1000, _p([t for t, _ in v], 99),
                          statistics.median(e for _, e in v) * 1000, _p([e for _, e in v], 99))
            for path, v in paths.items()]
