"""Budget holds in the store: what a hold is, the rule that admits one, and that rule as one redis script.

Kept apart from ``store`` because it is the budgets' logic, not the store's: both backends apply ``verdict_of``
(``MemoryStore`` in Python, ``RedisStore`` with ``HOLD_SCRIPT``, its transcription), so replicas on either
agree on what fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from orchestrator.engine.requests import USD_SLACK


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


HOLD_SCRIPT = """
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
