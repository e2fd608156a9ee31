"""The HTTP API against live servers on 127.0.0.1: the bundled models, a real redis-server, real clients.

One server with the bundled experts and the in-process store, open like the
default ``make serve``, serves most tests and the README's examples; another
with replay experts, redis and API keys covers the shared store, auth and
rate limits; a killed-and-restarted ``concilium serve`` process covers jobs.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.api.security import digest
from orchestrator.client import AsyncClient, Client, ConciliumError
from tests.conftest import BENCH_DATA
from tests.live import ProcessServer, RedisServer, ThreadServer, free_port, write_config
from tests.test_cli import concilium

KEY = "test-key-" + uuid.uuid4().hex[:8]

pytestmark = pytest.mark.models


def _bundled(namespace: str, **server: object) -> dict:
    return {
        "ray": {"namespace": namespace},
        "routing": {"aggregation": "vote", "max_wait_ms": 5},
        "server": {"max_query_chars": 500, "max_tokens": 64, **server},
    }


@pytest.fixture(scope="module")
def server(ray_cluster, store):
    s = ThreadServer(_bundled(f"api-{uuid.uuid4().hex[:6]}"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    r = RedisServer(tmp_path_factory.mktemp("redis"))
    yield r
    r.stop()


def post(server, path: str, body: object, **kw) -> httpx.Response:  # noqa: ANN001
    return httpx.post(f"{server.url}{path}", json=body, timeout=300, **kw)


def test_query_answers_with_trace_usage_and_cache(server):
    body = {"query": "What is the capital of France?", "max_tokens": 8}
    first = post(server, "/v1/query", body)
    assert first.status_code == 200, first.text
    r = first.json()
    assert sorted(a["expert"] for a in r["answers"]) == ["gemma3", "smollm2"]
    assert r["answer"] and r["aggregation"] == "vote" and r["cached"] is False
    assert r["routing"]["router"] == "all" and r["routing"]["experts"] == ["smollm2", "gemma3"]
    assert r["total_usage"]["completion_tokens"] == sum(a["completion_tokens"] for a in r["answers"]) > 0
    assert r["cost_usd"] > 0 and {"queue_s", "route_s", "solve_s", "aggregate_s", "total_s"} <= set(r["timings"])
    assert first.headers["x-concilium-experts"] == "smollm2,gemma3"
    # The same request, spelled with other whitespace, is a cache hit with the same answer.
    again = post(server, "/v1/query", {**body, "query": "  What is the capital   of France? "}).json()
    assert again["cached"] is True and again["answer"] == r["answer"] and again["id"] == r["id"]
    # A sampled request is never served from the cache.
    sampled = post(server, "/v1/query", {**body, "temperature": 0.9, "aggregation": "best"}).json()
    assert sampled["cached"] is False

    metrics = {m.name: m for m in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)}
    cache = {s.labels["result"]: s.value for s in metrics["concilium_cache"].samples if s.name.endswith("_total")}
    assert cache["hit"] >= 1 and cache["miss"] >= 1
    routed = {s.labels["expert"]: s.value for s in metrics["concilium_routed"].samples if s.name.endswith("_total")}
    assert routed["smollm2"] >= 2 and routed["gemma3"] >= 1
    requests = [s for s in metrics["concilium_requests"].samples
                if s.labels.get("endpoint") == "/v1/query" and s.labels.get("status") == "200"]
    assert requests and requests[0].value >= 3
    assert metrics["concilium_model_loads"].samples[0].value >= 2
    assert "concilium_request_seconds" in metrics and "concilium_queue_depth" in metrics


def test_query_stream_sends_chunks_then_the_full_response(server):
    body = {"query": "What is the capital of France?", "max_tokens": 8, "stream": True, "experts": ["smollm2"],
            "k": 1}
    with httpx.stream("POST", f"{server.url}/v1/query", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    final, opening = json.loads(events[-2]), json.loads(events[0])
    deltas = "".join(json.loads(e)["delta"] for e in events[1:-2])
    assert deltas == final["answer"] and "Paris" in deltas
    assert opening == {"id": final["id"], "plan": {"streams": "smollm2", "router": "all", "experts": ["smollm2"],
                                                   "why": "the top-scored expert's answer is the answer"}}


def _metric(server, name: str) -> float:  # noqa: ANN001
    families = {m.name: m for m in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)}
    return sum(s.value for s in families[name].samples if s.name.endswith("_total"))


def test_a_client_that_goes_away_is_dropped_from_its_window(ray_cluster, store):
    config = _bundled(f"api-{uuid.uuid4().hex[:6]}")
    config["routing"] = {"aggregation": "best", "max_wait_ms": 2500}
    s = ThreadServer(config)
    try:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up while its request waits for the window
            httpx.post(f"{s.url}/v1/query", json={"query": "Say hi.", "max_tokens": 4}, timeout=0.6)
        time.sleep(3.5)  # past the window's close
        assert _metric(s, "concilium_cancelled") == 1
        assert _metric(s, "concilium_scheduled") == 0  # dropped before its window ran: no expert time spent
        ok = httpx.post(f"{s.url}/v1/query", json={"query": "Say hi.", "max_tokens": 4}, timeout=120)
        assert ok.status_code == 200 and _metric(s, "concilium_scheduled") == 1
    finally:
        s.stop()


def test_route_explains_without_generating(server):
    before = post(server, "/v1/experts", None)  # wrong method: the error shape holds for it too
    assert before.status_code == 405 and before.json()["error"]["type"] == "method_not_allowed"
    r = post(server, "/v1/route", {"query": "Integrate x squared.", "k": 1, "experts": ["gemma3"]})
    assert r.status_code == 200, r.text
    routing = r.json()["routing"]
    assert routing["experts"] == ["gemma3"] and routing["trace"]["allow_list"] == ["gemma3"]
    experts = {e["name"]: e for e in httpx.get(f"{server.url}/v1/experts").json()}
    assert set(experts) == {"smollm2", "gemma3"} and all(e["device"] == "cpu" for e in experts.values())


@pytest.mark.parametrize(
    ("path", "body", "status", "kind", "message"),
    [
        ("/v1/query", b"{not json", 400, "invalid_json", "not valid JSON"),
        ("/v1/query", b'{"query": "\xff\xfe"}', 400, "invalid_json", "not UTF-8"),
        ("/v1/query", {"query": 42}, 422, "invalid_request", "query: Input should be a valid string"),
        ("/v1/query", {"query": "hi", "colour": "red"}, 422, "invalid_request", "colour: Extra inputs"),
        ("/v1/query", {}, 422, "invalid_request", "query: Field required"),
        ("/v1/query", {"query": ""}, 422, "invalid_request", "query: String should have at least 1 character"),
        ("/v1/query", {"query": " \n "}, 422, "invalid_request", "empty or only whitespace"),
        ("/v1/query", {"query": "x" * 501}, 422, "invalid_request", "501 characters, above the limit of 500"),
        ("/v1/query", {"query": "hi", "k": 0}, 422, "invalid_request", "k: Input should be greater than or equal"),
        ("/v1/query", {"query": "hi", "k": 10**6}, 422, "invalid_request", "above the limit of 16"),
        ("/v1/query", {"query": "hi", "router": "oracle"}, 422, "invalid_request", "unknown router 'oracle'"),
        ("/v1/query", {"query": "hi", "experts": ["gpt-9"]}, 422, "invalid_request", "unknown expert(s) gpt-9"),
        ("/v1/query", {"query": "hi", "max_tokens": 65}, 422, "invalid_request", "65 is above the limit of 64"),
        ("/v1/query", {"query": "hi", "temperature": -1}, 422, "invalid_request", "temperature"),
        ("/v1/route", {"query": "hi", "stream": True}, 422, "invalid_request", "does not stream"),
        ("/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404,
         "not_found", "model 'gpt-9' does not exist"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 422, "invalid_request",
         "messages.0.role"),
        ("/v1/chat/completions", {"messages": [{"role": "system", "content": "be nice"}]}, 422,
         "invalid_request", "last user message is missing"),
        ("/v1/feedback", {"answer_id": "cc-nope", "correct": True}, 404, "not_found", "no answer 'cc-nope'"),
        ("/v1/feedback", {"answer_id": "cc-nope"}, 422, "invalid_request", "exactly one of correct"),
        ("/v1/jobs", {"query": "hi", "stream": True}, 422, "invalid_request", "a job has no stream"),
        ("/v1/query", {"query": "hi", "max_tokens": -5}, 422, "invalid_request", "max_tokens: Input should be"),
        ("/v1/query", [{"query": "hi"}], 422, "invalid_request", "Input should be a valid dictionary"),
        ("/v1/chat/completions", b"[{", 400, "invalid_json", "not valid JSON"),
        ("/v1/chat/completions", {"messages": "hello"}, 422, "invalid_request", "messages: Input should be a valid list"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 422, "invalid_request",
         "messages.0: a user message needs its content"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 422,
         "invalid_request", "temperature"),
        ("/v1/jobs", {"query": "   "}, 422, "invalid_request", "empty or only whitespace"),
        ("/v1/jobs", {"query": "hi", "experts": ["nobody"]}, 422, "invalid_request", "unknown expert(s) nobody"),
        ("/v1/route", {}, 422, "invalid_request", "query: Field required"),
        ("/v1/route", {"query": "hi", "k": 10**6}, 422, "invalid_request", "above the limit of 16"),
        ("/v1/feedback", {"answer_id": "cc-x", "rating": 2}, 422, "invalid_request", "rating: Input should be"),
        ("/v1/feedback", {"answer_id": 5, "correct": True}, 422, "invalid_request", "answer_id: Input should be"),
    ],
)
def test_bad_input_gets_a_clear_4xx(server, path, body, status, kind, message):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(f"{server.url}{path}", timeout=60, **kw)
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"] == kind
    assert message in r.json()["error"]["message"]


def test_body_size_limit_and_unknown_job(server):
    big = httpx.post(f"{server.url}/v1/query", content=b"x" * 1_100_000, timeout=60)
    assert big.status_code == 413 and big.json()["error"]["type"] == "body_too_large"
    missing = httpx.get(f"{server.url}/v1/jobs/job-nope")
    assert missing.status_code == 404 and "no job 'job-nope'" in missing.json()["error"]["message"]
    # After all the bad input (this test runs after the table), the server still answers, and correctly.
    ok = post(server, "/v1/query", {"query": "What is the capital of France?", "max_tokens": 8, "k": 1,
                                    "experts": ["smollm2"]})
    assert ok.status_code == 200 and "Paris" in ok.json()["answer"]


def test_sdk_against_the_live_server(server):
    with Client(server.url) as c:
        r = c.query("Name a primary colour.", max_tokens=6, aggregation="best", experts=["smollm2"], k=1)
        assert [a.expert for a in r.answers] == ["smollm2"] and r.aggregation_skipped
        assert c.route("Name a colour.", k=1).experts
        chat = c.chat("What is the capital of France?", model="smollm2", max_tokens=8)
        assert "Paris" in chat.choices[0].message.content
        stream = c.chat_stream("What is the capital of France?", model="smollm2", max_tokens=8)
        assert "Paris" in "".join(stream) and stream.response.routing.experts == ["smollm2"]
        assert {e.name for e in c.experts()} == {"smollm2", "gemma3"}
        job = c.submit_job("Say yes.", max_tokens=4, aggregation="best")
        done = c.wait_job(job.id, timeout_s=120)
        assert done.status == "done" and done.result.answer
        fb = c.feedback(r.id, correct=True)
        assert fb.experts == ["smollm2"] and fb.profile_updated is False  # the `all` router has no profiles
        with pytest.raises(ConciliumError) as info:
            c.query("hi", k=0)
        assert info.value.status == 422 and info.value.type == "invalid_request"


def test_async_sdk_against_the_live_server(server):
    async def main():
        async with AsyncClient(server.url) as c:
            r = await c.query("Name a primary colour.", max_tokens=6, aggregation="best", experts=["gemma3"], k=1)
            pieces = [p async for p in c.chat_stream("What is the capital of France?", model="smollm2",
                                                      max_tokens=8)]
            job = await c.submit_job("Say yes.", max_tokens=4, aggregation="best", experts=["smollm2"], k=1)
            done = await c.wait_job(job.id, timeout_s=120)
            routing = await c.route("Say yes.", experts=["gemma3"], k=1)
            extras = (await c.models(), await c.answer(r.id), await c.usage())
            return r, "".join(pieces), done, routing, extras

    r, streamed, done, routing, (models, again, usage) = asyncio.run(main())
    assert [a.expert for a in r.answers] == ["gemma3"]
    assert {"concilium", "smollm2", "gemma3"} <= {m.id for m in models.data}
    assert again.id == r.id and again.answer == r.answer  # the async SDK has what the sync one has
    assert usage.requests >= 2
    assert "Paris" in streamed
    assert done.status == "done" and done.result.answers[0].expert == "smollm2"
    assert routing.experts == ["gemma3"]


def test_client_retries_a_refused_connection_with_backoff():
    with Client(f"http://127.0.0.1:{free_port()}", retries=2, backoff_s=0.1) as c:
        started = time.monotonic()
        with pytest.raises(httpx.ConnectError):
            c.models()
        assert time.monotonic() - started >= 0.1 + 0.2  # two waits: 0.1 s, then 0.2 s


def test_client_imports_without_torch_ray_or_transformers():
    code = ("import sys, orchestrator.client; "
            "print(sorted(m for m in ('torch', 'ray', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _replay_config(namespace: str, redis_url: str, **server: object) -> dict:
    folder = BENCH_DATA / "routerbench-arc-wino-mbpp"
    return {
        "ray": {"namespace": namespace},
        "routing": {"aggregation": "vote", "max_wait_ms": 5},
        "server": {"redis_url": redis_url, **server},
        "experts": [{"name": name, "backend": "replay", "path": str(folder), "model": model}
                    for name, model in (("gpt4", "gpt-4-1106-preview"), ("mistral7b", "mistralai/mistral-7b-chat"))],
    }


def test_redis_store_auth_and_rate_limits(ray_cluster, redis):
    config = _replay_config(f"api-{uuid.uuid4().hex[:6]}", redis.url, rate_limit_per_minute=4,
                            api_key_sha256=[digest(KEY)])
    s = ThreadServer(config)
    try:
        url, headers = f"{s.url}/v1/query", {"authorization": f"Bearer {KEY}"}
        body = {"query": "What is 2 + 2?"}
        none = httpx.post(url, json=body)
        assert none.status_code == 401 and none.json()["error"]["type"] == "unauthorized"
        wrong = httpx.post(url, json=body, headers={"x-api-key": "nope"})
        assert wrong.status_code == 403 and wrong.json()["error"]["type"] == "forbidden"
        assert httpx.get(f"{s.url}/healthz").status_code == 200  # probes need no key
        if time.time() % 60 > 45:  # the limit counts per clock minute: start well inside one
            time.sleep(61 - time.time() % 60)
        statuses, cached = [], []
        for _ in range(6):
            r = httpx.post(url, json=body, headers=headers, timeout=60)
            statuses.append(r.status_code)
            cached.append(r.json().get("cached"))
        assert statuses[:4] == [200] * 4 and set(statuses[4:]) == {429}
        assert cached[:4] == [False, True, True, True]  # the cache lives in redis
        limited = httpx.post(url, json=body, headers=headers, timeout=60)
        assert 0 < int(limited.headers["retry-after"]) <= 60 and limited.json()["error"]["type"] == "rate_limited"
        with Client(s.url, api_key=KEY, retries=0) as c, pytest.raises(ConciliumError) as info:
            c.query("What is 2 + 2?")
        assert info.value.status == 429 and info.value.type == "rate_limited"
        ready = httpx.get(f"{s.url}/readyz").json()
        assert ready["store"] == "redis" and ready["store_ok"] is True
    finally:
        s.stop()


def test_config_reload_adds_and_removes_experts_in_place(ray_cluster, redis, tmp_path):
    """The server is bound to a port given outside the file (as ``serve --port`` does): only a change in the
    file's own address is refused."""
    data = _replay_config(f"api-{uuid.uuid4().hex[:6]}", redis.url)
    path = write_config(tmp_path / "c.yaml", data)
    s = ThreadServer(path)
    try:
        def names() -> set[str]:
            return {e["name"] for e in httpx.get(f"{s.url}/v1/experts").json()}

        assert names() == {"gpt4", "mistral7b"}
        folder = data["experts"][0]["path"]
        data["experts"] = [data["experts"][0], {"name": "claude2", "backend": "replay", "path": folder,
                                                "model": "claude-v2"}]
        write_config(path, data)
        r = httpx.post(f"{s.url}/v1/admin/reload", timeout=60)
        assert r.status_code == 200, r.text
        assert r.json() == {"added": ["claude2"], "removed": ["mistral7b"], "changed": [], "routers": ["all"]}
        assert names() == {"gpt4", "claude2"}
        answer = httpx.post(f"{s.url}/v1/query", json={"query": "What is 3 + 4?"}, timeout=60).json()
        assert sorted(a["expert"] for a in answer["answers"]) == ["claude2", "gpt4"]
        path.write_text("experts: [{name: broken, backend: warp}]")
        bad = httpx.post(f"{s.url}/v1/admin/reload", timeout=60)
        assert bad.status_code == 422 and "experts[0]" in bad.json()["error"]["message"]
        assert names() == {"gpt4", "claude2"}  # a bad file changes nothing
        write_config(path, {**data, "server": {**data["server"], "port": s.port + 1}})
        refused = httpx.post(f"{s.url}/v1/admin/reload", timeout=60)
        assert refused.status_code == 422 and "needs a restart" in refused.json()["error"]["message"]
    finally:
        s.stop()


def test_a_job_survives_a_killed_api_process(redis, tmp_path):
    """The API process is killed mid-job and restarted; the job finishes once. The expert is simulated (48
    tokens at 0.1 s each, so the job is still running at the kill): the subject is the job, not the text."""
    config = write_config(tmp_path / "c.yaml", {
        "routing": {"aggregation": "synthesize"},
        "experts": [{"name": "sim", "backend": "simulated", "memory_gb": 0.1, "load_s": 0.0, "step_s": 0.1}],
    })
    env = {"REDIS_URL": redis.url}
    first = ProcessServer(config, env, tmp_path / "serve.log")
    try:
        with Client(first.url) as c:
            job = c.submit_job("Write two sentences about the sea.", max_tokens=48)
            assert c.job(job.id).status in ("queued", "running")
    finally:
        first.kill()
    second = ProcessServer(config, env, tmp_path / "serve.log")
    try:
        with Client(second.url) as c:
            done = c.wait_job(job.id, timeout_s=240)
            assert done.status == "done" and done.result.answer, done
            assert done.result.answers[0].expert == "sim"
    finally:
        second.kill()


def _readme_examples() -> dict[str, tuple[str, str]]:
    """The README's marked examples: name → (language, code)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    found = re.findall(r"<!-- readme-example: (\w+) -->\n```(\w+)\n(.*?)```", text, re.DOTALL)
    return {name: (lang, code) for name, lang, code in found}


@pytest.mark.parametrize("name", ["curl", "sdk", "openai", "stream"])
def test_readme_examples_work_as_written(server, name):
    examples = _readme_examples()
    assert set(examples) == {"curl", "sdk", "openai", "stream"}
    lang, code = examples[name]
    code = code.replace("http://127.0.0.1:8000", server.url)  # the only change: the test server's port
    cmd = ["bash", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout and "smollm2" in proc.stdout


def test_bench_api_reports_overhead(tmp_path):
    proc = concilium("bench", "api", "--n", "10")
    assert proc.returncode == 0, proc.stderr
    assert "POST /v1/route" in proc.stdout and "/v1/query overhead over the pipeline" in proc.stdout
    experts = [{"name": n, "backend": "simulated", "memory_gb": 0.1, "load_s": 0.0, "step_s": 0.002}
               for n in ("sim-a", "sim-b")]
    config = write_config(tmp_path / "sim.yaml", {"experts": experts})
    proc = concilium("bench", "api", "--stream", "--n", "10", "--max-tokens", "8", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert "sim-a: pool stream" in proc.stdout and "synthesis" in proc.stdout
    assert "first token through the API vs the pool: p50" in proc.stdout
