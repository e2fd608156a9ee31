"""The routed pipeline: query → route → solve → aggregate → answer, behind one door.

``Pipeline`` is the only object the API, the CLI and the benchmarks hold, as vLLM's ``AsyncLLM`` is the only
door into its engine: it validates, explains, bounds what a request can spend, lists what it offers, learns from feedback, answers, and
reloads. The scheduler, the pool and the latent group stay behind it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from orchestrator import artifacts
from orchestrator.config import ConciliumConfig
from orchestrator.engine.ceiling import first_round_most, plan_most
from orchestrator.engine.executor import LatentExecutor
from orchestrator.engine.requests import Answer, QueryRequest, Spend
from orchestrator.engine.runtime import start_pool
from orchestrator.engine.scheduler import Scheduler
from orchestrator.engine.settings import TOP_SCORED, SchedulerSettings
from routers.base import Decision, OnlineRouter, Router
from routers.vocabulary import LATENT_ROUTER, Aggregation, Policy
from workers.errors import UserError
from workers.pool import ExpertPool
from workers.types import GenerationResult, Price, TokenDelta, WorkerInfo


def check_artifacts(config: ConciliumConfig) -> None:
    """Read the newest profile artifacts and the latent checkpoint once, before anything starts, so that a
    missing, corrupt or mismatched file stops ``serve`` with its name instead of leaving a half-started server."""
    artifacts.served(config, [e.name for e in config.experts])
    if config.latent.checkpoint is not None:
        from orchestrator.latent.group import check_latent

        check_latent(config)


@dataclass(frozen=True)
class Defaults:
    """What a request that sets none of them is served with."""

    k: int
    aggregation: Aggregation
    policy: Policy
    cost_lambda: float = 0.0


def request_defaults(config: ConciliumConfig, served: dict[str, object] | None) -> Defaults:
    """The defaults of ``auto``: the configuration the profile's selection chose on served answers, unless
    ``routing`` writes k, aggregation or policy itself. Then the written settings apply, with the built-in
    defaults for the rest, and none of the profile's: a mix of the two would serve a configuration nobody
    measured."""
    r = config.routing
    if served is None or r.model_fields_set & {"k", "aggregation", "policy"}:
        return Defaults(r.k, r.aggregation, r.policy)
    return Defaults(int(served["k"]), Aggregation(served["aggregation"]), Policy(served["policy"]),
                    float(served.get("cost_lambda") or 0.0))


def load_routers(config: ConciliumConfig, experts: list[str]
                 ) -> tuple[dict[str, Router], SchedulerSettings, artifacts.ServedProfile]:
    """Routers by name, the default first (``artifacts.served``), with ``latent`` added when a checkpoint is
    configured (never the default: it needs a trained checkpoint and its own actor); the scheduler's settings,
    whose aggregator preference comes from the same profile; and the profile itself."""
    profile = artifacts.served(config, experts)
    routers = profile.routers
    if config.latent.checkpoint is not None:
        from orchestrator.latent.group import latent_routing

        routers[LATENT_ROUTER] = latent_routing(config)
    r = config.routing
    settings = SchedulerSettings(r.max_batch, r.max_wait_ms, r.expert_timeout_s, r.stall_timeout_s, r.moa_layers,
                                 r.self_moa_temperature, profile.aggregators,
                                 profile.aggregator_source or TOP_SCORED, r.max_pending)
    return routers, settings, profile


def expert_prices(config: ConciliumConfig) -> dict[str, Price]:
    return {e.name: e.price for e in config.experts}


class ReloadError(UserError, ValueError):
    """A new config that cannot be applied without a restart."""


@dataclass(frozen=True)
class Catalog:
    """What the pipeline offers by name: its routers (the default first) and its experts."""

    routers: tuple[str, ...]
    experts: tuple[str, ...]


@dataclass
class ExpertState:
    """An expert as the pool sees it now: its actor's report and the calls it is running or about to."""

    info: WorkerInfo
    in_flight: int


class Pipeline:
    def __init__(self, config: ConciliumConfig, pool: ExpertPool, scheduler: Scheduler,
                 profile: artifacts.ServedProfile, latent: LatentExecutor | None = None) -> None:
        self.config = config
        self._pool = pool
        self._scheduler = scheduler
        self._latent = latent
        self._use(profile)

    def _use(self, profile: artifacts.ServedProfile) -> None:
        self.served: dict[str, object] | None = profile.served
        """The configuration the profile's selection chose for ``auto``; None without one."""
        self._defaults = request_defaults(self.config, profile.served)

    @classmethod
    async def start(cls, config: ConciliumConfig, detached: bool = False) -> Pipeline:
        """``detached``: share the experts as named actors that outlive this pipeline (Ray Serve replicas)."""
        routers, settings, profile = load_routers(config, [e.name for e in config.experts])
        pool = await start_pool(config, detached)
        latent = None
        if config.latent.checkpoint is not None:
            from orchestrator.latent.group import LatentGroup

            try:
                latent = await LatentGroup.start(config, detached)
            except Exception:
                pool.shutdown()
                raise
        scheduler = Scheduler(routers, pool, settings, expert_prices(config), latent)
        scheduler.start()
        return cls(config, pool, scheduler, profile, latent)

    # -- what it offers ----------------------------------------------------------------------------------

    def validate(self, request: QueryRequest) -> None:
        """Raise RequestError or RoutingError for a request that would be refused; nothing queues."""
        self._scheduler.validate(request)

    async def explain(self, request: QueryRequest) -> Decision:
        """The decision a request would get, at once and outside any window; nothing is generated."""
        return await self._scheduler.explain(request)

    async def most(self, request: QueryRequest, first_round: bool = False) -> Spend:
        """The most ``request`` can spend as it would be routed now, every call its plan can make, or its first
        round's only (``engine.ceiling``): what a budget reserves. Every prompt is counted by the expert that
        would read it, so each is loaded."""
        s, decision = self._scheduler, await self.explain(request)
        if first_round:
            return await first_round_most(self._pool, s.planner.params, s.planner.prices, request, decision)
        return await plan_most(self._pool, s.planner.params, s.planner.prices, request, decision, s.settings.moa_layers)

    def defaults(self, router: str | None) -> Defaults:
        """k, aggregation, policy and λ for a request that sets none: ``auto``'s are the profile's served
        configuration (unless ``routing`` names them); the latent router has its own k."""
        r = self.config.routing
        if router == LATENT_ROUTER:
            return Defaults(self.config.latent.k, r.aggregation, r.policy)
        if router in (None, self._scheduler.default_router):
            return self._defaults
        return Defaults(r.k, r.aggregation, r.policy)

    def catalog(self) -> Catalog:
        return Catalog(tuple(self._scheduler.routers), tuple(self._pool.names))

    async def experts(self) -> list[ExpertState]:
        return [ExpertState(i, self._pool.in_flight(i.name)) for i in await self._pool.info()]

    def healthy(self) -> dict[str, bool]:
        return self._pool.healthy()

    @property
    def shared(self) -> bool:
        """Whether the experts are shared with other replicas (detached actors under Ray Serve)."""
        return self._pool.detached

    def figures(self) -> dict[str, float]:
        """Live counters for the metrics: loads, queue, residency, windows, tokens, refusals."""
        pool, scheduler = self._pool, self._scheduler
        return {"loads": pool.stats.loads, "load_failures": pool.stats.failures, "queue_depth": scheduler.queue_depth,
                "resident": len(pool.resident()),
                "scheduled": scheduler.stats.requests, "pending": scheduler.pending,
                "generated_tokens": scheduler.stats.generated_tokens, "windows": scheduler.stats.windows,
                "expert_calls": scheduler.stats.expert_calls, "rejected": scheduler.stats.rejected}

    # -- what it does ------------------------------------------------------------------------------------

    async def ask(self, request: QueryRequest) -> Answer:
        return await self._scheduler.submit(request)

    def learn(self, router: str, decision: Decision, experts: list[str], value: float) -> bool:
        """Feedback on an answer ``router`` routed: each expert's outcome (0..1) teaches the router, where it
        learns online. True when its profiles changed."""
        online = self._scheduler.routers.get(router)
        if not isinstance(online, OnlineRouter):
            return False
        return any([online.learn(decision, expert, value) for expert in experts])

    async def generate(self, expert: str, prompts: list[str], max_new_tokens: int | None = None,
                       temperature: float | None = None) -> GenerationResult:
        """One batched call of one expert outside any window, with its generation defaults and these overrides:
        for profiling tools (the LLM annotator, the aggregator test), never for a request."""
        params = self._pool.config_of(expert).generation.sampling(max_new_tokens, temperature)
        return await self._pool.generate(expert, prompts, params)

    def use_router(self, name: str, router: Router) -> None:
        """Serve a router fitted in this process under ``name`` (beside the profile's), as a live evaluation does
        with each fold's router; a router of that name is replaced."""
        self._scheduler.routers[name] = router

    def expert_stream(self, request: QueryRequest, expert: str, call: str
                      ) -> AsyncIterator[list[TokenDelta] | GenerationResult]:
        """One expert's stream for a request, straight from the pool with the settings the planner would give
        it, outside any window: the baseline against which benchmarks measure what the scheduler adds."""
        return self._pool.stream(expert, [request.prompt], self._scheduler.planner.params(request, expert), call)

    async def reload(self, config: ConciliumConfig) -> dict[str, list[str]]:
        """Apply a new config's experts, routing and budgets in place: only added, removed or changed experts are
        touched, so the others keep their loaded models and their running calls."""
        for section in ("ray", "model_store", "latent"):
            if getattr(config, section) != getattr(self.config, section):
                raise ReloadError(f"{section} changed: that needs a restart, not a reload")
        old, new = {e.name: e for e in self.config.experts}, {e.name: e for e in config.experts}
        removed = [n for n in old if n not in new]
        added = [n for n in new if n not in old]
        changed = [n for n in new if n in old and new[n] != old[n]]
        self._pool.config = config.pool
        for name in removed + changed:
            await self._pool.remove(name)
        for name in changed + added:
            await self._pool.add(new[name])
        routers, settings, profile = load_routers(config, self._pool.names)
        self._scheduler.reconfigure(routers, settings, expert_prices(config))
        self.config = config
        self._use(profile)
        return {"added": added, "removed": removed, "changed": changed, "routers": list(routers)}

    async def close(self) -> None:
        await self._scheduler.stop()
        if self._latent is not None:
            self._latent.shutdown()
        self._pool.shutdown()
