"""The semantic cache (``orchestrator/api/semantic_cache.py``) through the real API: real Ray, real HTTP on
127.0.0.1, a real redis-server shared by two replicas, the real MiniLM encoder.

The expert is simulated (a real Ray actor that writes words as a model decodes): the cache, not the text, is
under test, and a simulated answer says which query it answered, so a hit is told from a fresh answer.
"""

from __future__ import annotations

import json
import time
import uuid

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.api.security import digest
from orchestrator.api.semantic_cache import guard_key
from orchestrator.api.vector_index import VectorIndex
from orchestrator.client import Client
from tests.live import RedisServer, ThreadServer

pytestmark = [pytest.mark.ray, pytest.mark.models]

ALICE, BOB, ADMIN = "sk-alice-" + "a" * 24, "sk-bob-" + "b" * 24, "sk-admin-" + "c" * 24
ASKED = "What is the capital of France?"
PARAPHRASE = "Which city is the capital of France?"
NEAR_MISS = "What is the capital of Spain?"


def config(redis_url: str, ttl_s: float = 300, **cache: object) -> dict:
    return {
        "ray": {"namespace": f"semcache-{uuid.uuid4().hex[:6]}"},
        "routing": {"aggregation": "best", "k": 1, "max_wait_ms": 2},
        "server": {"redis_url": redis_url, "cache_ttl_s": ttl_s, "api_key_sha256": [digest(ALICE), digest(BOB)],
                   "admin_key_sha256": [digest(ADMIN)]},
        "cache": {"semantic": True, **cache},
        "experts": [{"name": "sim", "backend": "simulated", "memory_gb": 0.1, "load_s": 0.0, "step_s": 0.005}],
    }


def ask(server: ThreadServer, query: str, key: str = ALICE, **extra: object) -> dict:
    r = httpx.post(f"{server.url}/v1/query", json={"query": query, "max_tokens": 4, **extra},
                   headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def replicas(ray_cluster, redis):
    """Two API replicas on one redis."""
    first, second = ThreadServer(config(redis.url)), ThreadServer(config(redis.url))
    yield first, second
    first.stop()
    second.stop()


@pytest.fixture(autouse=True)
def empty(replicas):
    with Client(replicas[0].url, api_key=ADMIN) as sdk:  # the SDK's clear, an admin's
        assert sdk.clear_cache().cleared >= 0


def test_a_paraphrase_is_served_from_the_cache_by_every_replica(replicas):
    first, second = replicas
    answered = ask(first, ASKED)
    assert answered["cached"] is False and answered["cache"] is None
    hit = ask(second, PARAPHRASE)  # the other replica: its index comes from the store's log
    assert hit["cached"] is True and hit["cache"]["hit"] == "semantic" and hit["cache"]["of"] == answered["id"]
    assert hit["answer"] == answered["answer"] and hit["id"] != answered["id"]
    assert 0.9 <= hit["cache"]["similarity"] <= 1.0
    assert ask(first, NEAR_MISS)["cached"] is False, "another country: the guard keeps it apart"
    exact = ask(first, ASKED)
    assert exact["cache"] == {"hit": "exact", "of": answered["id"], "similarity": None}
    # The hit is an answer of its own, for its caller: it can be read back.
    got = httpx.get(f"{second.url}/v1/answers/{hit['id']}", headers={"Authorization": f"Bearer {ALICE}"})
    assert got.status_code == 200 and got.json()["cache"]["of"] == answered["id"]


def test_a_hit_never_crosses_api_keys(replicas):
    first, _ = replicas
    alices = ask(first, ASKED, ALICE)["id"]
    bobs = ask(first, ASKED, BOB)
    assert bobs["cached"] is False, "not even an exact repeat"
    assert ask(first, PARAPHRASE, BOB)["cache"]["of"] == bobs["id"], "Bob's hits are his own answers"
    assert ask(first, PARAPHRASE, ALICE)["cache"]["of"] == alices


def test_a_shared_cache_serves_every_key(ray_cluster, redis):
    server = ThreadServer(config(redis.url, scope="shared"))
    try:
        alices = ask(server, ASKED, ALICE)
        bobs = ask(server, PARAPHRASE, BOB)
        assert bobs["cache"]["hit"] == "semantic" and bobs["cache"]["of"] == alices["id"]
    finally:
        server.stop()


def test_a_restart_loses_nothing(ray_cluster, redis, replicas):
    answered = ask(replicas[0], ASKED)
    fresh = ThreadServer(config(redis.url))
    try:
        hit = ask(fresh, PARAPHRASE)
        assert hit["cache"]["hit"] == "semantic" and hit["cache"]["of"] == answered["id"]
    finally:
        fresh.stop()


def test_feedback_that_marks_an_answer_wrong_evicts_it_everywhere(replicas):
    first, second = replicas
    answered = ask(first, ASKED)
    hit = ask(second, PARAPHRASE)
    r = httpx.post(f"{second.url}/v1/feedback", json={"answer_id": hit["id"], "correct": False},
                   headers={"Authorization": f"Bearer {ALICE}"})
    assert r.status_code == 200 and r.json()["evicted"] == answered["id"]
    assert ask(first, PARAPHRASE)["cached"] is False
    assert ask(second, "Which city is France's capital?")["cache"]["of"] != answered["id"]
    right = httpx.post(f"{first.url}/v1/feedback", json={"answer_id": answered["id"], "correct": True},
                       headers={"Authorization": f"Bearer {ALICE}"})
    assert right.json()["evicted"] is None


def test_clear_empties_the_cache_for_every_replica_and_needs_an_admin(replicas):
    first, second = replicas
    ask(first, ASKED)
    assert ask(second, PARAPHRASE)["cached"] is True
    denied = httpx.post(f"{first.url}/v1/admin/cache/clear", headers={"Authorization": f"Bearer {ALICE}"})
    assert denied.status_code == 403
    cleared = httpx.post(f"{first.url}/v1/admin/cache/clear", headers={"Authorization": f"Bearer {ADMIN}"})
    assert cleared.json()["cleared"] >= 2
    again = ask(second, PARAPHRASE)
    assert again["cached"] is False
    assert ask(first, ASKED)["cache"]["of"] == again["id"], "only what was answered after the clear"


def test_a_cached_answer_streams_and_the_hits_are_counted(replicas):
    first, _ = replicas
    auth = {"Authorization": f"Bearer {ALICE}"}
    first_chat = httpx.post(f"{first.url}/v1/chat/completions", headers=auth, timeout=60,
                            json={"messages": [{"role": "user", "content": ASKED}], "max_tokens": 4}).json()
    answered = first_chat["concilium"]
    text, final = "", None
    with httpx.stream("POST", f"{first.url}/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {ALICE}"},
                      json={"messages": [{"role": "user", "content": PARAPHRASE}], "max_tokens": 4,
                            "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                text += "".join(c["delta"].get("content") or "" for c in chunk["choices"])
                final = (chunk.get("concilium") or {}).get("cache") or final
    assert final is not None and final["hit"] == "semantic" and final["of"] == answered["id"]
    assert text == answered["answer"], "the cached answer, sent as deltas"
    metrics = httpx.get(f"{first.url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    hits = [s.value for s in families["concilium_semantic_cache"].samples
            if s.name.endswith("_total") and s.labels["result"] == "hit"]
    assert hits and hits[0] >= 1
    assert any(s.value for s in families["concilium_cache_lookup_seconds"].samples if s.name.endswith("_count"))


def test_entries_expire_with_the_cache_ttl(ray_cluster, redis):
    server = ThreadServer(config(redis.url, ttl_s=1.5))
    try:
        ask(server, "How many legs does a spider have?")
        assert ask(server, "How many legs do spiders have?")["cached"] is True
        time.sleep(2.0)
        assert ask(server, "How many legs do spiders have?")["cached"] is False
    finally:
        server.stop()


def test_thresholds_per_category(ray_cluster, redis):
    server = ThreadServer(config(redis.url, thresholds={"strict": 1.0}))
    try:
        ask(server, ASKED, category="strict")
        assert ask(server, PARAPHRASE, category="strict")["cached"] is False
        ask(server, ASKED, category="loose")
        assert ask(server, PARAPHRASE, category="loose")["cached"] is True
    finally:
        server.stop()


def test_the_guard_and_the_index():
    assert guard_key(ASKED) == guard_key(PARAPHRASE)
    assert guard_key(ASKED) != guard_key(NEAR_MISS)
    assert guard_key("Who wrote Hamlet?") != guard_key("When was Hamlet written?")
    assert guard_key("What is 2 to the power of 10?") != guard_key("What is 10 to the power of 2?")
    index = VectorIndex(4)
    vectors = np.eye(4, dtype=np.float32)
    index.add_many(["a", "b", "c"], vectors[:3], [1, 2, 3])
    assert index.search(vectors[1], 1) == [("b", pytest.approx(1.0), 2)]
    index.drop("b")
    assert {e for e, _, _ in index.search(vectors[1], 3)} == {"a", "c"} and len(index) == 2 and not index.stale
    index.drop("a")  # fewer than half alive: rebuilt from the vectors it holds
    assert index.stale
    index = index.compacted(index.dead)
    assert index.size == 1 and index.search(vectors[2], 2)[0][0] == "c" and not index.stale
