"""Budgets that cannot be overshot (docs/reliability.md, "Reservations"), against live servers on 127.0.0.1 and a
real redis-server: concurrent requests of one key on two replicas, what ``refuse`` and ``fit`` reserve, and the
expiry of a lost replica's holds.

The experts are simulated (real Ray actors that sleep like a model decodes, with configured prices): a simulated
prompt token is a word and a simulated expert writes every token it may, so what a request spends is known
exactly; these tests are about the accounting, not a model's text.
"""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from orchestrator.api.security import digest, key_id
from tests.live import RedisServer, ThreadServer, write_config
from tests.test_tenants import ADMIN, WAVE_TOKENS, _bearer, _sim, _usage, _wave

CROWD, PLANNER = (f"{kind}-{uuid.uuid4().hex[:10]}" for kind in ("crowd", "planner"))
CROWD_TOKENS = 10 * WAVE_TOKENS
"""CROWD's budget: ten requests of ``_wave``."""


@pytest.fixture(scope="module")
def crowded(ray_cluster, tmp_path_factory):
    """Two replicas sharing one redis, no rate limit (``over_budget: refuse``, the default): CROWD's budget of ten
    requests, and PLANNER's, which fits two experts' answers but not a synthesis of them."""
    tmp = tmp_path_factory.mktemp("crowded")
    redis = RedisServer(tmp)
    servers: list[ThreadServer] = []
    try:
        for replica in ("a", "b"):
            servers.append(ThreadServer(write_config(tmp / f"{replica}.yaml", {
                "ray": {"namespace": f"crowd-{replica}-{uuid.uuid4().hex[:6]}"},
                "routing": {"aggregation": "best", "max_wait_ms": 5},
                "server": {"redis_url": redis.url, "api_key_sha256": [digest(CROWD), digest(PLANNER)],
                           "admin_key_sha256": [digest(ADMIN)],
                           "budgets": {"keys": {key_id(CROWD): {"tokens_per_day": CROWD_TOKENS},
                                                key_id(PLANNER): {"tokens_per_day": 60}}}},
                "experts": [_sim("sim-fast", 0.001, 0.002), _sim("sim-b", 0.001),
                            {**_sim("sim-priced", 0.001), "prices": {"input": 2000.0, "output": 4000.0}}],
            })))
        yield servers
    finally:
        for s in servers:
            s.stop()
        redis.stop()


def test_64_concurrent_requests_on_two_replicas_never_spend_past_a_budget_that_fits_10(crowded):
    """The issue's case: every request reserves its most before it runs, in one redis script shared by both
    replicas, so the key's spending never passes its limit; requests that would fit once others settle wait for
    them, and the rest get 429 budget_exceeded. Nothing is lost: each answer is counted once."""
    a, b = crowded
    responses = asyncio.run(_wave([a.url, b.url] * 32, CROWD))
    served = [r.json() for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert all(r.status_code == 429 and r.json()["error"]["type"] == "budget_exceeded" for r in refused)
    used = _usage(a.url, ADMIN, of=key_id(CROWD))
    spent = used["prompt_tokens"] + used["completion_tokens"]
    assert spent <= CROWD_TOKENS  # no overshoot
    assert len(served) >= 9 and used["requests"] == len(served)  # none lost, none counted twice
    assert spent == sum(x["total_usage"]["total_tokens"] for x in served)
    assert used["reserved_tokens"] == 0 and used["remaining_tokens"] == CROWD_TOKENS - spent  # every hold settled


def test_refuse_reserves_all_a_plan_can_spend_so_an_admitted_request_is_served_as_asked(crowded):
    """Two simulated answers cost 2 x (3 + 8) tokens; a synthesis of them could cost over a hundred more, though
    the experts' agreement may skip it. With ``refuse`` the whole plan is reserved: the synthesising request is
    refused at once (it spends nothing), and the voting one fits."""
    a, _ = crowded
    body = {"query": "Pick a letter.", "max_tokens": 8, "experts": ["sim-fast", "sim-b"]}
    synthesis = httpx.post(f"{a.url}/v1/query", json={**body, "aggregation": "synthesize"}, headers=_bearer(PLANNER),
                           timeout=60)
    assert synthesis.status_code == 429 and "does not fit what is left" in synthesis.json()["error"]["message"]
    assert _usage(a.url, PLANNER)["requests"] == 0
    vote = httpx.post(f"{a.url}/v1/query", json={**body, "aggregation": "vote"}, headers=_bearer(PLANNER), timeout=60)
    assert vote.status_code == 200 and not vote.json()["degraded"], vote.text
    used = _usage(a.url, PLANNER)
    assert used["prompt_tokens"] + used["completion_tokens"] == vote.json()["total_usage"]["total_tokens"] == 22


def test_prices_per_1m_input_and_output_tokens_make_the_cost(crowded):
    """An expert priced as prices.json writes it (USD per 1M input and output tokens): the answer's cost and the
    key's usage both price prompt and output tokens apart."""
    a, _ = crowded
    r = httpx.post(f"{a.url}/v1/query", json={"query": "Pick a letter.", "max_tokens": 8, "experts": ["sim-priced"]},
                   headers=_bearer(PLANNER), timeout=60).json()
    usage = r["total_usage"]
    assert r["cost_usd"] == pytest.approx(usage["prompt_tokens"] * 0.002 + usage["completion_tokens"] * 0.004)
    assert _usage(a.url, PLANNER)["cost_usd"] >= r["cost_usd"] > 0


@pytest.fixture(scope="module")
def fitted(ray_cluster, tmp_path_factory):
    """One server, no keys, ``over_budget: fit`` and a budget of 200 tokens; two simulated experts that disagree
    on "Pick a letter." and on "Choose one." (their letters are hashes of their names and the prompt)."""
    tmp = tmp_path_factory.mktemp("fitted")
    server = ThreadServer(write_config(tmp / "fit.yaml", {
        "ray": {"namespace": f"fitted-{uuid.uuid4().hex[:6]}"},
        "routing": {"aggregation": "synthesize", "max_wait_ms": 5},
        "server": {"budgets": {"default": {"tokens_per_day": 200}, "over_budget": "fit"}},
        "experts": [_sim("sim-a", 0.001), _sim("sim-b", 0.001)],
    }))
    try:
        yield server
    finally:
        server.stop()


def test_fit_reserves_the_first_round_and_runs_a_synthesis_only_while_the_budget_allows(fitted):
    """The first request's synthesis grows its hold (22 + 116 tokens of 200) and runs; the second's first round
    fits what is left, its synthesis does not, so the vote answers and the answer says why."""
    ask = {"max_tokens": 8}
    first = httpx.post(f"{fitted.url}/v1/query", json={**ask, "query": "Pick a letter."}, timeout=60).json()
    assert first["aggregator"] is not None and not first["degraded"], first
    second = httpx.post(f"{fitted.url}/v1/query", json={**ask, "query": "Choose one."}, timeout=60).json()
    assert second["aggregator"] is None and second["aggregation_skipped"].startswith("vote")
    assert any("was not asked" in note and "budget allows" in note for note in second["degraded"]), second
    used = httpx.get(f"{fitted.url}/v1/usage", timeout=30).json()
    spent = used["prompt_tokens"] + used["completion_tokens"]
    assert spent == first["total_usage"]["total_tokens"] + second["total_usage"]["total_tokens"] <= 200
    assert used["reserved_tokens"] == 0


def test_a_lost_replicas_holds_expire_and_free_the_budget(tmp_path):
    """A replica that dies holding a reservation never settles it: the hold expires (redis's own clock, in the
    same script that checks the next hold), and the budget it held is free again."""
    from orchestrator.api.holds import Hold
    from orchestrator.api.store import RedisStore

    redis = RedisServer(tmp_path)
    store = RedisStore(redis.url)

    async def run() -> list:
        limits = (100, None)
        first = await store.hold("usage:k:d", "holds:k:d", Hold.of("lost", 80, 0.0), limits, ttl_s=0.5, keep_s=60)
        blocked = await store.hold("usage:k:d", "holds:k:d", Hold.of("next", 30, 0.0), limits, ttl_s=60, keep_s=60)
        held = await store.held("holds:k:d")
        await asyncio.sleep(0.8)
        after = await store.hold("usage:k:d", "holds:k:d", Hold.of("next", 30, 0.0), limits, ttl_s=60, keep_s=60)
        outcome = [first.verdict, blocked.verdict, held, after.verdict, await store.held("holds:k:d")]
        await store.close()
        return outcome

    try:
        assert asyncio.run(run()) == ["held", "wait", (80.0, 0.0), "held", (30.0, 0.0)]
    finally:
        redis.stop()
