"""``concilium bench scheduler``: batched-by-expert against per-query execution, same workload, same models.

Variants:
- batched: this scheduler. The burst of N queries is cut into windows and
  grouped by expert.
- naive: Symbolic-MoE's naive baseline. Query by query, each of its experts
  is loaded, generates and is unloaded.
- resident: query by query, all experts resident, no batching.

All N queries arrive at t = 0. A request's latency is the time from then until
its answer, so the latency figures compare like with like. Each query is
assigned one or two experts at random (seeded). Routing is replaced by this
fixed assignment, so only scheduling differs between the variants.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.bench.models import PROMPTS
from orchestrator.scheduler import QueryRequest, Scheduler, SchedulerSettings
from routers.base import Decision
from workers.config import ExpertConfig, PoolConfig
from workers.pool import ExpertPool
from workers.types import SamplingParams


@dataclass
class VariantFigures:
    variant: str
    budget: str
    n: int
    loads: int
    wall_s: float
    queries_per_s: float
    tokens_per_s: float
    p50_s: float
    p95_s: float
    overhead_ms_per_query: float | None = None


class _FixedRouter:
    """Replays a given assignment: the benchmark measures scheduling, not routing."""

    name = "fixed"

    def __init__(self, assignment: dict[str, list[str]]) -> None:
        self.assignment = assignment

    def fit(self, train: object) -> None:
        raise NotImplementedError("a fixed assignment learns nothing")

    def route(self, texts: list[str], options: object, vectors: object = None) -> list[Decision]:
        return [
            Decision(experts=self.assignment[t], scores={e: 1.0 for e in self.assignment[t]}) for t in texts
        ]


def workload(n: int, experts: list[str], seed: int = 0) -> dict[str, list[str]]:
    rng = random.Random(seed)
    return {
        f"{PROMPTS[i % len(PROMPTS)]} (#{i})": rng.sample(experts, rng.choice([1, 2]) if len(experts) > 1 else 1)
        for i in range(n)
    }


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def _figures(variant: str, budget: str, lat: list[float], wall: float, tokens: int, loads: int) -> VariantFigures:
    return VariantFigures(
        variant, budget, len(lat), loads, wall, len(lat) / wall, tokens / wall,
        statistics.median(lat), _percentile(lat, 95),
    )


async def _batched(pool: ExpertPool, work: dict[str, list[str]], params: SamplingParams, budget: str,
                   max_batch: int) -> VariantFigures:
    sched = Scheduler(_FixedRouter(work), pool, SchedulerSettings(max_batch=max_batch, max_wait_ms=50), {})
    sched.start()
    loads0, t0 = pool.stats.loads, time.perf_counter()
    latencies: list[float] = []

    async def one(q: str) -> int:
        request = QueryRequest(q, aggregation="best", max_new_tokens=params.max_new_tokens,
                               temperature=params.temperature)
        ans = await sched.submit(request)
        latencies.append(time.perf_counter() - t0)
        return sum(a.completion_tokens for a in ans.answers)

    try:
        tokens = sum(await asyncio.gather(*(one(q) for q in work)))
    finally:
        await sched.stop()
    fig = _figures("batched", budget, latencies, time.perf_counter() - t0, tokens, pool.stats.loads - loads0)
    fig.overhead_ms_per_query = statistics.median(sched.stats.overhead_s) * 1000
    return fig


async def _per_query(pool: ExpertPool, work: dict[str, list[str]], params: SamplingParams, unload: bool,
                     budget: str) -> VariantFigures:
    loads0, t0 = pool.stats.loads, time.perf_counter()
    latencies, tokens = [], 0
    for q, experts in work.items():
        results = await asyncio.gather(*(pool.generate(e, [q], params) for e in experts))
        tokens += sum(r.completion_tokens for r in results)
        if unload:
            for e in experts:
                await pool.unload(e)
        latencies.append(time.perf_counter() - t0)
    name = "naive" if unload else "resident"
    return _figures(name, budget, latencies, time.perf_counter() - t0, tokens, pool.stats.loads - loads0)


async def run_scheduler_bench(
    experts: list[ExpertConfig],
    n: int,
    new_tokens: int,
    budget_one_gb: float,
    max_batch: int,
    progress: Callable[[str], None],
) -> list[VariantFigures]:
    names = [e.name for e in experts]
    work = workload(n, names)
    params = SamplingParams(max_new_tokens=new_tokens)
    results = []
    for budget, gb in (("fits one", budget_one_gb), ("fits all", None)):
        config = PoolConfig(memory_budget_gb={"cpu": gb} if gb else {})
        pool = await ExpertPool.start(experts, config, namespace=f"bench-{uuid.uuid4().hex[:8]}")
        try:
            progress(f"{budget}: batched-by-expert, N={n}")
            # Every variant of a budget starts alike: one expert resident, or all of them.
            for name in names[:1] if gb else names:
                async with pool.lease(name):
                    pass
            results.append(await _batched(pool, work, params, budget, max_batch))
            if budget == "fits one":
                progress(f"{budget}: naive per-query load/generate/unload, N={n} (slow)")
                results.append(await _per_query(pool, work, params, True, budget))
            else:
                progress(f"{budget}: per-query, all resident, no batching, N={n}")
                results.append(await _per_query(pool, work, params, False, budget))
        finally:
            pool.shutdown()
    return results
