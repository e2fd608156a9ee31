"""The store: one small key-value interface, two backends.

- ``RedisStore`` (``REDIS_URL``): shared by every API replica and survives
  their restarts, so jobs, the response cache and rate-limit counters are
  cluster-wide.
- ``MemoryStore``: the embedded default when no URL is given; one process,
  gone with it.

The interface holds only the primitives the service needs (strings with a
TTL, counters, hashes, sets), so both backends implement it fully and the
callers (cache, jobs, feedback, rate limits) never branch on the backend.
A backend that cannot be reached raises ``StoreUnavailable``; callers decide
whether that degrades a feature (the cache) or fails a request (jobs).
"""

from __future__ import annotations

import time
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError


class StoreUnavailable(RuntimeError):
    """The store could not be reached or answered with an error."""


class Store(Protocol):
    kind: str

    async def ping(self) -> None: ...

    async def get(self, key: str) -> str | None: ...

    async def set(self, key: str, value: str, ttl_s: float | None = None, only_new: bool = False) -> bool:
        """Store a value; with ``only_new`` only if the key is absent. True when it was written."""
        ...

    async def delete(self, key: str) -> None: ...

    async def incr(self, key: str, ttl_s: float | None = None) -> int:
        """Add one; a key created by this call expires after ``ttl_s`` (fixed-window counters)."""
        ...

    async def hincr(self, key: str, fields: dict[str, float], ttl_s: float | None = None) -> None:
        """Add to a hash's fields; with ``ttl_s`` the hash expires that long after this call (daily counters)."""
        ...

    async def hgetall(self, key: str) -> dict[str, float]: ...

    async def sadd(self, key: str, member: str) -> None: ...

    async def srem(self, key: str, member: str) -> None: ...

    async def smembers(self, key: str) -> set[str]: ...

    async def close(self) -> None: ...


class MemoryStore:
    """Dicts with expiry times. Every method runs on the event loop's thread, so no locks are needed."""

    kind = "memory"

    def __init__(self) -> None:
        self._values: dict[str, tuple[str, float | None]] = {}
        self._hashes: dict[str, tuple[dict[str, float], float | None]] = {}
        self._sets: dict[str, set[str]] = {}

    async def ping(self) -> None:
        return None

    def _live(self, key: str) -> str | None:
        item = self._values.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and expires <= time.monotonic():
            del self._values[key]
            return None
        return value

    async def get(self, key: str) -> str | None:
        return self._live(key)

    async def set(self, key: str, value: str, ttl_s: float | None = None, only_new: bool = False) -> bool:
        if only_new and self._live(key) is not None:
            return False
        self._values[key] = (value, time.monotonic() + ttl_s if ttl_s else None)
        return True

    async def delete(self, key: str) -> None:
        self._values.pop(key, None)

    async def incr(self, key: str, ttl_s: float | None = None) -> int:
        current = self._live(key)
        if current is None:
            self._values[key] = ("1", time.monotonic() + ttl_s if ttl_s else None)
            return 1
        value = int(current) + 1
        self._values[key] = (str(value), self._values[key][1])
        return value

    def _hash(self, key: str) -> dict[str, float]:
        h, expires = self._hashes.get(key, ({}, None))
        if expires is not None and expires <= time.monotonic():
            del self._hashes[key]
            return {}
        return h

    async def hincr(self, key: str, fields: dict[str, float], ttl_s: float | None = None) -> None:
        h = self._hash(key)
        for f, amount in fields.items():
            h[f] = h.get(f, 0.0) + amount
        expires = time.monotonic() + ttl_s if ttl_s else self._hashes.get(key, ({}, None))[1]
        self._hashes[key] = (h, expires)

    async def hgetall(self, key: str) -> dict[str, float]:
        return dict(self._hash(key))

    async def sadd(self, key: str, member: str) -> None:
        self._sets.setdefault(key, set()).add(member)

    async def srem(self, key: str, member: str) -> None:
        self._sets.get(key, set()).discard(member)

    async def smembers(self, key: str) -> set[str]:
        return set(self._sets.get(key, set()))

    async def close(self) -> None:
        return None


class RedisStore:
    """redis-py's asyncio client. Every call is bounded by a socket timeout so a dead redis fails fast."""

    kind = "redis"

    def __init__(self, url: str, prefix: str = "concilium:", timeout_s: float = 2.0) -> None:
        self.url = url
        self.prefix = prefix
        self._r = aioredis.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )

    def _k(self, key: str) -> str:
        return self.prefix + key

    async def _do(self, coro):  # noqa: ANN001, ANN202  (every redis call goes through here)
        try:
            return await coro
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis at {self.url} is unavailable: {exc}") from None

    async def ping(self) -> None:
        await self._do(self._r.ping())

    async def get(self, key: str) -> str | None:
        return await self._do(self._r.get(self._k(key)))

    async def set(self, key: str, value: str, ttl_s: float | None = None, only_new: bool = False) -> bool:
        px = int(ttl_s * 1000) if ttl_s else None
        return bool(await self._do(self._r.set(self._k(key), value, px=px, nx=only_new)))

    async def delete(self, key: str) -> None:
        await self._do(self._r.delete(self._k(key)))

    async def incr(self, key: str, ttl_s: float | None = None) -> int:
        async def run() -> int:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.incr(self._k(key))
                if ttl_s:
                    pipe.pexpire(self._k(key), int(ttl_s * 1000), nx=True)
                return (await pipe.execute())[0]

        return await self._do(run())

    async def hincr(self, key: str, fields: dict[str, float], ttl_s: float | None = None) -> None:
        async def run() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                for f, amount in fields.items():
                    pipe.hincrbyfloat(self._k(key), f, amount)
                if ttl_s:
                    pipe.pexpire(self._k(key), int(ttl_s * 1000))
                await pipe.execute()

        await self._do(run())

    async def hgetall(self, key: str) -> dict[str, float]:
        return {f: float(v) for f, v in (await self._do(self._r.hgetall(self._k(key)))).items()}

    async def sadd(self, key: str, member: str) -> None:
        await self._do(self._r.sadd(self._k(key), member))

    async def srem(self, key: str, member: str) -> None:
        await self._do(self._r.srem(self._k(key), member))

    async def smembers(self, key: str) -> set[str]:
        return set(await self._do(self._r.smembers(self._k(key))))

    async def close(self) -> None:
        await self._r.aclose()


def open_store(redis_url: str | None) -> Store:
    return RedisStore(redis_url) if redis_url else MemoryStore()
