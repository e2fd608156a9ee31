"""The batched-by-expert scheduler: the only place that decides what runs when.

Requests wait at most ``max_wait_ms`` or until ``max_batch`` are queued. Then
the whole window is processed in phases:
1. route: one router call per distinct router and routing setting in the
   window;
2. solve: the (request, expert) pairs are grouped by expert and sampling
   settings, so each expert gets one batched call, and duplicates from
   sampling with replacement are extra rows of that call. Different experts
   run concurrently, resident experts first. An expert that must be loaded is
   leased once for all its work in the window, so it loads at most once per
   window;
3. re-route: a request that lost every expert goes to its next-ranked healthy
   expert, and the answer is marked degraded;
4. moa layers: requests with the moa strategy run their further proposer
   layers, each layer batched by expert like the solve phase;
5. aggregate: synthesis prompts are grouped by aggregator and batched the same
   way. vote and best need no call, and synthesis is skipped on consensus.

Requests routed by the ``latent`` router take another path through the same
window: after routing, they are grouped by primary and sampling settings, and
each group is one call to the latent group, where the peers encode the
prompts once and the primary generates while reading their latents. There is
nothing to re-route to or to aggregate: the primary's text is the answer.

Windows run one after another, so these invariants hold per window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from orchestrator.aggregate import AGGREGATIONS, Aggregated, aggregate_without_call, synthesis_request
from routers.aggregation import proposer_prompt
from routers.base import BoundedRouter, Decision, RouteOptions, Router, pick
from workers.pool import ExpertPool, reason
from workers.types import GenerationResult, Message, Prompt, SamplingParams

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request rejected before it queues: unknown aggregation or expert, empty query."""


class AllExpertsFailed(RuntimeError):
    """Every expert recruited for a request failed, and so did the re-route."""


class Overloaded(RuntimeError):
    """``max_pending`` requests are already admitted; the caller should retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class LatentExecutor(Protocol):
    """Runs ``latent`` decisions: per row, the primary generates while it reads its peers' prompt latents.
    Each completion's ``meta['peer_tokens']`` counts the prompt tokens each peer encoded."""

    async def generate(self, primary: str, peers: list[list[str]], prompts: list[str], params: SamplingParams
                       ) -> GenerationResult: ...

    def shutdown(self) -> None: ...


LATENT_SKIPPED = "latent mode: the peers took part inside the primary's forward pass, so there are no answers to merge"


def is_latent(decision: Decision | None) -> bool:
    return decision is not None and decision.trace.get("mode") == "latent"


@dataclass(frozen=True)
class SchedulerSettings:
    max_batch: int = 32
    max_wait_ms: float = 20.0
    expert_timeout_s: float = 300.0
    moa_layers: int = 2
    self_moa_temperature: float = 0.7
    aggregators: tuple[str, ...] = ()
    """Aggregator preference: the first allowed one synthesises. Empty: the router's top-scored expert."""
    aggregator_source: str = "router's top-scored expert"
    max_pending: int = 1024
    """Admitted and unanswered requests at most: the queue is bounded, and a full one refuses."""


@dataclass
class QueryRequest:
    query: str
    """What is routed: the question, or a conversation's last user turn."""
    options: RouteOptions = field(default_factory=RouteOptions)
    aggregation: str = "synthesize"
    experts: list[str] | None = None
    """An allow-list: only these experts may be recruited."""
    max_new_tokens: int | None = None
    temperature: float | None = None
    """Overrides; each expert's own generation defaults fill in the rest."""
    router: str | None = None
    """A router by name; None: the scheduler's default."""
    messages: tuple[Message, ...] = ()
    """A whole conversation for the experts; empty: they see ``query`` alone."""
    budget_usd: float | None = None
    """Most estimated cost: the costliest recruits are dropped until the estimate fits (one always stays)."""

    @property
    def prompt(self) -> str | Prompt:
        return Prompt(messages=self.messages) if self.messages else self.query


@dataclass
class ExpertAnswer:
    expert: str
    text: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Answer:
    text: str
    answers: list[ExpertAnswer]
    aggregation: str
    aggregator: str | None
    aggregation_skipped: str | None
    decision: Decision
    usage: dict[str, dict[str, int]]
    cost_usd: float
    timings: dict[str, float]
    degraded: list[str] = field(default_factory=list)


@dataclass
class SchedulerStats:
    windows: int = 0
    requests: int = 0
    rejected: int = 0
    """Requests refused because ``max_pending`` were already admitted."""
    expert_calls: int = 0
    generate_s: float = 0.0
    """The experts' own time inside calls, summed over calls (they may overlap in wall time)."""
    batch_sizes: list[int] = field(default_factory=list)
    loads_per_window: list[int] = field(default_factory=list)
    distinct_experts_per_window: list[int] = field(default_factory=list)
    queue_wait_s: list[float] = field(default_factory=list)
    overhead_s: list[float] = field(default_factory=list)
    """Per window and request: wall time minus the solve phase and the aggregation calls (routing,
    grouping and bookkeeping)."""


@dataclass
class _Pending:
    request: QueryRequest
    future: asyncio.Future
    enqueued: float
    decision: Decision | None = None
    answers: list[ExpertAnswer] = field(default_factory=list)
    """The latest layer's answers: what gets aggregated."""
    spent: list[ExpertAnswer] = field(default_factory=list)
    """Every expert call of every layer, for usage and cost."""
    failed: list[str] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class Scheduler:
    def __init__(
        self, routers: dict[str, Router], pool: ExpertPool, settings: SchedulerSettings, costs: dict[str, float],
        latent: LatentExecutor | None = None,
    ) -> None:
        """``routers`` by name; the first is the default. ``latent`` runs the ``latent`` router's decisions."""
        if not routers:
            raise ValueError("the scheduler needs at least one router")
        self.routers, self.default_router = routers, next(iter(routers))
        self.pool = pool
        self.latent = latent
        self.settings = settings
        self.costs = costs
        self.stats = SchedulerStats()
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
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

    def reconfigure(self, routers: dict[str, Router], settings: SchedulerSettings, costs: dict[str, float]) -> None:
        """New routers and settings from a config reload; a window already running keeps what it started with."""
        if not routers:
            raise ValueError("the scheduler needs at least one router")
        self.routers, self.default_router = routers, next(iter(routers))
        self.settings, self.costs = settings, costs

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def pending(self) -> int:
        """Admitted and not yet answered: queued, or in the running window."""
        return self._pending

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
        router = self.routers.get(self._router_of(request))
        if isinstance(router, BoundedRouter):
            router.check(request.options, request.experts)

    async def explain(self, request: QueryRequest) -> Decision:
        """The decision a request would get, at once and outside any window; nothing is generated."""
        self.validate(request)
        pending = _Pending(request, asyncio.get_running_loop().create_future(), time.perf_counter())
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
        pending = _Pending(request, asyncio.get_running_loop().create_future(), time.perf_counter())
        self._pending += 1
        try:
            await self._queue.put(pending)
            return await pending.future
        finally:
            self._pending -= 1

    async def _collect(self) -> list[_Pending]:
        window = [await self._queue.get()]
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

    async def _run_window(self, window: list[_Pending]) -> None:
        started = time.perf_counter()
        live = [p for p in window if not p.future.cancelled()]
        if not live:
            return
        loads_before = self.pool.stats.loads
        for p in live:
            p.timings["queue_s"] = started - p.enqueued
            self.stats.queue_wait_s.append(p.timings["queue_s"])
        await self._route(live)
        routed = time.perf_counter()
        await self._solve_latent([p for p in live if is_latent(p.decision)])
        assignment = {i: p.decision.experts for i, p in enumerate(live) if not is_latent(p.decision)}
        await self._solve(live, assignment, lambda i: live[i].request.prompt)
        orphans = {i: self._reroute(p) for i, p in enumerate(live) if not p.answers and i in assignment}
        orphans = {i: e for i, e in orphans.items() if e}
        if orphans:
            await self._solve(live, orphans, lambda i: live[i].request.prompt)
        await self._moa_layers(live)
        solved = time.perf_counter()
        aggregate_calls_s = await self._aggregate(live, routed, solved)
        done = time.perf_counter()
        # Expert time is the solve phase's wall time (calls run concurrently) plus the aggregation calls.
        expert_time = (solved - routed) + aggregate_calls_s
        self.stats.windows += 1
        self.stats.requests += len(live)
        self.stats.loads_per_window.append(self.pool.stats.loads - loads_before)
        self.stats.distinct_experts_per_window.append(
            len({e for p in live for e in p.decision.experts} | {a.expert for p in live for a in p.answers})
        )
        self.stats.overhead_s.append(max(0.0, (done - started) - expert_time) / len(live))
        self._last_window_s = done - started

    def _router_of(self, request: QueryRequest) -> str:
        return request.router or self.default_router

    async def _route(self, live: list[_Pending]) -> None:
        groups: dict[tuple, list[_Pending]] = defaultdict(list)
        for p in live:
            o = p.request.options
            groups[(self._router_of(p.request), o.k, o.policy, o.cost_lambda, o.seed)].append(p)
        for (router, *_), members in groups.items():
            await self._decide(members, router, members[0].request.options)

    async def _decide(self, members: list[_Pending], router: str, options: RouteOptions) -> None:
        texts = [p.request.query for p in members]
        t0 = time.perf_counter()
        # Routing embeds text: CPU work that must not stall the event loop.
        # A reload may have dropped the router since the request was validated: the default stands in.
        chosen = self.routers.get(router) or self.routers[self.default_router]
        decisions = await asyncio.to_thread(chosen.route, texts, options)
        elapsed = (time.perf_counter() - t0) / len(members)
        for p, d in zip(members, decisions):
            d.trace["router"] = router
            p.decision = self._restrict(d, p.request, options)
            if not is_latent(d):  # the latent mixture's primary answers alone, and needs its peers
                self._plan(p)
                self._fit_budget(p)
            p.timings["route_s"] = elapsed

    def _restrict(self, decision: Decision, request: QueryRequest, options: RouteOptions) -> Decision:
        """Apply the request's allow-list by re-picking among allowed experts with the router's scores."""
        if request.experts is None:
            return decision
        # The latent router can only choose among its mixture's experts (its scores' keys).
        candidates = list(decision.scores) if is_latent(decision) else self.pool.names
        allowed = [e for e in candidates if e in request.experts]
        scores = np.array([decision.scores.get(e, 0.0) for e in allowed])
        # The latent mixture needs distinct experts, its best first, whatever sampling policy is configured.
        policy = RouteOptions(k=options.k) if is_latent(decision) else options
        chosen = pick(scores, policy, None, np.random.default_rng(options.seed))
        decision.experts = [allowed[i] for i in chosen]
        if decision.aggregator not in allowed:
            decision.aggregator = allowed[int(np.argmax(scores))]
        decision.trace["allow_list"] = allowed
        if is_latent(decision):
            decision.trace.update(primary=decision.experts[0], peers=decision.experts[1:])
        return decision

    def _plan(self, p: _Pending) -> None:
        """Fix who samples (self-moa) and who synthesises, and say why in the trace."""
        d = p.decision
        allowed = p.request.experts or self.pool.names
        if p.request.aggregation == "self-moa":
            best = max(allowed, key=lambda e: d.scores.get(e, 0.0))
            d.experts = [best] * p.request.options.k
            d.aggregator = best
            d.trace["aggregator_choice"] = "self-moa: the sampled expert synthesises its own samples"
            return
        preferred = next((e for e in self.settings.aggregators if e in allowed), None)
        if preferred is not None:
            d.aggregator = preferred
            d.trace["aggregator_choice"] = self.settings.aggregator_source
        else:
            d.trace["aggregator_choice"] = "router's top-scored expert"

    def _fit_budget(self, p: _Pending) -> None:
        """Drop the costliest recruits until the estimated cost fits the request's budget; one always stays.

        The estimate is the expert's price per 1k tokens times the prompt's words (a token count needs the
        expert's tokenizer, which lives in the worker) plus the tokens it may generate.
        """
        r, d = p.request, p.decision
        if r.budget_usd is None:
            return
        words = len(r.query.split())

        def cost(e: str) -> float:
            return self.costs.get(e, 0.0) * (words + (r.max_new_tokens or self._params(p, e).max_new_tokens)) / 1000

        dropped = []
        while len(d.experts) > 1 and sum(cost(e) for e in d.experts) > r.budget_usd:
            costliest = max(d.experts, key=cost)
            d.experts.remove(costliest)
            dropped.append(costliest)
        d.trace["budget"] = {"usd": r.budget_usd, "estimate_usd": round(sum(cost(e) for e in d.experts), 8),
                             "dropped": dropped}

    def _reroute(self, p: _Pending) -> list[str]:
        healthy = self.pool.healthy()
        ranked = sorted(p.decision.scores, key=lambda e: -p.decision.scores[e])
        allowed = p.request.experts or self.pool.names
        for expert in ranked:
            if expert in allowed and healthy.get(expert) and expert not in p.failed:
                p.degraded.append(f"re-routed to {expert} after {', '.join(sorted(set(p.failed)))} failed")
                return [expert]
        return []

    def _params(self, p: _Pending, expert: str) -> SamplingParams:
        gen = self.pool.config_of(expert).generation
        r = p.request
        temperature = gen.temperature if r.temperature is None else r.temperature
        if r.aggregation == "self-moa" and r.temperature is None:
            # Greedy samples from one model would all be the same answer.
            temperature = max(temperature, self.settings.self_moa_temperature)
        return SamplingParams(
            max_new_tokens=r.max_new_tokens or gen.max_new_tokens,
            temperature=temperature,
            top_p=gen.top_p,
            seed=gen.seed,
        )

    def _record(self, result: GenerationResult) -> None:
        self.stats.expert_calls += 1
        self.stats.generate_s += result.generate_s
        self.stats.batch_sizes.append(len(result.completions))

    def _order(self, experts: list[str]) -> list[str]:
        resident = set(self.pool.resident())
        return sorted(experts, key=lambda e: (e not in resident, e))

    async def _solve(
        self, live: list[_Pending], assignment: dict[int, list[str]], prompt_of: Callable[[int], str | Prompt]
    ) -> None:
        """One batched call per (expert, settings), experts concurrently, resident ones first."""
        groups: dict[tuple[str, SamplingParams], list[int]] = defaultdict(list)
        for i, experts in assignment.items():
            for expert in experts:
                groups[(expert, self._params(live[i], expert))].append(i)
        by_expert: dict[str, list[tuple[SamplingParams, list[int]]]] = defaultdict(list)
        for (expert, params), rows in groups.items():
            by_expert[expert].append((params, rows))

        async def run_expert(expert: str) -> None:
            for params, rows in by_expert[expert]:
                prompts = [prompt_of(i) for i in rows]
                try:
                    result = await asyncio.wait_for(
                        self.pool.generate(expert, prompts, params), self.settings.expert_timeout_s
                    )
                except Exception as exc:
                    why = "timed out" if isinstance(exc, TimeoutError) else reason(exc)
                    for i in rows:
                        live[i].failed.append(expert)
                        live[i].degraded.append(f"{expert} failed: {why}")
                    continue
                self._record(result)
                for i in rows:
                    live[i].degraded.extend(result.notes)
                for i, c in zip(rows, result.completions):
                    answer = ExpertAnswer(expert, c.text, c.prompt_tokens, c.completion_tokens)
                    live[i].answers.append(answer)
                    live[i].spent.append(answer)

        # Resident experts start first; the pool's leases hold each expert resident for all its rows.
        await asyncio.gather(*(asyncio.create_task(run_expert(e)) for e in self._order(list(by_expert))))

    async def _solve_latent(self, members: list[_Pending]) -> None:
        """One latent-group call per (primary, settings); the peers' prompt tokens count in usage."""
        if not members:
            return
        groups: dict[tuple[str, SamplingParams], list[_Pending]] = defaultdict(list)
        for p in members:
            primary = p.decision.experts[0]
            groups[(primary, self._params(p, primary))].append(p)

        async def run(primary: str, params: SamplingParams, rows: list[_Pending]) -> None:
            try:
                result = await asyncio.wait_for(
                    self.latent.generate(primary, [p.decision.experts[1:] for p in rows],
                                         [p.request.query for p in rows], params),
                    self.settings.expert_timeout_s,
                )
            except Exception as exc:
                why = "timed out" if isinstance(exc, TimeoutError) else reason(exc)
                for p in rows:
                    p.failed.append(primary)
                    p.degraded.append(f"latent group failed: {why}")
                return
            self._record(result)
            for p, c in zip(rows, result.completions):
                answer = ExpertAnswer(primary, c.text, c.prompt_tokens, c.completion_tokens)
                p.answers.append(answer)
                p.spent.append(answer)
                p.spent.extend(ExpertAnswer(peer, "", n, 0) for peer, n in c.meta.get("peer_tokens", {}).items())

        await asyncio.gather(*(run(primary, params, rows) for (primary, params), rows in groups.items()))

    async def _moa_layers(self, live: list[_Pending]) -> None:
        """Layers 2..L of moa: each proposer answers again with the previous layer's answers as references."""
        for layer in range(2, self.settings.moa_layers + 1):
            rows = {i: [a.expert for a in p.answers] for i, p in enumerate(live)
                    if p.request.aggregation == "moa" and p.answers and not is_latent(p.decision)}
            if not rows:
                return
            previous = {i: live[i].answers for i in rows}
            prompts = {i: proposer_prompt(live[i].request.query, [a.text for a in previous[i]]) for i in rows}
            for i in rows:
                live[i].answers = []
            await self._solve(live, rows, prompts.__getitem__)
            for i in rows:
                p = live[i]
                layers = p.decision.trace.setdefault("moa_layers", [[a.expert for a in previous[i]]])
                layers.append([a.expert for a in p.answers])
                if not p.answers:
                    p.answers = previous[i]
                    p.degraded.append(f"moa layer {layer}: every proposer failed; aggregated layer {layer - 1}")

    async def _aggregate(self, live: list[_Pending], routed: float, solved: float) -> float:
        calls: dict[tuple[str, SamplingParams], list[tuple[int, str]]] = defaultdict(list)
        results: dict[int, Aggregated] = {}
        for i, p in enumerate(live):
            if not p.answers:
                continue
            if is_latent(p.decision):
                results[i] = Aggregated(p.answers[0].text, p.answers[0].expert, LATENT_SKIPPED)
                continue
            done = aggregate_without_call(p.request.aggregation, p.answers, p.decision)
            if done is not None:
                results[i] = done
            else:
                aggregator, prompt = synthesis_request(p.request.query, p.answers, p.decision, self.pool.healthy())
                calls[(aggregator, self._params(p, aggregator))].append((i, prompt))
        spent = 0.0
        for (aggregator, params), items in calls.items():
            t0 = time.perf_counter()
            try:
                out = await asyncio.wait_for(
                    self.pool.generate(aggregator, [prompt for _, prompt in items], params),
                    self.settings.expert_timeout_s,
                )
                self._record(out)
                for (i, _), c in zip(items, out.completions):
                    results[i] = Aggregated(c.text, aggregator, None, {aggregator: (c.prompt_tokens, c.completion_tokens)})
            except Exception as exc:
                for i, _ in items:
                    fallback = aggregate_without_call("best", live[i].answers, live[i].decision)
                    live[i].degraded.append(f"aggregator {aggregator} failed ({reason(exc)}); returned the best answer")
                    results[i] = fallback
            spent += time.perf_counter() - t0
        finished = time.perf_counter()
        for i, p in enumerate(live):
            if p.future.done():
                continue
            if i not in results:
                p.future.set_exception(AllExpertsFailed(
                    "every recruited expert failed: " + "; ".join(p.degraded or ["no expert was available"])
                ))
                continue
            p.timings.update(solve_s=solved - routed, aggregate_s=finished - solved, total_s=finished - p.enqueued)
            p.future.set_result(self._answer(p, results[i]))
        return spent

    def _answer(self, p: _Pending, agg: Aggregated) -> Answer:
        usage: dict[str, dict[str, int]] = defaultdict(lambda: {"prompt_tokens": 0, "completion_tokens": 0})
        for a in p.spent:
            usage[a.expert]["prompt_tokens"] += a.prompt_tokens
            usage[a.expert]["completion_tokens"] += a.completion_tokens
        for expert, (pt, ct) in agg.usage.items():
            usage[expert]["prompt_tokens"] += pt
            usage[expert]["completion_tokens"] += ct
        cost = sum(
            (u["prompt_tokens"] + u["completion_tokens"]) / 1000 * self.costs.get(e, 0.0) for e, u in usage.items()
        )
        return Answer(
            text=agg.text, answers=p.answers, aggregation="latent" if is_latent(p.decision) else p.request.aggregation,
            aggregator=agg.aggregator,
            aggregation_skipped=agg.skipped, decision=p.decision, usage=dict(usage), cost_usd=cost,
            timings=p.timings, degraded=p.degraded,
        )

