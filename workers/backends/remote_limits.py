"""A remote expert's limits, kept in its actor: concurrent requests, requests per minute, tokens per minute.

Every API replica that shares the expert shares its actor (detached actors under Ray Serve), so limits kept here
hold across replicas. A request over a limit waits for room; it does not fail. Written here rather than taken
from a library because the buckets live on the actor's own event loop, which every call already runs on, so they
need no lock and no store round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable


class TokenBucket:
    """``per_minute`` units, refilled continuously; a take larger than the bucket waits for a full bucket."""

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.level = self.capacity
        self.rate = per_minute / 60.0
        self.updated = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    async def take(self, amount: float) -> None:
        amount = min(amount, self.capacity)
        while True:
            self._refill()
            if self.level >= amount:
                self.level -= amount
                return
            await asyncio.sleep((amount - self.level) / self.rate)

    def give_back(self, amount: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + amount)


class RemoteLimits:
    def __init__(self, concurrency: int, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        self.slots = asyncio.Semaphore(concurrency)
        self.requests = TokenBucket(requests_per_minute) if requests_per_minute else None
        self.tokens = TokenBucket(tokens_per_minute) if tokens_per_minute else None

    @contextlib.asynccontextmanager
    async def admit(self, most_tokens: int) -> AsyncIterator[Callable[[int], None]]:
        """Wait for a request slot, a request and ``most_tokens`` tokens; the block reports the tokens it really
        used with the callable it gets, and the rest goes back to the bucket."""
        if self.requests is not None:
            await self.requests.take(1)
        if self.tokens is not None:
            await self.tokens.take(most_tokens)
        used = [most_tokens]
        async with self.slots:
            yield lambda n: used.__setitem__(0, n)
        if self.tokens is not None and used[0] < most_tokens:
            self.tokens.give_back(most_tokens - used[0])
