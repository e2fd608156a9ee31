"""The store: one small key-value interface, two backends.

- ``RedisStore`` (``REDIS_URL``): shared by every API replica and survives
  their restarts, so jobs, the response cache and rate-limit counters are
  cluster-wide.
- ``MemoryStore``: the embedded default when no URL is given; one process,
  gone with it.

The interface holds only the primitives the service needs (strings with a
TTL, counters, hashes, sets, and budget holds: ``hold``, ``settle``,
``held``), so both backends implement it fully and the callers (cache, jobs, feedback,
rate limits, budgets) never branch on the backend.
A backend that cannot be reached raises ``StoreUnavailable``; callers decide
whether that degrades a feature (the cache) or fails a request (jobs).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from orchestrator.engine.requests import USD_SLACK


class StoreUnavailable(RuntimeError):
    """The store could not be reached or answered with an error."""


@dataclass(frozen=True)
class Hold:
    """A budget reservation: its member in the key's set of holds, and the tokens and USD it holds."""

    member: str
    tokens: float
    usd: float

    @classmethod
    def of(cls, hold_id: str, tokens: float, usd: float) -> Hold:
        return cls(f"{hold_id}|{tokens!r}|{usd!r}", tokens, usd)

    def grown(self, tokens: float, usd: float) -> Hold:
        """The same hold, holding more: it replaces this one in the store (``Store.hold``'s ``replaces``)."""
        return Hold.of(self.member.split("|")[0], tokens, usd)


def held_total(members: list[str] | dict[str, float]) -> tuple[float, float]:
    """The tokens and USD that hold members (``id|tokens|usd``) hold together."""
    amounts = [m.split("|")[1:] for m in members]
    return sum(float(t) for t, _ in amounts), sum(float(u) for _, u in amounts)


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


Verdict = Literal["held", "wait", "never"]


@dataclass(frozen=True)
class HoldAnswer:
    """What ``hold`` decided, with the figures it decided on: spent (usage) and held (live holds) tokens and USD.

    - held: the hold is made;
    - wait: it fits once holds now live are settled or released;
    - never: it does not fit even with no hold live."""

    verdict: Verdict
    spent_tokens: float
    spent_usd: float
    held_tokens: float
    held_usd: float


USAGE_TOKENS = ("prompt_tokens", "completion_tokens")
USAGE_USD = "cost_usd"


def verdict_of(spent: tuple[float, float], held: tuple[float, float], want: tuple[float, float],
             limits: tuple[float | None, float | None]) -> Verdict:
    """The one rule both backends apply (the redis script is its transcription)."""
    def over(base: tuple[float, float]) -> bool:
        tokens_over = limits[0] is not None and base[0] + want[0] > limits[0]
        return tokens_over or (limits[1] is not None and base[1] + want[1] > limits[1] * (1 + USD_SLACK))

    if over(spent):
        return "never"
    return "wait" if over((spent[0] + held[0], spent[1] + held[1])) else "held"


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

    async def close(self) -> None: ...


class MemoryStore:
    """Dicts with expiry times. Every method runs on the event loop's thread, so no locks are needed."""

    kind = "memory"

    def __init__(self) -> None:
        self._values: dict[str, tuple[str, float | None]] = {}
        self._hashes: dict[str, tuple[dict[str, float], float | None]] = {}
        self._sets: dict[str, set[str]] = {}
        self._holds: dict[str, dict[str, float]] = {}

    async def ping(self) -> None:
        return None

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


_HOLD_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local held_t, held_u = 0, 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if m ~= ARGV[9] then
    local _, _, tok, usd = string.find(m, '^[^|]*|([^|]*)|(.*)$')
    held_t = held_t + tonumber(tok)
    held_u = held_u + tonumber(usd)
  end
end
local u = redis.call('HMGET', KEYS[1], 'prompt_tokens', 'completion_tokens', 'cost_usd')
local spent_t = (tonumber(u[1]) or 0) + (tonumber(u[2]) or 0)
local spent_u = tonumber(u[3]) or 0
local want_t, want_u = tonumber(ARGV[2]), tonumber(ARGV[3])
local lim_t, lim_u, slack = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[8])
local function over(base_t, base_u)
  return (lim_t >= 0 and base_t + want_t > lim_t) or (lim_u >= 0 and base_u + want_u > lim_u * (1 + slack))
end
local verdict = 'held'
if over(spent_t, spent_u) then
  verdict = 'never'
elseif over(spent_t + held_t, spent_u + held_u) then
  verdict = 'wait'
else
  if ARGV[9] ~= '' then redis.call('ZREM', KEYS[2], ARGV[9]) end
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[6]), ARGV[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
end
return {verdict, tostring(spent_t), tostring(spent_u), tostring(held_t), tostring(held_u)}
"""
"""``Store.hold`` as one script, so that the check and the hold are one step for every replica (``verdict_of`` is
the same rule in Python). Time is redis's own, so replicas with skewed clocks expire holds alike."""


class RedisStore:
    """redis-py's asyncio client. Every call is bounded by a socket timeout so a dead redis fails fast."""

    kind = "redis"

    def __init__(self, url: str, prefix: str = "concilium:", timeout_s: float = 2.0) -> None:
        self.url = url
        self.prefix = prefix
        self._r = aioredis.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._hold = self._r.register_script(_HOLD_SCRIPT)

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

    async def close(self) -> None:
        await self._r.aclose()


def open_store(redis_url: str | None) -> Store:
    return RedisStore(redis_url) if redis_url else MemoryStore()
