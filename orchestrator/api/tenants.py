"""Tenants: per-key usage with a daily window, and the budgets that limit it.

Usage lives in the store under ``usage:<key id>:<UTC day>`` (requests, prompt and completion tokens,
estimated USD), so with redis every replica adds to and reads the same figures. A key's limits are its own
entry in ``server.budgets.keys`` when it has one, else ``server.budgets.default``; the effective limits are
part of every ``GET /v1/usage`` answer, so no setting overrides another silently.

A request is checked at admission against what the key has used today:
- ``over_budget: refuse`` (the default): a key that has reached a limit gets 429 ``budget_exceeded`` with
  what remains and ``Retry-After`` at the window's end (UTC midnight). A request admitted before the limit
  was reached is served in full, and counted: its size is not known until it is answered.
- ``over_budget: fit``: the request's ``budget`` becomes at most the USD that remains, so the router drops
  its costliest recruits until the estimate fits (one expert always stays); a key with nothing left is
  still refused.
If the store cannot be read, ``store_down`` decides: ``open`` admits and counts nothing, ``closed`` refuses
with 503.
"""

from __future__ import annotations

import dataclasses
import time

from orchestrator.api.errors import ServiceError, Unavailable
from orchestrator.api.schemas import KeyUsage, QueryResponse
from orchestrator.api.security import Caller, needs_admin
from orchestrator.api.store import Store, StoreUnavailable
from orchestrator.config import KeyLimits, QuotaConfig
from orchestrator.engine.requests import QueryRequest

DAY_S = 86_400
KEEP_S = 2 * DAY_S
"""How long a day's usage stays in the store: past its own day, for the admin who reads yesterday's."""


def utc_day(now: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now))


def resets_in_s(now: float) -> int:
    return DAY_S - int(now) % DAY_S


class QuotaExceeded(ServiceError):
    """A key's daily quota (``server.budgets``) is spent; on the wire it keeps the name ``budget_exceeded``."""

    status, type = 429, "budget_exceeded"

    def __init__(self, message: str, remaining: dict[str, float | None], retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)}, details={"remaining": remaining})


@dataclasses.dataclass
class Ledger:
    store: Store
    quotas: QuotaConfig

    def limits(self, key_id: str) -> KeyLimits:
        return self.quotas.keys.get(key_id, self.quotas.default)

    async def usage_for(self, caller: Caller, key_id: str | None) -> KeyUsage:
        """``GET /v1/usage``: the caller's own usage; another key's only for an admin."""
        if key_id is not None and key_id != caller.key_id and not caller.admin:
            raise needs_admin()
        try:
            return await self.usage(key_id or caller.key_id)
        except StoreUnavailable as exc:
            raise Unavailable(f"usage is unavailable, the store cannot be read: {exc}") from None

    async def usage(self, key_id: str, now: float | None = None) -> KeyUsage:
        now = time.time() if now is None else now
        used = await self.store.hgetall(f"usage:{key_id}:{utc_day(now)}")
        limits = self.limits(key_id)
        tokens = int(used.get("prompt_tokens", 0) + used.get("completion_tokens", 0))
        cost = used.get("cost_usd", 0.0)
        return KeyUsage(
            key_id=key_id, day=utc_day(now), requests=int(used.get("requests", 0)),
            prompt_tokens=int(used.get("prompt_tokens", 0)), completion_tokens=int(used.get("completion_tokens", 0)),
            cost_usd=cost, tokens_per_day=limits.tokens_per_day, usd_per_day=limits.usd_per_day,
            remaining_tokens=None if limits.tokens_per_day is None else max(0, limits.tokens_per_day - tokens),
            remaining_usd=None if limits.usd_per_day is None else max(0.0, limits.usd_per_day - cost),
            resets_in_s=resets_in_s(now),
        )

    async def admit(self, caller: Caller, request: QueryRequest) -> QueryRequest:
        """The request as it may run for this key: refused (429), or fitted into what remains."""
        limits = self.limits(caller.key_id)
        if limits.tokens_per_day is None and limits.usd_per_day is None:
            return request
        try:
            usage = await self.usage(caller.key_id)
        except StoreUnavailable as exc:
            if self.quotas.store_down == "closed":
                raise Unavailable(f"budgets cannot be checked, the store is unavailable: {exc}") from None
            return request
        remaining = {"tokens": usage.remaining_tokens, "usd": usage.remaining_usd}
        if usage.remaining_tokens == 0 or usage.remaining_usd == 0.0:
            spent = [f"{usage.prompt_tokens + usage.completion_tokens} of {limits.tokens_per_day} tokens"
                     if usage.remaining_tokens == 0 else "",
                     f"${usage.cost_usd:.6f} of ${limits.usd_per_day:g}" if usage.remaining_usd == 0.0 else ""]
            raise QuotaExceeded(f"key {caller.key_id} has used {' and '.join(s for s in spent if s)} today "
                                 f"(UTC {usage.day}); the budget renews in {usage.resets_in_s} s", remaining,
                                 usage.resets_in_s)
        if self.quotas.over_budget == "fit" and usage.remaining_usd is not None:
            fitted = min(request.max_cost_usd if request.max_cost_usd is not None else usage.remaining_usd,
                         usage.remaining_usd)
            return dataclasses.replace(request, max_cost_usd=fitted)
        return request

    async def record(self, caller: Caller, response: QueryResponse) -> None:
        """Count one answered request (a cache hit generated nothing and costs nothing)."""
        fields = {"requests": 1.0}
        if not response.cached:
            fields.update(prompt_tokens=float(response.total_usage.prompt_tokens),
                          completion_tokens=float(response.total_usage.completion_tokens),
                          cost_usd=response.cost_usd)
        await self.store.hincr(f"usage:{caller.key_id}:{utc_day(time.time())}", fields, KEEP_S)
