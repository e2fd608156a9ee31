"""The executor: runs a phase's planned calls against the pool and the latent group, and nothing else.

Different experts run concurrently and resident experts start first; one
expert's calls run one after another, under the pool's lease, so an expert that
must be loaded is loaded once for all its work in the phase. Every call goes
through one failure wrapper, ``attempt``: a call either returns its result or
the reason it failed, and a failure never stops the other calls.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable
from typing import Protocol

from orchestrator.engine.plan import ExpertWork, LatentWork
from orchestrator.engine.stats import SchedulerStats
from workers.pool import ExpertPool, reason
from workers.types import GenerationResult, SamplingParams

Outcome = GenerationResult | str
"""A call's result, or why it failed."""


class LatentExecutor(Protocol):
    """Runs ``latent`` decisions: per row, the primary generates while it reads its peers' prompt latents.
    Each completion's ``meta['peer_tokens']`` counts the prompt tokens each peer encoded."""

    async def generate(self, primary: str, peers: list[list[str]], prompts: list[str], params: SamplingParams
                       ) -> GenerationResult: ...

    def shutdown(self) -> None: ...


class Executor:
    def __init__(self, pool: ExpertPool, latent: LatentExecutor | None, stats: SchedulerStats,
                 timeout_s: float) -> None:
        self.pool, self.latent, self.stats, self.timeout_s = pool, latent, stats, timeout_s

    async def attempt(self, call: Awaitable[GenerationResult]) -> Outcome:
        """The call's result, counted in the stats, or why it failed: the one place a failure is caught."""
        try:
            result = await asyncio.wait_for(call, self.timeout_s)
        except Exception as exc:  # any failure of one call is that call's outcome, not the window's
            return "timed out" if isinstance(exc, TimeoutError) else reason(exc)
        self.stats.call(result)
        return result

    async def run(self, works: list[ExpertWork]) -> list[tuple[ExpertWork, Outcome]]:
        """Every work item once; experts concurrently, resident ones first, each expert's items in turn."""
        by_expert: dict[str, list[ExpertWork]] = defaultdict(list)
        for work in works:
            by_expert[work.expert].append(work)
        resident = set(self.pool.resident())
        order = sorted(by_expert, key=lambda e: (e not in resident, e))
        outcomes: list[tuple[ExpertWork, Outcome]] = []

        async def run_expert(expert: str) -> None:
            for work in by_expert[expert]:
                outcomes.append((work, await self.attempt(self.pool.generate(expert, work.prompts, work.params))))

        await asyncio.gather(*(asyncio.create_task(run_expert(e)) for e in order))
        return outcomes

    async def run_latent(self, works: list[LatentWork]) -> list[tuple[LatentWork, Outcome]]:
        """Every latent-group call, concurrently: the group serialises them on its one device."""
        async def one(work: LatentWork) -> tuple[LatentWork, Outcome]:
            call = self.latent.generate(work.primary, work.peers, work.prompts, work.params)
            return work, await self.attempt(call)

        return list(await asyncio.gather(*(one(w) for w in works)))
