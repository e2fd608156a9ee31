"""Tenants: per-key usage with a daily window, and budgets that cannot be overshot.

Usage lives in the store under ``usage:<key id>:<UTC day>`` (requests, prompt and completion tokens,
estimated USD), so with redis every replica adds to and reads the same figures. A key's limits are its own
entry in ``server.budgets.keys`` when it has one, else ``server.budgets.default``; the effective limits are
part of every ``GET /v1/usage`` answer, so no setting overrides another silently.

A request of a key with limits reserves its most before it runs (``engine.ceiling``): the tokens and USD of
every call its plan can make, each prompt counted by the expert that will read it, plus every token the call may
generate. The reservation is a hold in the store (``holds:<key id>:<UTC day>``), made in one atomic step with the
check (a redis script), so concurrent requests on every replica see each other's holds. The scheduler asks the
hold before every call (``Reservation.take``); a call past it grows the hold in the same atomic step if the
budget allows, else it is not made. When the request ends, its actual usage is added and its hold dropped in one
transaction; a failed or cancelled request drops its hold; a crashed replica's holds expire ``request_timeout_s``
+ ``HOLD_MARGIN_S`` after they were made or grown. No call spends more than its most, so the spent total never
passes the limit.

``over_budget`` says what an admitted request may count on:
- ``refuse`` (the default): all of its plan, the conditional calls included (a cascade's escalation, moa layers,
  a synthesis the experts' agreement may skip), so an admitted request is served as asked;
- ``fit``: its first round (the routed experts), with its ``budget`` first shrunk to the USD that is left, so the
  router drops its costliest recruits (one expert always stays); a later call runs only if the budget still
  allows it (a synthesis it does not allow falls back to the vote, and the answer says so).
At admission:
- the request fits what is left (limit − spent − held): it is held, and runs;
- it would fit once requests running now settle (their holds are most, and they usually spend less): it waits
  for them up to ``budgets.wait_s``, then is refused;
- it does not fit even with nothing held: 429 ``budget_exceeded`` with what remains and ``Retry-After`` at the
  window's end (UTC midnight).
If the store cannot be read, ``store_down`` decides: ``open`` admits and counts nothing, ``closed`` refuses with
503.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import Awaitable, Callable

from orchestrator.api.errors import ServiceError, Unavailable
from orchestrator.api.holds import USAGE_USD, Hold, HoldAnswer, verdict_of
from orchestrator.api.schemas import KeyUsage, QueryResponse
from orchestrator.api.security import Caller, needs_admin
from orchestrator.api.store import Store, StoreUnavailable, retry_while_down
from orchestrator.config import KeyLimits, QuotaConfig
from orchestrator.engine.requests import QueryRequest, Spend

DAY_S = 86_400
KEEP_S = 2 * DAY_S
"""How long a day's usage stays in the store: past its own day, for the admin who reads yesterday's."""
HOLD_MARGIN_S = 60.0
"""A hold outlives its request's time limit by this much before it expires: the margin for the settle itself."""
POLL_S = (0.02, 0.25)
"""A waiting request looks again after the first, doubling up to the second (holds settle in any replica)."""

Most = Callable[[QueryRequest, bool], Awaitable[Spend]]
"""The most a request can spend as it would be routed now, all of its plan or (True) its first round
(``Pipeline.most``)."""


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
class Reservation:
    """A request's hold on its key's budget, as the scheduler draws on it (``engine.requests.Allowance``).

    A call within what is held is taken at once. Past it, the hold grows in the store if the key's budget allows,
    without waiting (a window must not stall for one request), else the call is refused. Settled or released when
    the request ends."""

    store: Store
    usage_key: str
    holds_key: str
    hold: Hold
    limits: tuple[float | None, float | None]
    ttl_s: float
    store_down: str
    committed: Spend = dataclasses.field(default_factory=Spend)

    async def take(self, most: Spend) -> bool:
        need = self.committed + most
        held = Spend(self.hold.tokens, self.hold.usd)
        if not need.within(held):
            grown = self.hold.grown(max(need.tokens, held.tokens), max(need.usd, held.usd))
            try:
                answer = await self.store.hold(self.usage_key, self.holds_key, grown, self.limits, self.ttl_s, KEEP_S,
                                               replaces=self.hold.member)
            except StoreUnavailable:
                return self.store_down == "open"  # open: run, counted nowhere; closed: not without a hold
            if answer.verdict != "held":
                return False
            self.hold = grown
        self.committed = need
        return True


def _left(limit: float | None, spent: float, held: float) -> float | None:
    return None if limit is None else max(0.0, limit - spent - held)


@dataclasses.dataclass
class Ledger:
    store: Store
    quotas: QuotaConfig
    timeout_s: float = 600.0
    """The service's ``request_timeout_s``: a hold expires this plus ``HOLD_MARGIN_S`` after it was made."""
    retrying: set[asyncio.Task] = dataclasses.field(default_factory=set)
    """Usage writes the store refused, being tried again."""

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
        held_tokens, held_usd = await self.store.held(f"holds:{key_id}:{utc_day(now)}")
        limits = self.limits(key_id)
        tokens = int(used.get("prompt_tokens", 0) + used.get("completion_tokens", 0))
        cost = used.get(USAGE_USD, 0.0)
        left_tokens = _left(limits.tokens_per_day, tokens, held_tokens)
        return KeyUsage(
            key_id=key_id, day=utc_day(now), requests=int(used.get("requests", 0)),
            prompt_tokens=int(used.get("prompt_tokens", 0)), completion_tokens=int(used.get("completion_tokens", 0)),
            cost_usd=cost, reserved_tokens=int(held_tokens), reserved_usd=held_usd,
            tokens_per_day=limits.tokens_per_day, usd_per_day=limits.usd_per_day,
            remaining_tokens=None if left_tokens is None else int(left_tokens),
            remaining_usd=_left(limits.usd_per_day, cost, held_usd), resets_in_s=resets_in_s(now),
        )

    async def admit(self, caller: Caller, request: QueryRequest, most: Most
                    ) -> tuple[QueryRequest, Reservation | None]:
        """The request as it may run for this key, with its reservation: held now, after a wait for requests
        running now to settle, or refused (429). A key without limits reserves nothing. Its most is computed
        once; with ``fit`` again at each look, since the USD left, and so the plan, changes as others settle."""
        limits = self.limits(caller.key_id)
        if limits.tokens_per_day is None and limits.usd_per_day is None:
            return request, None
        deadline, pause, planned = time.monotonic() + self.quotas.wait_s, POLL_S[0], None
        while True:
            try:
                if planned is None or self.quotas.over_budget == "fit":
                    planned = await self._plan(caller.key_id, limits, request, most)
                answer = await self._hold(caller.key_id, limits, planned[1])
            except StoreUnavailable as exc:
                self._unreadable(exc)
                return request, None
            if isinstance(answer, Reservation):
                return dataclasses.replace(planned[0], allowance=answer), answer
            if answer.verdict == "never" or time.monotonic() >= deadline:
                raise self._refusal(caller.key_id, limits, planned[1], answer)
            await asyncio.sleep(pause)
            pause = min(POLL_S[1], pause * 2)

    async def check(self, caller: Caller, request: QueryRequest, most: Most) -> None:
        """A job's admission: 429 now if it could not fit what is left today even with nothing held; it reserves
        when it runs."""
        limits = self.limits(caller.key_id)
        if limits.tokens_per_day is None and limits.usd_per_day is None:
            return
        try:
            used = await self.usage(caller.key_id)
        except StoreUnavailable as exc:
            self._unreadable(exc)
            return
        spend = await most(request, self.quotas.over_budget == "fit")
        spent = (float(used.prompt_tokens + used.completion_tokens), used.cost_usd)
        answer = HoldAnswer(verdict_of(spent, (0.0, 0.0), (spend.tokens, spend.usd),
                                       (limits.tokens_per_day, limits.usd_per_day)), *spent, 0.0, 0.0)
        if answer.verdict == "never":
            raise self._refusal(caller.key_id, limits, spend, answer)

    def _unreadable(self, exc: StoreUnavailable) -> None:
        """The store cannot be read: ``store_down: closed`` refuses (503); ``open`` lets the caller admit."""
        if self.quotas.store_down == "closed":
            raise Unavailable(f"budgets cannot be checked, the store is unavailable: {exc}") from None

    async def _plan(self, key_id: str, limits: KeyLimits, request: QueryRequest, most: Most
                    ) -> tuple[QueryRequest, Spend]:
        """The request as it would run (with ``fit``, its budget shrunk to the USD left), and its most."""
        if self.quotas.over_budget == "fit" and limits.usd_per_day is not None:
            left = (await self.usage(key_id)).remaining_usd
            cap = left if request.max_cost_usd is None else min(request.max_cost_usd, left)
            request = dataclasses.replace(request, max_cost_usd=cap)
        return request, await most(request, self.quotas.over_budget == "fit")

    async def _hold(self, key_id: str, limits: KeyLimits, spend: Spend) -> Reservation | HoldAnswer:
        """One try at holding ``spend`` on the key's budget: the reservation, or why not."""
        day = utc_day(time.time())
        usage_key, holds_key = f"usage:{key_id}:{day}", f"holds:{key_id}:{day}"
        hold, bounds = Hold.of(uuid.uuid4().hex, spend.tokens, spend.usd), (limits.tokens_per_day, limits.usd_per_day)
        ttl = self.timeout_s + HOLD_MARGIN_S
        answer = await self.store.hold(usage_key, holds_key, hold, bounds, ttl, KEEP_S)
        if answer.verdict != "held":
            return answer
        return Reservation(self.store, usage_key, holds_key, hold, bounds, ttl, self.quotas.store_down)

    def _refusal(self, key_id: str, limits: KeyLimits, spend: Spend, answer: HoldAnswer) -> QuotaExceeded:
        now = time.time()
        left_tokens = _left(limits.tokens_per_day, answer.spent_tokens, answer.held_tokens)
        left_usd = _left(limits.usd_per_day, answer.spent_usd, answer.held_usd)
        spent = [f"{answer.spent_tokens:g} of {limits.tokens_per_day} tokens" if limits.tokens_per_day else "",
                 f"${answer.spent_usd:.6f} of ${limits.usd_per_day:g}" if limits.usd_per_day else ""]
        most = [f"{spend.tokens:g} tokens" if limits.tokens_per_day else "",
                f"${spend.usd:.6f}" if limits.usd_per_day else ""]
        why = ("it does not fit what is left" if answer.verdict == "never" else
               f"requests running now reserve the rest, and did not settle within {self.quotas.wait_s:g} s "
               "(server.budgets.wait_s)")
        return QuotaExceeded(
            f"key {key_id} has used {' and '.join(s for s in spent if s)} today (UTC {utc_day(now)}); this request "
            f"may use up to {' and '.join(s for s in most if s)}, and {why}; the budget renews in "
            f"{resets_in_s(now)} s",
            {"tokens": None if left_tokens is None else int(left_tokens), "usd": left_usd}, resets_in_s(now))

    async def record(self, caller: Caller, response: QueryResponse, reservation: Reservation | None = None) -> None:
        """Count one answered request (a cache hit generated nothing and costs nothing), and drop its hold."""
        fields = {"requests": 1.0}
        if not response.cached:
            fields.update(prompt_tokens=float(response.total_usage.prompt_tokens),
                          completion_tokens=float(response.total_usage.completion_tokens),
                          cost_usd=response.cost_usd)
        if reservation is None:
            key = f"usage:{caller.key_id}:{utc_day(time.time())}"
            await self._until_written(lambda: self.store.hincr(key, fields, KEEP_S))
        else:
            await self._until_written(lambda: self.store.settle(
                reservation.usage_key, reservation.holds_key, reservation.hold.member, fields, KEEP_S))

    async def release(self, reservation: Reservation | None) -> None:
        """Drop the hold of a request that ended without an answer: it spent nothing that is counted."""
        if reservation is not None:
            await self._until_written(lambda: self.store.settle(
                reservation.usage_key, reservation.holds_key, reservation.hold.member, {}, KEEP_S))

    async def _until_written(self, write: Callable[[], Awaitable[None]]) -> None:
        """Write now; if the store refuses, raise (the caller reports the store down) and keep trying in the
        background (``store.retry_while_down``), so that an answer served while redis restarts is still counted
        once."""
        try:
            await write()
        except StoreUnavailable:
            task = asyncio.ensure_future(_quietly(retry_while_down(write)))
            self.retrying.add(task)
            task.add_done_callback(self.retrying.discard)
            raise


async def _quietly(work: Awaitable[None]) -> None:
    """A background retry that gave up has nothing to raise to."""
    with contextlib.suppress(StoreUnavailable):
        await work
