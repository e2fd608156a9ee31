"""The executor: runs a phase's planned calls against the pool and the latent group, and nothing else.

Different experts run concurrently and resident experts start first; one
expert's calls run one after another under one lease that the executor holds
for all of them, so an expert that must be loaded is loaded at most once per
phase, and no other expert's load can evict it between its calls. Between
phases nothing is held: an expert stays resident unless another one's load needs
its memory. Every call goes through one failure wrapper, ``attempt``: a call
either returns its result or the reason it failed, and a failure never stops
the other calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from orchestrator import tracing
from orchestrator.engine.plan import ExpertWork, LatentWork
from orchestrator.engine.stats import SchedulerStats
from orchestrator.engine.token_stream import TokenStream
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
                 timeout_s: float, stall_s: float | None = None) -> None:
        self.pool, self.latent, self.stats, self.timeout_s, self.stall_s = pool, latent, stats, timeout_s, stall_s

    async def attempt(self, call: Awaitable[GenerationResult]) -> Outcome:
        """The call's result, counted in the stats, or why it failed: the one place a failure is caught."""
        try:
            result = await asyncio.wait_for(call, self.timeout_s)
        except Exception as exc:  # any failure of one call is that call's outcome, not the window's
            return "timed out" if isinstance(exc, TimeoutError) else reason(exc)
        self.stats.call(result)
        tracing.adopt(result.spans)
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
            async with self._held(expert) as failure:
                for work in by_expert[expert]:
                    outcomes.append((work, failure or await self.attempt(self._call(expert, work))))

        await asyncio.gather(*(asyncio.create_task(run_expert(e)) for e in order))
        return outcomes

    @contextlib.asynccontextmanager
    async def _held(self, expert: str) -> AsyncIterator[str | None]:
        """The expert leased for all its calls of the phase; yields None, or why it could not be held (each of
        its calls then fails with that reason)."""
        async with contextlib.AsyncExitStack() as stack:
            try:
                await asyncio.wait_for(stack.enter_async_context(self.pool.lease(expert)), self.timeout_s)
            except Exception as exc:  # the load failed or never found room: the calls' outcome, not the window's
                yield "timed out" if isinstance(exc, TimeoutError) else reason(exc)
                return
            yield None

    def _call(self, expert: str, work: ExpertWork) -> Awaitable[GenerationResult]:
        if not work.streams:
            return self.pool.generate(expert, work.prompts, work.params)
        call = uuid.uuid4().hex
        cancel = functools.partial(self.pool.cancel, expert, call)
        self._hook(work.streams, cancel)
        return self._forward(self.pool.stream(expert, work.prompts, work.params, call), work.streams, cancel,
                             len(work.prompts))

    async def run_latent(self, works: list[LatentWork]) -> list[tuple[LatentWork, Outcome]]:
        """Every latent-group call, concurrently: the group serialises them on its one device."""
        async def one(work: LatentWork) -> tuple[LatentWork, Outcome]:
            streams = work.streams
            if not streams:
                return work, await self.attempt(self.latent.generate(work.primary, work.peers, work.prompts,
                                                                      work.params))
            call = uuid.uuid4().hex
            cancel = functools.partial(self.latent.cancel, call)
            self._hook(streams, cancel)
            stream = self.latent.stream(work.primary, work.peers, work.prompts, work.params, call)
            return work, await self.attempt(self._forward(stream, streams, cancel, len(work.members)))

        return list(await asyncio.gather(*(one(w) for w in works)))

    @staticmethod
    def _hook(streams: dict[int, TokenStream], cancel: Callable[[int], None]) -> None:
        """A request whose client goes away cancels its row of the call, and only that row."""
        for row, stream in streams.items():
            stream.on_cancel(lambda r=row: cancel(r))

    async def _forward(self, events: AsyncIterator[list[TokenDelta] | GenerationResult],
                       streams: dict[int, TokenStream], cancel: Callable[[int], None], rows: int) -> GenerationResult:
        """Hand each streamed row's text to its request as it comes; the call's result at the end. A call that
        writes nothing for ``stall_s`` is a stalled one: its ``rows`` are cancelled in the actor, and it fails."""
        result = None
        pending = aiter(events)
        while True:
            try:
                event = await asyncio.wait_for(anext(pending), self.stall_s)
            except StopAsyncIteration:
                break
            except TimeoutError:
                for row in range(rows):
                    cancel(row)
                raise StreamStalled(f"no token within {self.stall_s:g} s (routing.stall_timeout_s)") from None
            if isinstance(event, GenerationResult):
                result = event
                continue
            for delta in event:
                if delta.row in streams:
                    streams[delta.row].delta(delta.text)
        if result is None:
            raise RuntimeError("the stream ended without a result")
        return result


class StreamStalled(RuntimeError):
    """A streaming call wrote no token for ``routing.stall_timeout_s``."""
