"""``concilium bench budget``: many concurrent requests of one key against a budget that fits a few of them.

It starts ``concilium serve`` on loopback with the given experts (the bundled ones by default), the response
cache off (a cached answer costs nothing, and would hide the race), an admin key, an unlimited probe key and a
crowd key. The probe asks the question once, to learn what one request spends. Then lone requests alternate between the
probe key (no budget) and the crowd key (a budget far from spent): the median latency of each is what a
reservation costs. The crowd key's daily budget is then set to what it has spent plus ``fits`` times the probe (in tokens, or in USD with ``--usd``, with the given ``over_budget``) and applied
by ``POST /v1/admin/reload``.
Then ``requests`` requests of the crowd key go out at once, and ``/v1/usage`` says what was spent.

Every request ends in one outcome: served (200), refused (429 ``budget_exceeded``) or other (anything else,
which fails the run). The run fails if the key spent past its budget, or a reservation was left held.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from dataclasses import dataclass, field

import httpx
import yaml

from orchestrator.api.security import digest, key_id
from orchestrator.bench.load import StartedServer


@dataclass
class BudgetReport:
    sent: int
    served: int
    refused: int
    other: list[str]
    unit: str
    probe: float
    """What the probe request spent (tokens, or USD)."""
    budget: float
    spent: float
    reserved: float
    wall_s: float
    served_spent: float
    """The sum of the served answers' own usage: what the key's usage must equal."""
    degraded: int
    """Served answers with a degraded note (with ``over_budget: fit``, a synthesis the budget did not allow)."""
    free_ms: float
    """Median latency of a lone request of a key without a budget."""
    metered_ms: float
    """Median latency of a lone request of a key with a budget (its most counted, held, then settled)."""
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def overshoot(self) -> float:
        return max(0.0, self.spent - self.budget)

    @property
    def ok(self) -> bool:
        return (not self.other and self.overshoot == 0 and self.reserved == 0 and self.served + self.refused == self.sent
                and abs(self.spent - self.served_spent) <= 1e-9 * max(1.0, self.spent))


def _cost(answer: dict, unit: str) -> float:
    return float(answer["total_usage"]["total_tokens"] if unit == "tokens" else answer["cost_usd"])


class BudgetBench:
    """The started server and its three keys."""

    def __init__(self, config: dict) -> None:
        self.admin, self.probe, self.crowd = (secrets.token_hex(16) for _ in range(3))
        self.config = config
        config["server"] = {**config.get("server", {}), "cache_ttl_s": 0,
                            "api_key_sha256": [digest(self.probe), digest(self.crowd)],
                            "admin_key_sha256": [digest(self.admin)]}
        self.server = StartedServer(config)

    def set_budget(self, unit: str, amount: float, over_budget: str) -> None:
        limit = {"tokens_per_day": max(1, int(amount))} if unit == "tokens" else {"usd_per_day": amount}
        self.config["server"]["budgets"] = {"keys": {key_id(self.crowd): limit}, "over_budget": over_budget}
        (self.server.folder / "config.yaml").write_text(yaml.safe_dump(self.config))
        r = httpx.post(f"{self.server.url}/v1/admin/reload", headers=_bearer(self.admin), timeout=600)
        r.raise_for_status()

    def stop(self) -> None:
        self.server.stop()


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def run_budget(bench: BudgetBench, body: dict, requests: int, fits: int, unit: str, over_budget: str,
                     timeout_s: float, repeats: int = 10) -> BudgetReport:
    url = bench.server.url
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s,
                                 limits=httpx.Limits(max_connections=requests)) as http:
        probe = await http.post("/v1/query", json=body, headers=_bearer(bench.probe))
        probe.raise_for_status()
        one = _cost(probe.json(), unit)
        await asyncio.to_thread(bench.set_budget, unit, UNSPENT, over_budget)
        free_ms, metered_ms = await _latencies(http, bench, body, repeats)
        before = _spent(await _usage(http, bench.crowd), unit)
        await asyncio.to_thread(bench.set_budget, unit, before + fits * one, over_budget)
        usage = await _usage(http, bench.crowd)
        budget = float(usage["tokens_per_day"] if unit == "tokens" else usage["usd_per_day"]) - before
        started = time.perf_counter()
        responses = await asyncio.gather(*(http.post("/v1/query", json=body, headers=_bearer(bench.crowd))
                                           for _ in range(requests)), return_exceptions=True)
        wall = time.perf_counter() - started
        after = await _usage(http, bench.crowd)
    served = [r.json() for r in responses if isinstance(r, httpx.Response) and r.status_code == 200]
    refused = [r for r in responses if isinstance(r, httpx.Response) and r.status_code == 429
               and r.json()["error"]["type"] == "budget_exceeded"]
    other = [repr(r) if not isinstance(r, httpx.Response) else f"{r.status_code}: {r.text[:200]}"
             for r in responses if not (isinstance(r, httpx.Response) and r.status_code in (200, 429))]
    statuses: dict[int, int] = {}
    for r in responses:
        if isinstance(r, httpx.Response):
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    spent = _spent(after, unit) - before
    reserved = float(after["reserved_tokens"] if unit == "tokens" else after["reserved_usd"])
    return BudgetReport(requests, len(served), len(refused), other, unit, one, budget, spent, reserved, wall,
                        sum(_cost(a, unit) for a in served), sum(bool(a.get("degraded")) for a in served), free_ms, metered_ms,
                        statuses)


UNSPENT = 1e9
"""A budget the latency phase cannot spend: every request is held and settled, none refused."""


async def _usage(http: httpx.AsyncClient, key: str) -> dict:
    r = await http.get("/v1/usage", headers=_bearer(key))
    r.raise_for_status()
    return r.json()


def _spent(usage: dict, unit: str) -> float:
    return float(usage["prompt_tokens"] + usage["completion_tokens"] if unit == "tokens" else usage["cost_usd"])


async def _latencies(http: httpx.AsyncClient, bench: BudgetBench, body: dict, repeats: int) -> tuple[float, float]:
    """Median ms of lone requests without and with a budget, alternated so that drift hits both alike."""
    times: dict[str, list[float]] = {bench.probe: [], bench.crowd: []}
    for _ in range(repeats):
        for key in times:
            t0 = time.perf_counter()
            (await http.post("/v1/query", json=body, headers=_bearer(key))).raise_for_status()
            times[key].append((time.perf_counter() - t0) * 1000)
    return statistics.median(times[bench.probe]), statistics.median(times[bench.crowd])
