"""The executor: runs a phase's planned calls against the pool and the latent group, and nothing else.

Different experts run concurrently and resident experts start first; one
expert's calls run one after another, under the pool's lease, so an expert that
must be loaded is loaded once for all its work in the phase. Every call goes
through one failure wrapper, ``attempt``: a call either returns its result or
the reason it failed, and a failure never stops the other calls.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from orchestrator.engine.plan import ExpertWork, LatentWork
from orchestrator.engine.stats import SchedulerStats
from orchestrator.engine.streams import TokenStream
from workers.pool import ExpertPool, reason
from workers.types import GenerationResult, SamplingParams, TokenDelta

Outcome = GenerationResult | str
"""A call's result, or why it failed."""


class LatentExecutor(Protocol):
    """Runs ``latent`` decisions: per row, the primary generates while it reads its peers' prompt latents.
    Each completion's ``meta['peer_tokens']`` counts the prompt tokens each peer encoded."""

    async def generate(self, primary: str, peers: list[list[str]], prompts: list[str], params: SamplingParams
                       ) -> GenerationResult: ...

    def stream(self, primary: str, peers: list[list[str]], prompts: list[str], params: SamplingParams, call: str
               ) -> AsyncIterator[list[TokenDelta] | GenerationResult]:
        """The same call as a stream: each row's new text as it is written, then the result."""
        ...

    def cancel(self, call: str, row: int) -> None: ...

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
                if work.streams:
                    call = uuid.uuid4().hex
                    self._hook(work.streams, lambda row, c=call, e=expert: self.pool.cancel(e, c, row))
                    outcome = await self.attempt(self._forward(
                        self.pool.stream(expert, work.prompts, work.params, call), work.streams))
                else:
                    outcome = await self.attempt(self.pool.generate(expert, work.prompts, work.params))
                outcomes.append((work, outcome))

        await asyncio.gather(*(asyncio.create_task(run_expert(e)) for e in order))
        return outcomes

    async def run_latent(self, works: list[LatentWork]) -> list[tuple[LatentWork, Outcome]]:
        """Every latent-group call, concurrently: the group serialises them on its one device."""
        async def one(work: LatentWork) -> tuple[LatentWork, Outcome]:
            streams = work.streams
            if not streams:
                return work, await self.attempt(self.latent.generate(work.primary, work.peers, work.prompts,
                                                                      work.params))
            call = uuid.uuid4().hex
            self._hook(streams, lambda row, c=call: self.latent.cancel(c, row))
            stream = self.latent.stream(work.primary, work.peers, work.prompts, work.params, call)
            return work, await self.attempt(self._forward(stream, streams))

        return list(await asyncio.gather(*(one(w) for w in works)))

    @staticmethod
    def _hook(streams: dict[int, TokenStream], cancel: Callable[[int], None]) -> None:
        """A request whose client goes away cancels its row of the call, and only that row."""
        for row, stream in streams.items():
            stream.on_cancel(lambda r=row: cancel(r))

    @staticmethod
    async def _forward(events: AsyncIterator[list[TokenDelta] | GenerationResult],
                       streams: dict[int, TokenStream]) -> GenerationResult:
        """Hand each streamed row's text to its request as it comes; the call's result at the end."""
        result = None
        async for event in events:
            if isinstance(event, GenerationResult):
                result = event
                continue
            for delta in event:
                if delta.row in streams:
                    streams[delta.row].delta(delta.text)
        if result is None:
            raise RuntimeError("the stream ended without a result")
        return result
