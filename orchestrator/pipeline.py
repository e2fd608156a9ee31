"""The routed pipeline: query → route → solve → aggregate → answer.

A plain Python controller over the router, the expert pool and the scheduler,
used by the CLI now and by the API later.
"""

from __future__ import annotations

import logging
from pathlib import Path

from orchestrator.config import ConciliumConfig
from orchestrator.runtime import start_pool
from orchestrator.scheduler import Answer, QueryRequest, Scheduler, SchedulerSettings
from routers.base import Router, make_router
from routers.embedding import Embedder
from routers.symbolic import SkillRouter
from workers.model_store import embedder_path
from workers.pool import ExpertPool

log = logging.getLogger(__name__)


def load_router(config: ConciliumConfig, experts: list[str]) -> Router:
    """The skill router over the newest profiles for exactly these experts, else every expert answers.

    The embedder gets no disk cache: live queries are new text, and the profile
    index keeps its own skill vectors, so reading the offline cache would only
    slow the start.
    """
    root = config.routing.profiles
    latest = root / "LATEST"
    if latest.exists():
        folder = root / latest.read_text().strip()
        router = SkillRouter.from_artifacts(folder, Embedder(embedder_path()))
        if sorted(router.profiles.experts) == sorted(experts):
            return router
        log.warning("profiles in %s cover %s, not the configured experts %s", folder, router.profiles.experts, experts)
    return make_router(
        "all",
        experts=experts,
        fallback=f"no profiles for these experts in {root}: every expert answers (run `concilium profile`)",
    )


class Pipeline:
    def __init__(self, config: ConciliumConfig, pool: ExpertPool, scheduler: Scheduler) -> None:
        self.config = config
        self.pool = pool
        self.scheduler = scheduler

    @classmethod
    async def start(cls, config: ConciliumConfig, model_store: Path | None = None) -> Pipeline:
        pool = await start_pool(config, model_store)
        r = config.routing
        scheduler = Scheduler(
            load_router(config, pool.names),
            pool,
            SchedulerSettings(r.max_batch, r.max_wait_ms, r.expert_timeout_s),
            {e.name: e.cost_per_1k_tokens for e in config.experts},
        )
        scheduler.start()
        return cls(config, pool, scheduler)

    async def ask(self, request: QueryRequest) -> Answer:
        return await self.scheduler.submit(request)

    async def close(self) -> None:
        await self.scheduler.stop()
        self.pool.shutdown()
