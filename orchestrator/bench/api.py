"""``concilium bench api``: what HTTP adds on top of the pipeline.

One process, one event loop: the service, uvicorn serving the app on
127.0.0.1, and an httpx client. Each round runs, back to back, the same kind
of query three ways: ``pipeline.ask`` directly, ``POST /v1/query``, and
``POST /v1/route`` (routing only). Every query text is new and the response
cache is off, so nothing is served from a cache. With the default simulated
experts (1 ms per step, nothing to load) the experts' own time is small, so
the difference of medians is the API's overhead: validation, JSON, HTTP and
the store's answer record.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
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


async def run_api_bench(config: ConciliumConfig, n: int, progress: Callable[[str], None]) -> list[LatencyFigures]:
    config = config.model_copy(update={"server": config.server.model_copy(update={"cache_ttl_s": 0.0})})
    service = await Service.start(config)
    port = env.free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(config, service=service), host=env.LOOPBACK, port=port,
                                           log_level="warning"))
    serving = asyncio.create_task(server.serve())
    times: dict[str, list[float]] = {"pipeline.ask (direct)": [], "POST /v1/query": [], "POST /v1/route": []}
    try:
        while not server.started:
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient(base_url=f"http://{env.LOOPBACK}:{port}", timeout=60) as http:
            for i in range(-5, n):  # five warm-up rounds, not counted
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
    finally:
        server.should_exit = True
        await serving
        await service.close()
    return [LatencyFigures(path, len(v), statistics.median(v) * 1000, _p(v, 99)) for path, v in times.items()]
