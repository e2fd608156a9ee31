"""The batched-by-expert scheduler: the only place that decides what runs when.

Admission works like continuous batching: an idle scheduler starts a window at
once, and requests that arrive while a window runs wait for the next, which
takes all of them (up to ``max_batch``) the moment the running one ends. A lone
request never waits for company (``max_wait_ms`` can add such a wait; it is 0
by default). Each window is processed in phases, as vLLM's engine steps: the planner
decides (``planner``), the executor does (``executor``), and the outcomes go
back to the requests (``assembly``):
1. route: one router call per distinct router and routing setting in the
   window; the planner settles each decision;
2. solve: the (request, expert) pairs are grouped by expert and sampling
   settings, so each expert gets one batched call, and duplicates from
   sampling with replacement are extra rows of that call. Different experts
   run concurrently, resident experts first. An expert that must be loaded is
   leased once for all its calls of the phase (``executor``), so it loads at
   most once per phase; between phases it stays resident unless another
   expert's load needs its memory. Requests routed by the ``latent`` router
   are grouped by primary instead, one call to the latent group each;
3. re-route: a request that lost every expert goes to its next-ranked healthy
   expert, and the answer is marked degraded; then a cascade whose first
   answers disagree asks its escalation experts, a second round batched by
   expert like the first;
4. moa layers: requests with the moa strategy run their further proposer
   layers, each layer batched by expert like the solve phase;
5. aggregate: synthesis prompts are grouped by aggregator and batched the same
   way. vote and best need no call, and synthesis is skipped on consensus.

Windows run one after another, so these invariants hold per window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict

from orchestrator.engine import assembly
from orchestrator.engine.ceiling import hold_to_allowances
from orchestrator.engine.executor import Executor, LatentExecutor, Outcome
from orchestrator.engine.plan import ExpertWork
from orchestrator.engine.planner import Planner
from orchestrator.engine.requests import Answer, InFlight, Overloaded, QueryRequest, RequestError
from orchestrator.engine.settings import SchedulerSettings
from orchestrator.engine.spans import WindowSpans
from orchestrator.engine.stats import SchedulerStats
from routers.aggregation import Aggregated, aggregate_without_call
from routers.base import BoundedRouter, Decision, RouteOptions, Router
from routers.vocabulary import AGGREGATIONS, Aggregation
from workers.pool import ExpertPool
from workers.types import Price

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self, routers: dict[str, Router], pool: ExpertPool, settings: SchedulerSettings, prices: dict[str, Price],
        latent: LatentExecutor | None = None,
    ) -> None:
        """``routers`` by name; the first is the default. ``latent`` runs the ``latent`` router's decisions."""
        self.pool = pool
        self.stats = SchedulerStats()
        self.planner = Planner(pool, settings, prices)
        self.executor = Executor(pool, latent, self.stats, settings.expert_timeout_s, settings.stall_timeout_s)
        self.reconfigure(routers, settings, prices)
        self._queue: asyncio.Queue[InFlight] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._pending = 0
        self._last_window_s = 1.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def reconfigure(self, routers: dict[str, Router], settings: SchedulerSettings, prices: dict[str, Price]) -> None:
        """New routers and settings from a config reload; a window already running keeps what it started with."""
        if not routers:
            raise ValueError("the scheduler needs at least one router")
        self.routers, self.default_router = routers, next(iter(routers))
        self.settings = settings
        self.planner.settings, self.planner.prices = settings, prices
        self.executor.timeout_s, self.executor.stall_s = settings.expert_timeout_s, settings.stall_timeout_s

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def pending(self) -> int:
        """Admitted and not yet answered: queued, or in the running window."""
        return self._pending

    # -- admission ---------------------------------------------------------------------------------------

    def validate(self, request: QueryRequest) -> None:
        if not request.query.strip():
            raise RequestError("the query is empty")
        if request.router is not None and request.router not in self.routers:
            raise RequestError(f"unknown router {request.router!r}; available: {', '.join(self.routers)}")
        if request.aggregation not in AGGREGATIONS:
            raise RequestError(
                f"unknown aggregation {request.aggregation!r}; choose one of {', '.join(AGGREGATIONS)}"
            )
        unknown = [e for e in request.experts or [] if e not in self.pool.names]
        if unknown:
            raise RequestError(f"unknown expert(s) {', '.join(unknown)}; configured: {', '.join(self.pool.names)}")
        if request.experts is not None and not request.experts:
            raise RequestError("the expert allow-list is empty")
        if request.max_new_tokens is not None and request.max_new_tokens < 1:
            raise RequestError("max_new_tokens must be at least 1")
        if request.temperature is not None and request.temperature < 0:
            raise RequestError("temperature must be 0 (greedy) or positive")
        name = self._router_of(request)
        router = self.routers.get(name)
        if isinstance(router, BoundedRouter):
            router.check(request.options, request.experts)
        if hasattr(router, "supports") and not router.supports(request.options.policy):
            raise RequestError(f"the {request.options.policy} policy needs a router with a per-query quality "
                               f"estimate (cluster, logistic, irt or auto); {name!r} has none")

    async def explain(self, request: QueryRequest) -> Decision:
        """The decision a request would get, at once and outside any window; nothing is generated."""
        self.validate(request)
        pending = InFlight(request, asyncio.get_running_loop().create_future(), time.perf_counter())
        await self._decide([pending], self._router_of(request), request.options)
        return pending.decision

    async def submit(self, request: QueryRequest) -> Answer:
        """Queue a request and wait for its answer; a cancelled caller's request is dropped from its window."""
        self.validate(request)
        if self._pending >= self.settings.max_pending:
            # The backlog drains about a window per window time; wait at least a second, at most a minute.
            windows = self._pending / self.settings.max_batch
            retry = min(60, max(1, round(windows * self._last_window_s)))
            self.stats.rejected += 1
            raise Overloaded(f"the server is at its limit of {self.settings.max_pending} pending requests; "
                             f"retry in {retry} s", retry)
        pending = InFlight(request, asyncio.get_running_loop().create_future(), time.perf_counter())
        self._pending += 1
        try:
            await self._queue.put(pending)
            return await pending.future
        finally:
            self._pending -= 1

    # -- windows -----------------------------------------------------------------------------------------

    async def _collect(self) -> list[InFlight]:
        """The next window: everything queued while the last one ran, at once; an idle scheduler's first request
        waits for company only up to ``max_wait_ms``."""
        window = [await self._queue.get()]
        while len(window) < self.settings.max_batch and not self._queue.empty():
            window.append(self._queue.get_nowait())
        deadline = time.perf_counter() + self.settings.max_wait_ms / 1000
        while len(window) < self.settings.max_batch:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                window.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return window

    async def _loop(self) -> None:
        while True:
            window = await self._collect()
            try:
                await self._run_window(window)
            except Exception as exc:  # a bug in one window must not stop the service
                log.exception("window failed")
                for p in window:
                    if not p.future.done():
                        p.future.set_exception(exc)

    async def _run_window(self, window: list[InFlight]) -> None:
        started = time.perf_counter()
        live = [p for p in window if not p.future.cancelled()]
        if not live:
            return
        loads_before = self.pool.stats.loads
        for p in live:
            p.timings["queue_s"] = started - p.enqueued
            self.stats.queue_wait_s.append(p.timings["queue_s"])
        spans = WindowSpans(live)
        await self._route(live)
        for p in live:
            if p.request.stream is not None:
                p.request.stream.plan(self.planner.stream_plan(p))
        routed = time.perf_counter()
        spans.mark_routed()
        await self._solve(live)
        solved = time.perf_counter()
        spans.mark_solved()
        results, calls_s = await self._aggregate(live)
        finished = time.perf_counter()
        spans.close(live, results)
        for p in live:
            p.timings.update(solve_s=solved - routed, aggregate_s=finished - solved, total_s=finished - p.enqueued)
        assembly.finish(live, results, self.planner.prices)
        # Expert time: the solve phase's wall time (its calls run concurrently) plus the aggregation calls'.
        self._count_window(live, finished - started, (solved - routed) + calls_s, loads_before)

    def _count_window(self, live: list[InFlight], wall_s: float, expert_s: float, loads_before: int) -> None:
        self.stats.windows += 1
        self.stats.requests += len(live)
        self.stats.loads_per_window.append(self.pool.stats.loads - loads_before)
        self.stats.distinct_experts_per_window.append(
            len({e for p in live for e in p.decision.experts} | {a.expert for p in live for a in p.answers})
        )
        self.stats.overhead_s.append(max(0.0, wall_s - expert_s) / len(live))
        self._last_window_s = wall_s

    # -- phases ------------------------------------------------------------------------------------------

    def _router_of(self, request: QueryRequest) -> str:
        return request.router or self.default_router

    async def _route(self, live: list[InFlight]) -> None:
        groups: dict[tuple, list[InFlight]] = defaultdict(list)
        for p in live:
            o = p.request.options
            groups[(self._router_of(p.request), o.k, o.policy, o.cost_lambda, o.seed)].append(p)
        for (router, *_), members in groups.items():
            await self._decide(members, router, members[0].request.options)

    async def _decide(self, members: list[InFlight], router: str, options: RouteOptions) -> None:
        texts = [p.request.query for p in members]
        t0 = time.perf_counter()
        # Routing embeds text: CPU work that must not stall the event loop.
        # A reload may have dropped the router since the request was validated: the default stands in.
        chosen = self.routers.get(router) or self.routers[self.default_router]
        known = [p.request.category for p in members]
        categories = known if any(c is not None for c in known) else None
        decisions = await asyncio.to_thread(chosen.route, texts, options, None, categories)
        elapsed = (time.perf_counter() - t0) / len(members)
        for p, d in zip(members, decisions):
            d.trace["router"] = router
            d.trace["policy"] = {"name": str(options.policy), "k": options.k, "lambda": options.cost_lambda}
            self.planner.settle(p, d, options)
            p.timings["route_s"] = elapsed

    async def _solve(self, live: list[InFlight]) -> None:
        """The latent requests, the first layer, the re-routes of requests that lost every expert, then the
        further moa layers."""
        if self.executor.latent is not None:
            assembly.record_latent(await self.executor.run_latent(self.planner.latent(live)))
        assembly.record_answers(live, await self._run(live, self.planner.first_layer(live)))
        retry = self.planner.reroutes(live)
        if retry:
            assembly.record_answers(live, await self._run(live, retry))
        escalate = self.planner.escalations(live)
        if escalate:
            assembly.record_answers(live, await self._run(live, escalate))
        for layer in range(2, self.settings.moa_layers + 1):
            if not await self._moa_layer(live, layer):
                return

    async def _run(self, live: list[InFlight], works: list[ExpertWork]) -> list[tuple[ExpertWork, Outcome]]:
        """A phase's calls, each first allowed by its request's budget (``engine.ceiling``)."""
        works, _ = await hold_to_allowances(self.pool, self.planner.prices, live, works)
        return await self.executor.run(works)

    async def _moa_layer(self, live: list[InFlight], layer: int) -> bool:
        """One further moa proposer layer; False when no request needs it."""
        proposers, work = self.planner.moa_layer(live)
        if not proposers:
            return False
        previous = {i: live[i].answers for i in proposers}
        for i in proposers:
            live[i].answers = []
        assembly.record_answers(live, await self._run(live, work))
        for i in proposers:
            p = live[i]
            layers = p.decision.trace.setdefault("moa_layers", [proposers[i]])
            layers.append([a.expert for a in p.answers])
            if not p.answers:
                p.answers = previous[i]
                p.degraded.append(f"moa layer {layer}: every proposer failed; aggregated layer {layer - 1}")
        return True

    async def _aggregate(self, live: list[InFlight]) -> tuple[dict[int, Aggregated], float]:
        """Every request's aggregated answer, and the wall time of the synthesis calls."""
        results, work = self.planner.aggregation(live)
        t0 = time.perf_counter()
        work, over = await hold_to_allowances(self.pool, self.planner.prices, live, work)
        for i in over:  # a synthesis the budget does not allow: the vote stands in
            p = live[i]
            results[i] = aggregate_without_call(Aggregation.VOTE, p.answers, p.decision, p.request.kind)
        if work:
            assembly.record_syntheses(live, await self.executor.run(work), results)
        return results, time.perf_counter() - t0
