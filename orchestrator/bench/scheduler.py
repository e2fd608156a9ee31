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

With simulated experts (``backend: simulated``) every sleep is shrunk by the
experts' ``time_scale``, and the clock figures are divided by it, so they
read as the modelled hardware's seconds. The scheduler's own overhead is real
CPU time and is reported unscaled.

Experts on different devices work in parallel, but experts sharing one device
contend for it, which the wall clock of a simulation does not show. So each
variant also reports its device time: the sum of load and generation time
over all experts. On one shared device, throughput is at most N over the
larger of wall time and device time (``serial_queries_per_s``).
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
from orchestrator.config import ConciliumConfig
from orchestrator.engine.requests import QueryRequest
from orchestrator.engine.scheduler import Scheduler
from orchestrator.engine.settings import SchedulerSettings
from routers.base import Decision, RouteOptions, Router
from routers.vocabulary import Aggregation
from workers.config import ExpertConfig, PoolConfig
from workers.errors import UserError
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
    device_s: float
    """Load plus generation time summed over experts: the wall time if they all shared one device."""
    overhead_ms_per_query: float | None = None

    @property
    def serial_queries_per_s(self) -> float:
        return self.n / max(self.wall_s, self.device_s)


class _FixedRouter(Router):
    """Replays a given assignment: the benchmark measures scheduling, not routing."""

    def __init__(self, assignment: dict[str, list[str]]) -> None:
        self.assignment = assignment

    def fit(self, train: object) -> None:
        raise NotImplementedError("a fixed assignment learns nothing")

    def route(self, texts: list[str], options: RouteOptions, vectors: object = None,
              categories: object = None) -> list[Decision]:
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


def _figures(variant: str, budget: str, lat: list[float], wall: float, tokens: int, loads: int,
             device_s: float, scale: float) -> VariantFigures:
    wall, lat = wall / scale, [x / scale for x in lat]
    return VariantFigures(
        variant, budget, len(lat), loads, wall, len(lat) / wall, tokens / wall,
        statistics.median(lat), _percentile(lat, 95), device_s / scale,
    )


def time_scale(experts: list[ExpertConfig]) -> float:
    """The simulated experts' common time scale; 1 for real experts. Mixed scales would mix clocks."""
    scales = {getattr(e, "time_scale", 1.0) for e in experts}
    if len(scales) > 1:
        raise UserError(f"the experts' time_scale values differ ({sorted(scales)}); use one for all")
    return scales.pop()


async def _batched(pool: ExpertPool, work: dict[str, list[str]], params: SamplingParams, budget: str,
                   max_batch: int, scale: float) -> VariantFigures:
    sched = Scheduler({"fixed": _FixedRouter(work)}, pool, SchedulerSettings(max_batch=max_batch, max_wait_ms=50), {})
    sched.start()
    loads0, load_s0, t0 = pool.stats.loads, pool.stats.load_seconds, time.perf_counter()
    latencies: list[float] = []

    async def one(q: str) -> int:
        request = QueryRequest(q, aggregation=Aggregation.BEST, max_new_tokens=params.max_new_tokens,
                               temperature=params.temperature)
        ans = await sched.submit(request)
        latencies.append(time.perf_counter() - t0)
        return sum(a.completion_tokens for a in ans.answers)

    try:
        tokens = sum(await asyncio.gather(*(one(q) for q in work)))
    finally:
        await sched.stop()
    device_s = pool.stats.load_seconds - load_s0 + sched.stats.generate_s
    fig = _figures("batched", budget, latencies, time.perf_counter() - t0, tokens, pool.stats.loads - loads0,
                   device_s, scale)
    fig.overhead_ms_per_query = statistics.median(sched.stats.overhead_s) * 1000
    return fig


async def _per_query(pool: ExpertPool, work: dict[str, list[str]], params: SamplingParams, unload: bool,
                     budget: str, scale: float) -> VariantFigures:
    loads0, load_s0, t0 = pool.stats.loads, pool.stats.load_seconds, time.perf_counter()
    latencies, tokens, generate_s = [], 0, 0.0
    for q, experts in work.items():
        results = await asyncio.gather(*(pool.generate(e, [q], params) for e in experts))
        tokens += sum(r.completion_tokens for r in results)
        generate_s += sum(r.generate_s for r in results)
        if unload:
            for e in experts:
                await pool.unload(e)
        latencies.append(time.perf_counter() - t0)
    name = "naive" if unload else "resident"
    device_s = pool.stats.load_seconds - load_s0 + generate_s
    return _figures(name, budget, latencies, time.perf_counter() - t0, tokens, pool.stats.loads - loads0,
                    device_s, scale)


async def run_scheduler_bench(
    config: ConciliumConfig,
    sizes: list[int],
    new_tokens: int,
    budget_gb: float,
    device: str,
    max_batch: int,
    progress: Callable[[str], None],
) -> list[VariantFigures]:
    """For each N: under the tight budget, batched vs naive; with no budget, batched vs resident."""
    experts = config.experts
    names = [e.name for e in experts]
    scale = time_scale(experts)
    params = SamplingParams(max_new_tokens=new_tokens)
    results = []
    for n in sizes:
        work = workload(n, names)
        for budget, gb in ((f"{budget_gb:g} GB", budget_gb), ("unlimited", None)):
            budgets = PoolConfig(memory_budget_gb={device: gb} if gb else {})
            pool = await ExpertPool.start(experts, budgets, config.store_root, namespace=f"bench-{uuid.uuid4().hex[:8]}")
            try:
                progress(f"N={n}, {budget}: batched-by-expert")
                # Every variant of a budget starts alike: one expert resident, or all of them.
                for name in names[:1] if gb else names:
                    async with pool.lease(name):
                        pass
                results.append(await _batched(pool, work, params, budget, max_batch, scale))
                other = "naive per-query load/generate/unload (slow)" if gb else "per-query, all resident, no batching"
                progress(f"N={n}, {budget}: {other}")
                results.append(await _per_query(pool, work, params, bool(gb), budget, scale))
            finally:
                pool.shutdown()
    return results
