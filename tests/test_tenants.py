"""Keys and tenants (docs/reliability.md, "Keys" and "Tenants"), against live servers on 127.0.0.1 and a real
redis-server: the admin scope, who may read what, per-key usage and budgets shared by replicas, what happens
to budgets while redis is down, and the endpoints that must leak nothing (/metrics, /docs).

The experts are simulated (real Ray actors that sleep like a model decodes, with configured prices), because
these tests are about the API's scopes and accounting, not a model's text. /docs is rendered by a real
headless Chromium that can resolve no host but 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from orchestrator.api.security import KeyRing, digest, key_id
from tests.live import RedisServer, ThreadServer, free_port, headless_chrome, write_config

USER, OTHER, ADMIN, LIMITED, SPENDER = (f"{kind}-{uuid.uuid4().hex[:10]}"
                                        for kind in ("user", "other", "admin", "limited", "spender"))
RATE = 40
"""Requests per key per minute in ``secured``; the rate-limit test sends one more than this."""
SPENDER_TOKENS = 40
WAVE_TOKENS = 3 + 16
"""What one request of ``_wave`` spends: a simulated prompt token is a word ("Count to ten."), and a simulated
expert writes every token it may (16)."""


def _sim(name: str, step_s: float, usd_per_1k: float = 0.0) -> dict:
    return {"name": name, "backend": "simulated", "memory_gb": 0.1, "load_s": 0.0, "step_s": step_s,
            "cost_per_1k_tokens": usd_per_1k}


def _bearer(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def _metric(url: str, name: str, key: str | None = None) -> float:
    text = httpx.get(f"{url}/metrics", headers=_bearer(key), timeout=30).text
    families = {m.name: m for m in text_string_to_metric_families(text)}
    return sum(s.value for s in families[name].samples if not s.name.endswith("_created"))


def _ask(url: str, key: str | None, **body: object) -> httpx.Response:
    body = {"query": "Hi there?", "max_tokens": 2, "experts": ["sim-fast"], **body}
    return httpx.post(f"{url}/v1/query", json=body, headers=_bearer(key), timeout=60)


@pytest.fixture(scope="module")
def secured(ray_cluster, tmp_path_factory):
    """Two replicas sharing one redis: user, admin and limited keys, a token budget for SPENDER, a rate limit
    of RATE a minute per key, CORS for one origin and a 1 s request time limit."""
    tmp = tmp_path_factory.mktemp("secured")
    redis = RedisServer(tmp)

    def config(replica: str) -> Path:  # each replica has its own experts; the two share redis
        return write_config(tmp / f"{replica}.yaml", {
            "ray": {"namespace": f"sec-{replica}-{uuid.uuid4().hex[:6]}"},
            "routing": {"aggregation": "best", "max_wait_ms": 5},
            "server": {"redis_url": redis.url,
                       "api_key_sha256": [digest(k) for k in (USER, OTHER, LIMITED, SPENDER)],
                       "admin_key_sha256": [digest(ADMIN)], "rate_limit_per_minute": RATE,
                       "cors_origins": ["https://app.example"], "request_timeout_s": 1,
                       "budgets": {"keys": {key_id(SPENDER): {"tokens_per_day": SPENDER_TOKENS}}}},
            "experts": [_sim("sim-fast", 0.001, 0.002), _sim("sim-slow", 0.5)],
        })

    servers: list[ThreadServer] = []
    try:
        servers += [ThreadServer(config("a"))]
        servers += [ThreadServer(config("b"))]
        yield servers[0], servers[1]
    finally:
        for s in servers:
            s.stop()
        redis.stop()


# -- keys -----------------------------------------------------------------------------------------------

def test_admin_actions_and_metrics_need_the_admin_scope(secured):
    s, _ = secured
    assert httpx.post(f"{s.url}/v1/admin/reload", timeout=30).status_code == 401
    as_user = httpx.post(f"{s.url}/v1/admin/reload", headers=_bearer(USER), timeout=30)
    assert as_user.status_code == 403 and "needs an admin key" in as_user.json()["error"]["message"]
    answer = _ask(s.url, ADMIN)
    assert answer.status_code == 200, answer.text  # an admin key is also a user key
    reload = httpx.post(f"{s.url}/v1/admin/reload", headers=_bearer(ADMIN), timeout=60)
    assert reload.status_code == 200 and reload.json()["added"] == []
    assert httpx.get(f"{s.url}/metrics", timeout=30).status_code == 401
    assert httpx.get(f"{s.url}/metrics", headers=_bearer(USER), timeout=30).status_code == 403
    assert _metric(s.url, "concilium_requests", ADMIN) >= 1


def test_the_rate_limit_is_per_key_and_shared_by_replicas(secured):
    first, second = secured
    if time.time() % 60 > 45:  # the limit counts per clock minute: start well inside one
        time.sleep(61 - time.time() % 60)
    statuses = [httpx.get(f"{s.url}/v1/models", headers=_bearer(LIMITED), timeout=30).status_code
                for _ in range((RATE + 1) // 2 + 1) for s in (first, second)][:RATE + 1]
    assert statuses == [200] * RATE + [429]
    assert httpx.get(f"{first.url}/v1/models", headers=_bearer(USER), timeout=30).status_code == 200  # own count


def test_request_time_limit_answers_504(secured):
    s, _ = secured
    r = _ask(s.url, USER, query="Slow?", max_tokens=8, experts=["sim-slow"])
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
    assert "1 s (server.request_timeout_s)" in r.json()["error"]["message"]
    assert _metric(s.url, "concilium_timeouts", ADMIN) == 1
    deadline = time.monotonic() + 30  # the slow call keeps its window for 4 s; then the service answers again
    while (after := _ask(s.url, USER)).status_code == 504 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert after.status_code == 200, after.text


def test_cors_is_off_by_default_and_on_only_for_configured_origins(secured, lonely):
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST"}
    default = httpx.options(f"{lonely[0].url}/v1/query", headers=preflight)
    assert "access-control-allow-origin" not in default.headers
    s, _ = secured
    allowed = httpx.options(f"{s.url}/v1/query", headers=preflight)
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(f"{s.url}/v1/query", headers={**preflight, "origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_keys_are_kept_hashed_and_compared_without_stopping_early(monkeypatch):
    ring = KeyRing([digest(k) for k in ("a-key", "b-key", "c-key")])
    assert all("key" not in d for d in ring.digests)
    calls: list[str] = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda x, y: calls.append(y) or real(x, y))
    assert ring.accepts("a-key") and not ring.accepts("z-key")
    assert len(calls) == 6  # every digest is compared, even after the first one matched


# -- ownership ------------------------------------------------------------------------------------------

MATRIX = ((USER, 200), (OTHER, 404), (ADMIN, 200), (None, 401))
"""Who reads the owner's (USER's) job, answer and feedback, and the status each gets."""


def _not_found_like_unknown(r: httpx.Response, url: str, real_id: str) -> None:
    """Another key's record answers exactly what an unknown id answers: nothing tells it exists."""
    unknown = "x" + real_id[1:]
    probe = (httpx.get(f"{url}/v1/jobs/{unknown}", headers=_bearer(OTHER), timeout=30) if real_id.startswith("job-")
             else httpx.get(f"{url}/v1/answers/{unknown}", headers=_bearer(OTHER), timeout=30))
    assert probe.status_code == 404
    assert r.json()["error"] == {**probe.json()["error"],
                                 "message": probe.json()["error"]["message"].replace(unknown, real_id)}


def test_each_key_reads_only_its_own_jobs_answers_and_feedback(secured):
    a, b = secured
    answer = _ask(a.url, USER).json()
    assert "id" in answer, answer
    job = httpx.post(f"{a.url}/v1/jobs", json={"query": "A job?", "max_tokens": 2, "experts": ["sim-fast"]},
                     headers=_bearer(USER), timeout=30).json()
    deadline = time.monotonic() + 60
    while (done := httpx.get(f"{b.url}/v1/jobs/{job['id']}", headers=_bearer(USER), timeout=30).json())["status"] \
            not in ("done", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert done["status"] == "done", done
    for key, status in MATRIX:
        for url in (a.url, b.url):  # the records live in redis: either replica enforces the same owner
            got_job = httpx.get(f"{url}/v1/jobs/{job['id']}", headers=_bearer(key), timeout=30)
            got_answer = httpx.get(f"{url}/v1/answers/{answer['id']}", headers=_bearer(key), timeout=30)
            job_answer = httpx.get(f"{url}/v1/answers/{done['result']['id']}", headers=_bearer(key), timeout=30)
            assert (got_job.status_code, got_answer.status_code, job_answer.status_code) == (status,) * 3, key
        rated = httpx.post(f"{a.url}/v1/feedback", json={"answer_id": answer["id"], "correct": True},
                           headers=_bearer(key), timeout=30)
        assert rated.status_code == status, (key, rated.text)
        if status == 200:
            assert got_answer.json()["answer"] == answer["answer"] and got_job.json()["id"] == job["id"]
            assert rated.json()["experts"] == ["sim-fast"]
        if status == 404:
            _not_found_like_unknown(got_job, a.url, job["id"])
            _not_found_like_unknown(got_answer, a.url, answer["id"])
            _not_found_like_unknown(rated, a.url, answer["id"])
    assert _metric(a.url, "concilium_feedback", ADMIN) == 2  # the owner's and the admin's, not the other key's


# -- usage and budgets ----------------------------------------------------------------------------------

def _usage(url: str, key: str, of: str | None = None) -> dict:
    r = httpx.get(f"{url}/v1/usage", params={"key_id": of} if of else None, headers=_bearer(key), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_usage_adds_up_across_two_replicas_sharing_redis(secured):
    a, b = secured
    before = _usage(a.url, OTHER)
    asked = [(a.url, "Hi there?"), (b.url, "Hello?"), (b.url, "Hi there?")]  # the last one is a cache hit
    answers = [_ask(url, OTHER, query=q, max_tokens=3).json() for url, q in asked]
    assert [x["cached"] for x in answers] == [False, False, True]
    generated = answers[:2]  # a cache hit is a request, and generates (and costs) nothing
    on_a, on_b = _usage(a.url, OTHER), _usage(b.url, OTHER)
    assert on_a == {**on_b, "resets_in_s": on_a["resets_in_s"]}
    assert on_a["key_id"] == key_id(OTHER) and on_a["requests"] - before["requests"] == 3
    assert on_a["completion_tokens"] - before["completion_tokens"] == sum(x["total_usage"]["completion_tokens"]
                                                                        for x in generated)
    assert on_a["prompt_tokens"] - before["prompt_tokens"] == sum(x["total_usage"]["prompt_tokens"] for x in generated)
    assert on_a["cost_usd"] - before["cost_usd"] == pytest.approx(sum(x["cost_usd"] for x in generated))
    assert on_a["cost_usd"] > 0 and on_a["tokens_per_day"] is None and on_a["remaining_tokens"] is None
    assert _usage(a.url, ADMIN, of=key_id(OTHER))["requests"] == on_a["requests"]  # an admin reads any key
    peek = httpx.get(f"{a.url}/v1/usage", params={"key_id": key_id(USER)}, headers=_bearer(OTHER), timeout=30)
    assert peek.status_code == 403 and "needs an admin key" in peek.json()["error"]["message"]


async def _wave(urls: list[str], key: str) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=len(urls))) as http:
        return await asyncio.gather(*(
            http.post(f"{url}/v1/query", json={"query": "Count to ten.", "max_tokens": 16, "experts": ["sim-fast"]},
                      headers=_bearer(key)) for url in urls))


def test_a_spent_budget_refuses_the_next_requests_and_loses_none_admitted(secured):
    a, b = secured
    first = asyncio.run(_wave([a.url, b.url, a.url], SPENDER))  # two fit, the third never can
    answered = [r.json() for r in first if r.status_code == 200]
    assert len(answered) == SPENDER_TOKENS // WAVE_TOKENS
    assert all(r.json()["error"]["type"] == "budget_exceeded" for r in first if r.status_code != 200)
    assert all(x["answer"] for x in answered)  # every admitted request was served in full
    used = _usage(b.url, ADMIN, of=key_id(SPENDER))
    assert used["requests"] == len(answered)  # and counted once: nothing lost, nothing twice
    spent = used["prompt_tokens"] + used["completion_tokens"]
    assert spent == sum(x["total_usage"]["total_tokens"] for x in answered) <= SPENDER_TOKENS
    assert used["tokens_per_day"] == SPENDER_TOKENS and used["remaining_tokens"] == SPENDER_TOKENS - spent

    refused = asyncio.run(_wave([b.url, a.url], SPENDER))
    streamed = httpx.post(f"{a.url}/v1/query", json={"query": "Again?", "stream": True}, headers=_bearer(SPENDER),
                          timeout=30)
    job = httpx.post(f"{a.url}/v1/jobs", json={"query": "Later?"}, headers=_bearer(SPENDER), timeout=30)
    for r in [*refused, streamed, job]:
        assert r.status_code == 429 and r.headers["content-type"] == "application/json", r.text
        error = r.json()["error"]
        assert error["type"] == "budget_exceeded" and error["remaining"] == {"tokens": SPENDER_TOKENS - spent,
                                                                             "usd": None}
        assert f"{spent} of {SPENDER_TOKENS} tokens today" in error["message"] and "renews in" in error["message"]
        assert "does not fit what is left" in error["message"]
        assert 0 < int(r.headers["retry-after"]) <= 86_400
        assert abs(int(r.headers["retry-after"]) - (86_400 - int(time.time()) % 86_400)) <= 5  # UTC midnight
    assert _usage(a.url, ADMIN, of=key_id(SPENDER))["requests"] == len(answered)  # refusals cost nothing
    assert _ask(a.url, OTHER).status_code == 200  # other keys keep their own budgets


# -- budgets without keys, a store outage, and endpoints that leak nothing -------------------------------

@pytest.fixture(scope="module")
def lonely(ray_cluster, tmp_path_factory):
    """No keys (one anonymous tenant) with a USD budget; two servers on one redis-server, in separate
    databases: ``fit`` (over_budget fit, store_down open, /metrics on its own port) and ``refuse`` (the
    defaults, store_down closed)."""
    tmp = tmp_path_factory.mktemp("lonely")
    redis = RedisServer(tmp)
    metrics_port = free_port()

    def config(name: str, db: int, server: dict) -> dict:
        return {"ray": {"namespace": f"lonely-{name}-{uuid.uuid4().hex[:6]}"},
                "routing": {"aggregation": "vote", "max_wait_ms": 5},
                "server": {"redis_url": redis.url.rsplit("/", 1)[0] + f"/{db}",
                           "budgets": {"default": {"usd_per_day": 0.005}, **server.pop("budgets", {})}, **server},
                "experts": [_sim("sim-cheap", 0.001, 0.001), _sim("sim-dear", 0.001, 1.0)]}

    servers: list[ThreadServer] = []
    try:
        servers += [ThreadServer(config("fit", 0, {"metrics_port": metrics_port,
                                                   "budgets": {"over_budget": "fit", "store_down": "open"}}))]
        servers += [ThreadServer(config("refuse", 1, {"budgets": {"store_down": "closed"}}))]
        yield servers[0], servers[1], redis, metrics_port
    finally:
        for s in servers:
            s.stop()
        redis.stop()


def test_fit_drops_costly_recruits_where_refuse_refuses_what_cannot_fit(lonely):
    fit, refuse, _, _ = lonely
    body = {"query": "Name a colour.", "k": 2, "max_tokens": 8}
    fitted = httpx.post(f"{fit.url}/v1/query", json=body, timeout=60).json()
    budget = fitted["routing"]["trace"]["budget"]
    assert budget["dropped"] == ["sim-dear"] and budget["usd"] == pytest.approx(0.005)
    assert [x["expert"] for x in fitted["answers"]] == ["sim-cheap"]
    whole = httpx.post(f"{refuse.url}/v1/query", json=body, timeout=60)  # its most does not fit: refused at once
    assert whole.status_code == 429 and whole.json()["error"]["remaining"] == {"tokens": None, "usd": 0.005}
    cheap = httpx.post(f"{refuse.url}/v1/query", json={**body, "experts": ["sim-cheap"]}, timeout=60).json()
    usage = httpx.get(f"{refuse.url}/v1/usage", timeout=30).json()
    assert usage["key_id"] == "anonymous" and usage["cost_usd"] == pytest.approx(cheap["cost_usd"])
    assert usage["cost_usd"] <= 0.005
    assert usage["requests"] == 1 and usage["reserved_usd"] == 0.0


def test_metrics_on_their_own_loopback_port_leave_the_api_port(lonely):
    fit, refuse, _, metrics_port = lonely
    assert httpx.get(f"{fit.url}/metrics", timeout=30).status_code == 404
    scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30)
    assert scraped.status_code == 200 and "concilium_requests_total" in scraped.text
    assert httpx.get(f"{refuse.url}/metrics", timeout=30).status_code == 200  # no keys: open, as before


def test_with_redis_down_budgets_fail_open_or_closed_as_configured(lonely, tmp_path):
    fit, refuse, redis, _ = lonely
    redis.stop()
    try:
        assert httpx.post(f"{fit.url}/v1/query", json={"query": "Still there?", "max_tokens": 2},
                          timeout=60).status_code == 200  # open: admitted, and counted nowhere
        closed = httpx.post(f"{refuse.url}/v1/query", json={"query": "Still there?", "max_tokens": 2}, timeout=60)
        assert closed.status_code == 503 and "budgets cannot be checked" in closed.json()["error"]["message"]
        usage = httpx.get(f"{fit.url}/v1/usage", timeout=30)
        assert usage.status_code == 503 and usage.json()["error"]["type"] == "unavailable"
    finally:
        back = RedisServer(tmp_path, port=redis.port)  # empty: the outage also forgot today's usage
        redis.proc = back.proc
    assert httpx.post(f"{refuse.url}/v1/query", json={"query": "Back?", "max_tokens": 2}, timeout=60).status_code == 200


def test_docs_render_with_no_network(lonely):
    fit, _, _, _ = lonely
    html = httpx.get(f"{fit.url}/docs", timeout=30).text
    assert "http://" not in html and "https://" not in html  # every asset from this server
    assert httpx.get(f"{fit.url}/redoc", timeout=30).status_code == 404  # ReDoc's bundle calls a CDN: not served
    chrome = headless_chrome(offline=True)
    try:
        chrome.get(f"{fit.url}/docs")
        WebDriverWait(chrome, 60).until(lambda d: "Concilium" in d.find_element(By.CSS_SELECTOR, ".info .title").text)
        operations = chrome.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
        assert "/v1/usage" in {o.text for o in operations}
        assert [e for e in chrome.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        chrome.quit()
