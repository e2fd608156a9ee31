"""The routed pipeline: query → route → solve → aggregate → answer.

A plain Python controller over the routers, the expert pool, the latent group
and the scheduler: ``concilium ask`` uses it directly, and the API's service
controller wraps it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from orchestrator import artifacts
from orchestrator.config import ConciliumConfig
from orchestrator.embedders import encoder
from orchestrator.engine.executor import LatentExecutor
from orchestrator.engine.requests import Answer, QueryRequest
from orchestrator.engine.runtime import start_pool
from orchestrator.engine.scheduler import Scheduler
from orchestrator.engine.settings import TOP_SCORED, SchedulerSettings
from routers.base import Router
from routers.embedding import TextEncoder
from routers.registry import make_router
from routers.selection import Selected
from routers.vocabulary import AUTO_ROUTER, LATENT_ROUTER, Encoder
from workers.errors import UserError
from workers.pool import ExpertPool

log = logging.getLogger(__name__)


def check_artifacts(config: ConciliumConfig) -> None:
    """Read the newest profile artifacts and the latent checkpoint once, before anything starts, so that a
    missing, corrupt or mismatched file stops ``serve`` with its name instead of leaving a half-started server."""
    folder = artifacts.latest(config.routing.profiles)
    if folder is not None:
        artifacts.load(folder, None)
        _encoder(config, folder)
    aggregator_preference(config)
    if config.latent.checkpoint is not None:
        from orchestrator.latent.group import check_latent

        check_latent(config)


def load_routers(config: ConciliumConfig, experts: list[str]) -> dict[str, Router]:
    """Routers by name, the default first. With the newest profile for exactly these experts: ``auto`` (the
    router its selection chose), then every candidate it holds by name, then ``all``. Without one, ``all``
    (every expert answers) is the default, and the trace says why. With ``latent.checkpoint`` set, ``latent``
    is served as well (never the default: it needs a trained checkpoint and its own actor).

    The encoder is the one the profile was built with (its vectors live in that space), with no disk cache:
    live queries are new text.
    """
    routers = _base_routers(config, experts)
    if config.latent.checkpoint is not None:
        from orchestrator.latent.group import latent_routing

        routers[LATENT_ROUTER] = latent_routing(config)
    return routers


def _encoder(config: ConciliumConfig, folder: Path) -> TextEncoder:
    """The encoder a profile was built with (profiles from before encoders were recorded used MiniLM)."""
    return encoder(str(artifacts.summary(folder).get("encoder", Encoder.MINILM)), config.store_root)


def _base_routers(config: ConciliumConfig, experts: list[str]) -> dict[str, Router]:
    folder = artifacts.latest(config.routing.profiles)
    if folder is None:
        why = f"no profiles in {config.routing.profiles}: every expert answers (run `concilium profile`)"
        return {"all": make_router("all", experts=experts, fallback=why)}
    served, chosen = artifacts.load(folder, _encoder(config, folder))
    covered = served["skill"].profiles.experts
    if sorted(covered) != sorted(experts):
        log.warning("profiles in %s cover %s, not the configured experts %s", folder, covered, experts)
        why = f"the profiles in {folder} are for other experts: every expert answers (run `concilium profile`)"
        return {"all": make_router("all", experts=experts, fallback=why)}
    selection = artifacts.summary(folder).get("selection", {})
    why = {"profile": folder.name, "cv_accuracy": selection.get("scores", {}).get(chosen)}
    return {AUTO_ROUTER: Selected(served[chosen], chosen, why), **served, "all": make_router("all", experts=experts)}


def aggregator_preference(config: ConciliumConfig) -> tuple[tuple[str, ...], str]:
    """Who synthesises: the configured expert, else the ranking stored with the newest profiles."""
    if config.routing.aggregator is not None:
        return (config.routing.aggregator,), "fixed in config (routing.aggregator)"
    folder = artifacts.latest(config.routing.profiles)
    if folder is not None:
        ranking = artifacts.summary(folder).get("aggregator_ranking") or []
        configured = {e.name for e in config.experts}
        return tuple(e for e in ranking if e in configured), f"profiles' aggregator ranking ({folder / 'summary.json'})"
    return (), TOP_SCORED


def scheduler_settings(config: ConciliumConfig) -> SchedulerSettings:
    r = config.routing
    aggregators, source = aggregator_preference(config)
    return SchedulerSettings(
        r.max_batch, r.max_wait_ms, r.expert_timeout_s, r.moa_layers, r.self_moa_temperature, aggregators, source,
        r.max_pending,
    )


def expert_costs(config: ConciliumConfig) -> dict[str, float]:
    return {e.name: e.cost_per_1k_tokens for e in config.experts}


class ReloadError(UserError, ValueError):
    """A new config that cannot be applied without a restart."""


class Pipeline:
    def __init__(self, config: ConciliumConfig, pool: ExpertPool, scheduler: Scheduler,
                 latent: LatentExecutor | None = None) -> None:
        self.config = config
        self.pool = pool
        self.scheduler = scheduler
        self.latent = latent

    @classmethod
    async def start(cls, config: ConciliumConfig, detached: bool = False) -> Pipeline:
        """``detached``: share the experts as named actors that outlive this pipeline (Ray Serve replicas)."""
        routers = load_routers(config, [e.name for e in config.experts])
        pool = await start_pool(config, detached)
        latent = None
        if config.latent.checkpoint is not None:
            from orchestrator.latent.group import LatentGroup

            try:
                latent = await LatentGroup.start(config, detached)
            except Exception:
                pool.shutdown()
                raise
        scheduler = Scheduler(routers, pool, scheduler_settings(config), expert_costs(config), latent)
        scheduler.start()
        return cls(config, pool, scheduler, latent)

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
        self.pool.config = config.pool
        for name in removed + changed:
            await self.pool.remove(name)
        for name in changed + added:
            await self.pool.add(new[name])
        routers = load_routers(config, self.pool.names)
        self.scheduler.reconfigure(routers, scheduler_settings(config), expert_costs(config))
        self.config = config
        return {"added": added, "removed": removed, "changed": changed, "routers": list(routers)}

    async def ask(self, request: QueryRequest) -> Answer:
        return await self.scheduler.submit(request)

    async def close(self) -> None:
        await self.scheduler.stop()
        if self.latent is not None:
            self.latent.shutdown()
        self.pool.shutdown()
