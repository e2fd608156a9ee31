"""The routed pipeline: query → route → solve → aggregate → answer.

A plain Python controller over the routers, the expert pool, the latent group
and the scheduler: ``concilium ask`` uses it directly, and the API's service
controller wraps it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from orchestrator.config import ConciliumConfig
from orchestrator.engine.executor import LatentExecutor
from orchestrator.engine.requests import Answer, QueryRequest
from orchestrator.engine.runtime import start_pool
from orchestrator.engine.scheduler import Scheduler
from orchestrator.engine.settings import TOP_SCORED, SchedulerSettings
from routers.base import Router
from routers.embedding import Embedder
from routers.profiles import ProfileError, Profiles, read_artifact
from routers.registry import make_router
from routers.skill_index import SkillIndex
from routers.symbolic import SkillRouter
from routers.vocabulary import LATENT_ROUTER
from workers.errors import UserError
from workers.model_store import embedder_path
from workers.pool import ExpertPool

log = logging.getLogger(__name__)


def _latest_profiles(config: ConciliumConfig) -> Path | None:
    latest = config.routing.profiles / "LATEST"
    if not latest.exists():
        return None
    folder = config.routing.profiles / latest.read_text().strip()
    if not latest.read_text().strip() or not folder.is_dir():
        raise ProfileError(f"{latest} names {folder}, which is not a folder: rebuild with `concilium profile`")
    return folder


def check_artifacts(config: ConciliumConfig) -> None:
    """Read the newest profile artifacts and the latent checkpoint once, before anything starts, so that a
    missing, corrupt or mismatched file stops ``serve`` with its name instead of leaving a half-started server."""
    folder = _latest_profiles(config)
    if folder is not None:
        Profiles.load(folder)
        SkillIndex.load(folder)
    aggregator_preference(config)
    if config.latent.checkpoint is not None:
        from orchestrator.latent.group import check_latent

        check_latent(config)


def load_routers(config: ConciliumConfig, experts: list[str]) -> dict[str, Router]:
    """Routers by name, the default first: the skill router over the newest profiles for exactly these
    experts, and ``all`` (every expert answers), which is the default when there are no such profiles.
    With ``latent.checkpoint`` set, ``latent`` is served as well (never the default: it needs a trained
    checkpoint and its own actor).

    The embedder gets no disk cache: live queries are new text, and the profile
    index keeps its own skill vectors, so reading the offline cache would only
    slow the start.
    """
    routers = _base_routers(config, experts)
    if config.latent.checkpoint is not None:
        from orchestrator.latent.group import latent_routing

        routers[LATENT_ROUTER] = latent_routing(config)
    return routers


def _base_routers(config: ConciliumConfig, experts: list[str]) -> dict[str, Router]:
    fallback = None
    folder = _latest_profiles(config)
    if folder is not None:
        router = SkillRouter.from_artifacts(folder, Embedder(embedder_path()))
        if sorted(router.profiles.experts) == sorted(experts):
            return {"skill": router, "all": make_router("all", experts=experts)}
        log.warning("profiles in %s cover %s, not the configured experts %s", folder, router.profiles.experts, experts)
        fallback = f"the profiles in {folder} are for other experts: every expert answers (run `concilium profile`)"
    fallback = fallback or f"no profiles in {config.routing.profiles}: every expert answers (run `concilium profile`)"
    return {"all": make_router("all", experts=experts, fallback=fallback)}


def aggregator_preference(config: ConciliumConfig) -> tuple[tuple[str, ...], str]:
    """Who synthesises: the configured expert, else the ranking stored with the newest profiles."""
    if config.routing.aggregator is not None:
        return (config.routing.aggregator,), "fixed in config (routing.aggregator)"
    folder = _latest_profiles(config)
    summary = folder / "summary.json" if folder is not None else None
    if summary is not None and summary.exists():
        data = read_artifact(summary, lambda p: json.loads(p.read_text()))
        ranking = (data.get("aggregator_ranking") if isinstance(data, dict) else None) or []
        configured = {e.name for e in config.experts}
        return tuple(e for e in ranking if e in configured), f"profiles' aggregator ranking ({summary})"
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
