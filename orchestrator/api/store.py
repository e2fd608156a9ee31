"""The store: one small key-value interface, two backends.

- ``RedisStore`` (``REDIS_URL``): shared by every API replica and survives
  their restarts, so jobs, the response cache and rate-limit counters are
  cluster-wide.
- ``MemoryStore``: the embedded default when no URL is given; one process,
  gone with it.

The interface holds only the primitives the service needs (strings with a
TTL, counters, hashes, sets, logs that replicas read from where they left
off, and budget holds: ``hold``, ``settle``, ``held``), so both backends
implement it fully and the callers (caches, jobs, feedback, rate limits,
budgets) never branch on the backend.
A backend that cannot be reached raises ``StoreUnavailable``; callers decide
whether that degrades a feature (the cache) or fails a request (jobs).
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from orchestrator.api.holds import (
    HOLD_SCRIPT,
    USAGE_TOKENS,
    USAGE_USD,
    Hold,
    HoldAnswer,
    held_total,
    verdict_of,
)
from orchestrator.engine.requests import USD_SLACK


class StoreUnavailable(RuntimeError):
    """The store could not be reached or answered with an error."""


DELETE_BATCH = 1000
"""Keys ``delete_prefix`` scans for, and unlinks, per round trip: a cache of 100,000 entries clears in 100."""
STORE_RETRY_S, STORE_RETRY_EVERY_S = 300.0, 0.25
"""How long, and how often, a write that must not be lost is tried again while the store is unavailable."""


async def retry_while_down(write: Callable[[], Awaitable[None]]) -> None:
    """``write`` until the store takes it, every ``STORE_RETRY_EVERY_S`` for ``STORE_RETRY_S``; then the last
    StoreUnavailable. For writes that are one transaction each, so a retry never applies twice: a usage settle,
    a finished job's outcome."""
    deadline = time.monotonic() + STORE_RETRY_S
    while True:
        try:
            return await write()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(STORE_RETRY_EVERY_S)


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

    async def hold(self, usage_key: str, holds_key: str, hold: Hold, limits: tuple[float | None, float | None],
                   ttl_s: float, keep_s: float, replaces: str | None = None) -> HoldAnswer:
        """Atomically: forget expired holds, then add ``hold`` (in place of the hold ``replaces``, which a grown
        hold takes over) if the usage hash's spending plus every other live hold plus this one stays within
        ``limits`` (tokens, USD; None: no limit). A hold expires ``ttl_s`` after it was made or grown."""
        ...

    async def settle(self, usage_key: str, holds_key: str, member: str | None, fields: dict[str, float],
                     keep_s: float) -> None:
        """Atomically: add ``fields`` to the usage hash and drop the hold (if any; gone if it expired)."""
        ...

    async def held(self, holds_key: str) -> tuple[float, float]:
        """The tokens and USD of the live holds."""
        ...

    async def sadd(self, key: str, member: str) -> None: ...

    async def srem(self, key: str, member: str) -> None: ...

    async def smembers(self, key: str) -> set[str]: ...

    async def append(self, key: str, value: str, keep: int, ttl_s: float | None = None) -> int:
        """Add ``value`` to the log ``key`` under the next sequence number (returned); the log keeps its newest
        ``keep`` values, and expires ``ttl_s`` after its last append. A log begun again (deleted, expired)
        numbers above the one before, so a reader that left off in the old one misses nothing of the new."""
        ...

    async def read_after(self, key: str, after: int) -> tuple[int, list[tuple[int, str]]]:
        """The log's last sequence number (0: no log), and its values numbered above ``after`` in order."""
        ...

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key that starts with ``prefix``; how many there were."""
        ...

    async def close(self) -> None: ...


class MemoryStore:
    """Dicts with expiry times. Every method runs on the event loop's thread, so no locks are needed."""

    kind = "memory"

    def __init__(self) -> None:
        self._values: dict[str, tuple[str, float | None]] = {}
        self._hashes: dict[str, tuple[dict[str, float], float | None]] = {}
        self._sets: dict[str, set[str]] = {}
        self._holds: dict[str, dict[str, float]] = {}
        self._logs: dict[str, tuple[int, list[tuple[int, str]], float | None]] = {}

    async def ping(self) -> None:
        return None

    def _log(self, key: str) -> tuple[int, list[tuple[int, str]], float | None]:
        log = self._logs.get(key, (0, [], None))
        if log[2] is not None and log[2] <= time.monotonic():
            self._logs.pop(key, None)
            return 0, [], None
        return log

    async def append(self, key: str, value: str, keep: int, ttl_s: float | None = None) -> int:
        seq, values, _ = self._log(key)
        seq = (seq or time.time_ns() // 1000) + 1  # a new log numbers from the clock, as RedisStore's does
        values.append((seq, value))
        del values[:max(0, len(values) - keep)]
        self._logs[key] = (seq, values, time.monotonic() + ttl_s if ttl_s else None)
        return seq

    async def read_after(self, key: str, after: int) -> tuple[int, list[tuple[int, str]]]:
        seq, values, _ = self._log(key)
        return seq, values[bisect.bisect_right(values, after, key=lambda item: item[0]):]

    async def delete_prefix(self, prefix: str) -> int:
        gone = 0
        for table in (self._values, self._hashes, self._sets, self._holds, self._logs):
            keys = [k for k in table if k.startswith(prefix)]
            for k in keys:
                del table[k]
            gone += len(keys)
        return gone

    def _live_holds(self, key: str) -> dict[str, float]:
        now = time.monotonic()
        holds = {m: expires for m, expires in self._holds.get(key, {}).items() if expires > now}
        self._holds[key] = holds
        return holds

    async def held(self, holds_key: str, but: str | None = None) -> tuple[float, float]:
        return held_total([m for m in self._live_holds(holds_key) if m != but])

    async def hold(self, usage_key: str, holds_key: str, hold: Hold, limits: tuple[float | None, float | None],
                   ttl_s: float, keep_s: float, replaces: str | None = None) -> HoldAnswer:
        used = self._hash(usage_key)
        spent = (sum(used.get(f, 0.0) for f in USAGE_TOKENS), used.get(USAGE_USD, 0.0))
        held = await self.held(holds_key, but=replaces)
        verdict = verdict_of(spent, held, (hold.tokens, hold.usd), limits)
        if verdict == "held":
            holds = self._live_holds(holds_key)
            holds.pop(replaces or "", None)
            holds[hold.member] = time.monotonic() + ttl_s
        return HoldAnswer(verdict, *spent, *held)

    async def settle(self, usage_key: str, holds_key: str, member: str | None, fields: dict[str, float],
                     keep_s: float) -> None:
        await self.hincr(usage_key, fields, keep_s)
        if member is not None:
            self._live_holds(holds_key).pop(member, None)

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


APPEND_SCRIPT = """
if redis.call('EXISTS', KEYS[2]) == 0 then
  local t = redis.call('TIME')
  redis.call('SET', KEYS[2], tonumber(t[1]) * 1000000 + tonumber(t[2]))
end
local seq = redis.call('INCR', KEYS[2])
redis.call('ZADD', KEYS[1], seq, ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[2]) + 1))
if tonumber(ARGV[3]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return seq
"""
"""``Store.append``: the number, the value and the trim in one step, so two replicas never share a number. A new
log numbers from redis's clock in microseconds, so a log deleted and begun again numbers above the old one, and a
reader that left off in the old one reads all of the new."""


class RedisStore:
    """redis-py's asyncio client. Every call is bounded by a socket timeout so a dead redis fails fast."""

    kind = "redis"

    def __init__(self, url: str, prefix: str = "concilium:", timeout_s: float = 2.0) -> None:
        self.url = url
        self.prefix = prefix
        self._r = aioredis.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._hold = self._r.register_script(HOLD_SCRIPT)
        self._append = self._r.register_script(APPEND_SCRIPT)

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

    async def hold(self, usage_key: str, holds_key: str, hold: Hold, limits: tuple[float | None, float | None],
                   ttl_s: float, keep_s: float, replaces: str | None = None) -> HoldAnswer:
        args = [hold.member, repr(hold.tokens), repr(hold.usd), *(-1 if x is None else x for x in limits),
                int(ttl_s * 1000), int(keep_s * 1000), USD_SLACK, replaces or ""]
        verdict, *figures = await self._do(self._hold(keys=[self._k(usage_key), self._k(holds_key)], args=args))
        return HoldAnswer(verdict, *(float(x) for x in figures))

    async def settle(self, usage_key: str, holds_key: str, member: str | None, fields: dict[str, float],
                     keep_s: float) -> None:
        async def run() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                for f, amount in fields.items():
                    pipe.hincrbyfloat(self._k(usage_key), f, amount)
                pipe.pexpire(self._k(usage_key), int(keep_s * 1000))
                if member is not None:
                    pipe.zrem(self._k(holds_key), member)
                await pipe.execute()

        await self._do(run())

    async def held(self, holds_key: str) -> tuple[float, float]:
        seconds, micros = await self._do(self._r.time())  # redis's clock, as the script's
        now_ms = seconds * 1000 + micros // 1000
        return held_total(await self._do(self._r.zrangebyscore(self._k(holds_key), now_ms, "+inf")))

    async def sadd(self, key: str, member: str) -> None:
        await self._do(self._r.sadd(self._k(key), member))

    async def srem(self, key: str, member: str) -> None:
        await self._do(self._r.srem(self._k(key), member))

    async def smembers(self, key: str) -> set[str]:
        return set(await self._do(self._r.smembers(self._k(key))))

    async def append(self, key: str, value: str, keep: int, ttl_s: float | None = None) -> int:
        ttl_ms = int(ttl_s * 1000) if ttl_s else 0
        return int(await self._do(self._append(keys=[self._k(key), self._k(key) + ":seq"], args=[value, keep, ttl_ms])))

    async def read_after(self, key: str, after: int) -> tuple[int, list[tuple[int, str]]]:
        async def run() -> tuple[int, list[tuple[int, str]]]:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.get(self._k(key) + ":seq")
                pipe.zrangebyscore(self._k(key), f"({after}", "+inf", withscores=True)
                seq, items = await pipe.execute()
            return int(seq or 0), [(int(n), v) for v, n in items]

        return await self._do(run())

    async def delete_prefix(self, prefix: str) -> int:
        async def run() -> int:
            keys = [key async for key in self._r.scan_iter(match=self._k(prefix) + "*", count=DELETE_BATCH)]
            batches = [keys[i:i + DELETE_BATCH] for i in range(0, len(keys), DELETE_BATCH)]
            return sum([await self._r.unlink(*batch) for batch in batches])

        return await self._do(run())

    async def close(self) -> None:
        await self._r.aclose()


def open_store(redis_url: str | None) -> Store:
    return RedisStore(redis_url) if redis_url else MemoryStore()
