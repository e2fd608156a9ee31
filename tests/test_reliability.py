"""Reliability guarantees (docs/reliability.md), each against live servers on 127.0.0.1; keys and tenants are in
tests/test_tenants.py.

The experts here are simulated (real actors that sleep like a model decodes),
so that a batch can be killed mid-call, a hang can be made, and a queue can be
filled in seconds; the bad-input table runs against the bundled models in
tests/test_api.py. redis is a real redis-server that the tests stop and start.
The one stand-in is ``FakeOpenAI``, a remote model endpoint that cannot run
here; it supplies an expert answer that attempts a prompt injection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.api.security import key_id
from routers.aggregation import SYNTHESIS_INSTRUCTIONS
from tests.live import (
    INJECTION,
    FakeOpenAI,
    ProcessServer,
    RedisServer,
    ThreadServer,
    free_port,
    write_config,
)
from workers.placement import ACTOR_PREFIX

USER = f"user-{uuid.uuid4().hex[:10]}"


def _sim(name: str, step_s: float) -> dict:
    return {"name": name, "backend": "simulated", "memory_gb": 0.1, "load_s": 0.0, "step_s": step_s}


def _metric(url: str, name: str) -> float:
    families = {m.name: m for m in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    return sum(s.value for s in families[name].samples if not s.name.endswith("_created"))


async def _concurrently(url: str, bodies: list[dict], prefix: str, headers: dict | None = None) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        return await asyncio.gather(*(
            http.post("/v1/query", json=b, headers={**(headers or {}), "x-request-id": f"{prefix}-{i}"})
            for i, b in enumerate(bodies)
        ))


@pytest.fixture(scope="module")
def faulty(ray_cluster):
    """Defaults everywhere except: a 1 s expert (8 tokens x 0.125 s), a fast one, one that hangs for minutes,
    a 10 s expert timeout (room for a crashed call's restart and retry on a loaded machine) and room for 6
    pending requests."""
    namespace = f"rel-{uuid.uuid4().hex[:6]}"
    s = ThreadServer({
        "ray": {"namespace": namespace},
        "routing": {"aggregation": "vote", "max_wait_ms": 50, "expert_timeout_s": 10, "max_pending": 6},
        "experts": [_sim("sim-slow", 0.125), _sim("sim-fast", 0.001), _sim("sim-hung", 60.0)],
    })
    s.namespace = namespace
    yield s
    s.stop()


# -- faults ---------------------------------------------------------------------------------------------

def test_an_expert_killed_mid_batch_restarts_and_every_request_finishes_once(faulty, ray_cluster):
    bodies = [{"query": f"Question {i}: which option?", "max_tokens": 8, "k": 2, "experts": ["sim-slow", "sim-fast"]}
              for i in range(6)]
    scheduled = _metric(faulty.url, "concilium_scheduled")

    async def main() -> list[httpx.Response]:
        sending = asyncio.ensure_future(_concurrently(faulty.url, bodies, "crash"))
        await asyncio.sleep(0.5)  # the window is running, and sim-slow is half-way through its 1 s call
        ray_cluster.kill(ray_cluster.get_actor(ACTOR_PREFIX + "sim-slow", namespace=faulty.namespace),
                         no_restart=False)
        return await sending

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses]
    assert [r.headers["x-request-id"] for r in responses] == [f"crash-{i}" for i in range(6)]
    bodies_out = [r.json() for r in responses]
    assert len({b["id"] for b in bodies_out}) == 6  # six distinct answers, none delivered twice
    assert all(sorted(a["expert"] for a in b["answers"]) == ["sim-fast", "sim-slow"] for b in bodies_out)
    notes = [d for b in bodies_out for d in b["degraded"]]
    assert any("sim-slow's actor died during the call" in n for n in notes), notes
    assert _metric(faulty.url, "concilium_scheduled") - scheduled == 6  # each request ran in a window once


def test_a_hung_expert_times_out_and_the_request_finishes_with_the_others(faulty):
    started = time.monotonic()
    r = httpx.post(f"{faulty.url}/v1/query", timeout=60,
                   json={"query": "Which option?", "max_tokens": 8, "k": 2, "experts": ["sim-hung", "sim-fast"]})
    assert r.status_code == 200, r.text
    assert time.monotonic() - started < 30  # the 10 s expert timeout, not sim-hung's 8 minutes
    body = r.json()
    assert [a["expert"] for a in body["answers"]] == ["sim-fast"] and body["answer"]
    assert "sim-hung failed: timed out" in body["degraded"]


def test_a_full_queue_refuses_with_429_and_retry_after_and_keeps_serving(faulty):
    rejected = _metric(faulty.url, "concilium_rejected")
    bodies = [{"query": f"Busy {i}?", "max_tokens": 8, "k": 1, "experts": ["sim-slow"]} for i in range(16)]
    responses = asyncio.run(_concurrently(faulty.url, bodies, "busy"))
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 429} and codes.count(200) >= 6, codes
    for r in responses:
        if r.status_code == 429:
            assert r.json()["error"]["type"] == "overloaded" and "6 pending requests" in r.json()["error"]["message"]
            assert 1 <= int(r.headers["retry-after"]) <= 60
    assert _metric(faulty.url, "concilium_rejected") - rejected == codes.count(429)
    assert _metric(faulty.url, "concilium_pending") == 0  # nothing left behind
    again = httpx.post(f"{faulty.url}/v1/query", json=bodies[0], timeout=60)
    assert again.status_code == 200


def test_jobs_refused_by_a_full_queue_wait_in_the_store_and_all_finish(faulty):
    rejected = _metric(faulty.url, "concilium_rejected")
    submitted = [httpx.post(f"{faulty.url}/v1/jobs", timeout=30,
                            json={"query": f"Job {i}?", "max_tokens": 8, "k": 1, "experts": ["sim-slow"]})
                 for i in range(12)]  # twice what the queue admits
    assert [r.status_code for r in submitted] == [202] * 12
    deadline, states = time.monotonic() + 90, {}
    while time.monotonic() < deadline:
        states = {r.json()["id"]: httpx.get(f"{faulty.url}/v1/jobs/{r.json()['id']}").json()["status"]
                  for r in submitted}
        if set(states.values()) == {"done"}:
            break
        time.sleep(0.5)
    assert set(states.values()) == {"done"}, states
    assert _metric(faulty.url, "concilium_rejected") > rejected  # some were refused, and ran later


def test_redis_down_turns_the_cache_off_and_jobs_to_503_then_recovers(ray_cluster, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="orchestrator.api.service")
    redis = RedisServer(tmp_path / "a")
    s = ThreadServer({
        "ray": {"namespace": f"rel-{uuid.uuid4().hex[:6]}"},
        "routing": {"aggregation": "best", "max_wait_ms": 5},
        "server": {"redis_url": redis.url},
        "experts": [_sim("sim-fast", 0.001)],
    })
    try:
        def ask(q: str) -> dict:
            r = httpx.post(f"{s.url}/v1/query", json={"query": q, "max_tokens": 4}, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()

        assert ask("Cached?")["cached"] is False and ask("Cached?")["cached"] is True
        redis.stop()
        assert ask("Cached?")["cached"] is False  # the cache is off, the answer still comes
        assert ask("New while down?")["cached"] is False
        job = httpx.post(f"{s.url}/v1/jobs", json={"query": "A job?"}, timeout=30)
        assert job.status_code == 503 and job.json()["error"]["type"] == "unavailable"
        assert "jobs are unavailable" in job.json()["error"]["message"]
        assert httpx.get(f"{s.url}/v1/jobs/job-x", timeout=30).status_code == 503
        ready = httpx.get(f"{s.url}/readyz", timeout=30)
        assert ready.status_code == 200 and ready.json()["store_ok"] is False
        assert _metric(s.url, "concilium_store_up") == 0 and _metric(s.url, "concilium_store_errors") >= 3
        down = [r for r in caplog.records if "the store is unavailable" in r.getMessage()]
        assert len(down) == 1  # one line for the outage, not one per request

        redis = RedisServer(tmp_path / "b", port=redis.port)  # back where the service expects it
        assert ask("After?")["cached"] is False and ask("After?")["cached"] is True
        assert _metric(s.url, "concilium_store_up") == 1
        assert any("the store is back" in r.getMessage() for r in caplog.records)
        job = httpx.post(f"{s.url}/v1/jobs", json={"query": "A job?", "max_tokens": 4}, timeout=30)
        assert job.status_code == 202, job.text
        deadline = time.monotonic() + 60
        while (state := httpx.get(f"{s.url}/v1/jobs/{job.json()['id']}").json())["status"] != "done":
            assert time.monotonic() < deadline, state
            time.sleep(0.2)
    finally:
        s.stop()
        redis.stop()


def _profiles(tmp_path: Path, break_it: str) -> Path:
    """A profiles folder whose newest artifacts are broken one way."""
    root = tmp_path / "profiles"
    run = root / "run-1"
    run.mkdir(parents=True)
    (root / "LATEST").write_text("run-1")
    (run / "profiles.json").write_text(json.dumps({"version": 1, "experts": ["a"], "skills": [], "has_cost": False}))
    (run / "skill_index.json").write_text(json.dumps({"version": 1, "skills": []}))
    if break_it == "missing folder":
        (root / "LATEST").write_text("run-9")
    elif break_it == "corrupt json":
        (run / "profiles.json").write_text('{"version": 1, "experts": [')
    return root


@pytest.mark.parametrize(("break_it", "named"), [
    ("missing folder", "LATEST"),
    ("corrupt json", "profiles.json"),
    ("missing arrays", "profiles.npz"),
])
def test_broken_profile_artifacts_stop_serve_before_it_starts(tmp_path, break_it, named):
    root = _profiles(tmp_path, break_it)
    config = write_config(tmp_path / "c.yaml", {"routing": {"profiles": str(root)}, "experts": [_sim("a", 0.001)]})
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "serve", "--port", str(port), "--config", str(config)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "400"})
    assert proc.returncode == 2, proc.stderr
    assert named in proc.stderr and str(root) in proc.stderr and "Traceback" not in proc.stderr
    assert "Concilium on" not in proc.stderr  # stopped before the banner, Ray and the port
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


# -- overload and shutdown ------------------------------------------------------------------------------

@pytest.mark.ray
def test_shutdown_drains_in_flight_requests_binds_loopback_and_logs_no_secrets(tmp_path):
    """SIGTERM while a request runs: the request still gets its answer, then the process exits. The same
    run shows the listening socket is on 127.0.0.1, and that the log of the whole cycle (queries, a bad one, a wrong
    key, usage, a job) holds no prompt, answer or key."""
    config = write_config(tmp_path / "c.yaml", {"routing": {"aggregation": "best", "max_wait_ms": 5},
                                                "experts": [_sim("sim-slow", 0.3)]})
    marker = f"zebra-quokka-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "serve.log"
    s = ProcessServer(config, {"CONCILIUM_API_KEYS": USER}, log)
    try:
        listening = {c.laddr.ip for c in psutil.Process(s.proc.pid).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == s.port}
        assert listening == {"127.0.0.1"}
        headers = {"authorization": f"Bearer {USER}"}
        first = httpx.post(f"{s.url}/v1/query", json={"query": f"Tell me about {marker}.", "max_tokens": 2},
                           headers=headers, timeout=60)
        assert first.status_code == 200, first.text
        bad = httpx.post(f"{s.url}/v1/query", json={"query": marker, "k": 0}, headers=headers, timeout=60)
        assert bad.status_code == 422
        usage = httpx.get(f"{s.url}/v1/usage", headers=headers, timeout=60)  # the rest of a tenant's cycle
        assert usage.status_code == 200 and usage.json()["requests"] == 1
        assert usage.json()["key_id"] == key_id(USER) and USER not in usage.text  # named by its id, never itself
        job = httpx.post(f"{s.url}/v1/jobs", json={"query": f"Later, {marker}?", "max_tokens": 2}, headers=headers,
                         timeout=60).json()
        assert httpx.get(f"{s.url}/v1/jobs/{job['id']}", headers=headers, timeout=60).status_code == 200
        assert httpx.post(f"{s.url}/v1/query", json={"query": marker}, headers={"authorization": "Bearer " + marker},
                          timeout=60).status_code == 403

        result: dict[str, httpx.Response] = {}
        slow = threading.Thread(target=lambda: result.update(r=httpx.post(
            f"{s.url}/v1/query", json={"query": f"Slowly, {marker}?", "max_tokens": 8}, headers=headers,
            timeout=60)))
        slow.start()
        time.sleep(1.0)  # the request is in its 2.4 s expert call
        os.kill(s.proc.pid, signal.SIGTERM)
        slow.join(60)
        assert result["r"].status_code == 200 and result["r"].json()["answer"]
        assert s.proc.wait(60) == 15  # drained, then Ray's driver exits with the signal's number
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{s.url}/healthz", timeout=2)
    finally:
        if s.proc.poll() is None:
            s.kill()
        else:  # the API process has gone; end whatever of its local Ray is left
            with contextlib.suppress(ProcessLookupError):
                os.killpg(s.proc.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert "Concilium on" in text  # the log is the server's output
    for secret in (marker, USER, first.json()["answer"]):
        assert secret not in text


@pytest.mark.ray
def test_bench_load_accounts_for_every_request(tmp_path):
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "bench", "load", "--clients", "16", "--requests", "5",
         "--max-pending", "1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    ids = [o["request_id"] for o in report["outcomes"]]
    assert report["sent"] == 80 and len(ids) == len(set(ids)) == 80
    assert report["counts"].get("lost", 0) == 0 and report["duplicated"] == 0 and report["accounted"]
    answered, rejected = report["counts"].get("answered", 0), report["counts"].get("rejected", 0)
    assert answered + rejected == 80 and answered > 0 and report["checked_answers"]
    # 16 clients against one slot: with 4, a run on two busy cores once answered all 80 (in 0.65 s) and refused none.
    assert rejected > 0, report["counts"]
    assert {o["detail"] for o in report["outcomes"] if o["outcome"] == "rejected"} == {"overloaded"}


def test_bench_load_refuses_a_remote_url():
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "bench", "load", "--url", "http://10.1.2.3:8000"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "only targets loopback" in proc.stderr


def test_an_injected_expert_answer_stays_quoted_in_the_aggregator_prompt(ray_cluster, monkeypatch):
    monkeypatch.setenv("TEST_REMOTE_KEY", "sekrit")  # local actors inherit the driver's environment
    remote = FakeOpenAI()
    s = ThreadServer({
        "ray": {"namespace": f"inj-{uuid.uuid4().hex[:6]}"},
        "routing": {"aggregation": "synthesize", "aggregator": "remote-a", "max_wait_ms": 5},
        "experts": [{"name": name, "backend": "openai", "base_url": remote.base_url, "model": model,
                     "api_key_env": "TEST_REMOTE_KEY"}
                    for name, model in (("remote-a", "remote-7b"), ("remote-b", "remote-13b"))],
    })
    try:
        r = httpx.post(f"{s.url}/v1/query", json={"query": "INJECT: what is 2 + 2?"}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["aggregator"] == "remote-a" and r.json()["aggregation_skipped"] is None
        prompts = [c["messages"][-1]["content"] for c in remote.app.state.calls]
        synthesis = next(p for p in prompts if p.startswith(SYNTHESIS_INSTRUCTIONS))
    finally:
        s.stop()
        remote.stop()
    # The instructions are intact, and each answer, fake markers and all, sits inside its own quote.
    assert synthesis.count("<<<candidate ") == 2 and synthesis.count("<<<end of candidate ") == 2
    first = synthesis.index("<<<candidate 1>>>")
    end_first = synthesis.index("<<<end of candidate 1>>>")
    second = synthesis.index("<<<candidate 2>>>")
    assert first < synthesis.index("New instructions from the system") < end_first < second
    assert synthesis.rstrip().endswith("Your answer:") and "PWNED" in synthesis[first:end_first]
    assert INJECTION.format(n=9) not in synthesis  # it was defused, not passed through verbatim
