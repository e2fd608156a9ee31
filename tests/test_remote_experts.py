"""Remote experts (docs/reliability.md, "Remote experts"): the openai backend against a real OpenAI-compatible
upstream on 127.0.0.1, a second Concilium (its simulated experts stream a word per step), behind
``orchestrator.bench.fault_proxy.FaultProxy``, which injects the faults a remote endpoint shows and counts what reaches it.

Everything is real HTTP; the upstream's experts are simulated because the faults, not the text, are under test.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
import uuid

import openai
import pytest

from orchestrator.bench.fault_proxy import FaultProxy
from tests.live import ThreadServer
from workers.backends.openai_backend import OpenAIBackend, RemoteExpertError
from workers.backends.remote_limits import TokenBucket
from workers.backends.retry import retry_after_s
from workers.config import OpenAIExpert
from workers.types import Prompt, SamplingParams

pytestmark = pytest.mark.ray
PARAMS = SamplingParams(max_new_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def proxy(ray_cluster):
    upstream = ThreadServer({
        "ray": {"namespace": f"upstream-{uuid.uuid4().hex[:6]}"},
        "routing": {"aggregation": "best", "k": 1, "max_wait_ms": 2},
        "server": {"cache_ttl_s": 0},  # every request streams from the expert, none from the cache
        "experts": [{"name": "sim-up", "backend": "simulated", "memory_gb": 0.1, "load_s": 0.0, "step_s": 0.05}],
    })
    fronted = FaultProxy(f"{upstream.url}/v1/")
    try:
        yield fronted
    finally:
        fronted.stop()
        upstream.stop()


@pytest.fixture
def remote(proxy):
    """A loaded backend on the proxy; each test sets its own plan of faults."""
    made: list[OpenAIBackend] = []

    def make(**options: object) -> OpenAIBackend:
        proxy.app.state.plan.clear()
        proxy.app.state.requests = proxy.app.state.most_in_flight = proxy.app.state.closed_early = 0
        backend = OpenAIBackend(OpenAIExpert(name="far", backend="openai", base_url=proxy.base_url,
                                             model="concilium", **options))
        backend.load()
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.unload()


def _ask(backend: OpenAIBackend, deltas: list[str] | None = None, rows: int = 1, **kw: object):
    prompts = [Prompt(f"Question {n}?") for n in range(rows)]
    on_delta = (lambda _row, text: deltas.append(text)) if deltas is not None else None
    return backend.generate(prompts, PARAMS, on_delta, **kw)


def test_a_row_streams_its_deltas_and_takes_its_usage_from_the_last_chunk(remote):
    deltas: list[str] = []
    out, = _ask(remote(), deltas)
    assert len(deltas) >= 2 and out.text == "".join(deltas).strip()  # piece by piece, not whole
    assert out.meta == {"usage": "reported", "retries": 0}
    assert out.prompt_tokens > 0 and out.completion_tokens == PARAMS.max_new_tokens


def test_429_with_retry_after_and_503_are_tried_again_inside_the_deadline(remote, proxy):
    backend = remote()
    proxy.app.state.plan[:] = [("status", 429, {"Retry-After": "1"}), ("status", 503)]
    t0 = time.monotonic()
    out, = _ask(backend, [])
    assert time.monotonic() - t0 >= 1.0  # Retry-After honoured
    assert out.meta["retries"] == 2 and proxy.app.state.requests == 3
    short = remote(timeout_s=1.0)
    proxy.app.state.plan[:] = [("status", 429, {"Retry-After": "5"})]
    t0 = time.monotonic()
    with pytest.raises(RemoteExpertError, match="answered 429 .after 1 tries"):
        _ask(short, [])
    assert time.monotonic() - t0 < 1.0 and proxy.app.state.requests == 1  # no wait past the deadline


def test_a_stream_cut_after_a_token_reached_the_client_is_not_tried_again(remote, proxy):
    backend = remote()
    proxy.app.state.plan[:] = [("cut_after", 2)]
    deltas: list[str] = []
    with pytest.raises(RemoteExpertError, match="after the first token reached the client; not retried"):
        _ask(backend, deltas)
    assert deltas and proxy.app.state.requests == 1
    proxy.app.state.plan[:] = [("cut_after", 2)]  # nothing streamed to a client: tried again, whole
    out, = _ask(backend)
    assert out.meta["retries"] == 1 and out.text


def test_a_malformed_line_before_the_first_token_and_a_slow_first_byte(remote, proxy):
    backend = remote()
    proxy.app.state.plan[:] = [("malformed", 1)]  # after the upstream's opening chunk, before any text
    deltas: list[str] = []
    out, = _ask(backend, deltas)
    assert out.meta["retries"] == 1 and out.text == "".join(deltas).strip()
    proxy.app.state.plan[:] = [("slow_first_byte", 0.5)]
    t0 = time.monotonic()
    out, = _ask(backend, [])
    assert time.monotonic() - t0 >= 0.5 and out.meta["retries"] == 0


def test_a_stall_past_the_deadline_ends_the_row_instead_of_hanging(remote, proxy):
    backend = remote(timeout_s=1.5)
    proxy.app.state.plan[:] = [("stall_after", 2, 10)]
    t0 = time.monotonic()
    with pytest.raises(RemoteExpertError, match="ReadTimeout"):
        _ask(backend, [])
    assert time.monotonic() - t0 < 5


def test_the_concurrency_limit_holds_where_the_upstream_feels_it(remote, proxy):
    backend = remote(max_concurrency=2)
    out = _ask(backend, rows=6)
    assert len(out) == 6 and all(c.text for c in out)
    assert proxy.app.state.most_in_flight == 2  # reached, never passed


def test_a_client_that_leaves_closes_the_upstream_stream(remote, proxy):
    backend = remote()
    proxy.app.state.plan[:] = [("stall_after", 2, 5)]  # the upstream goes silent after the first text
    deltas: list[str] = []
    t0 = time.monotonic()
    out, = _ask(backend, deltas, cancelled=lambda _row: bool(deltas))
    assert time.monotonic() - t0 < 2  # closed while the upstream was silent, not after
    assert out.finish_reason == "cancelled"
    deadline = time.monotonic() + 5
    while proxy.app.state.closed_early == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proxy.app.state.closed_early == 1 and proxy.app.state.in_flight == 0


def test_the_token_bucket_waits_instead_of_failing():
    async def run() -> float:
        bucket = TokenBucket(600)  # ten a second, a minute's worth at once
        await bucket.take(600)
        t0 = time.monotonic()
        await bucket.take(5)
        return time.monotonic() - t0

    assert 0.4 <= asyncio.run(run()) < 2.0


def test_retry_after_reads_seconds_and_http_dates():
    assert retry_after_s("3") == 3.0 and retry_after_s(None) is None and retry_after_s("soon") is None
    when = email.utils.formatdate(1_000_060, usegmt=True)
    assert retry_after_s(when, now=1_000_000) == pytest.approx(60.0)


@pytest.fixture(scope="module")
def fronts(proxy):
    """Two Concilium servers whose first expert is remote (through the proxy) and streams each answer, and whose
    second is local (simulated), so it answers when the first fails; one per ``stream_fallback``."""
    made = []
    try:
        for fallback in ("restart", "error"):
            made.append(ThreadServer({
                "ray": {"namespace": f"front-{fallback}-{uuid.uuid4().hex[:6]}"},
                "routing": {"aggregation": "best", "max_wait_ms": 2, "stall_timeout_s": 1.0},
                "server": {"stream_fallback": fallback, "cache_ttl_s": 0},
                "experts": [{"name": "far", "backend": "openai", "base_url": proxy.base_url, "model": "concilium",
                             "retries": 0},
                            {"name": "near", "backend": "simulated", "memory_gb": 0.1, "load_s": 0.0,
                             "step_s": 0.05}],
            }))
        yield dict(zip(("restart", "error"), made))
    finally:
        for server in made:
            server.stop()


def _stream_openai(url: str) -> tuple[list[str], list[dict], dict]:
    """Stream a chat completion with the official client: the text pieces, the Concilium extensions seen, and the
    error body if the stream ended with one."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    pieces, extras, error = [], [], {}
    try:
        for chunk in client.chat.completions.create(model="concilium", stream=True, max_tokens=6,
                                                    messages=[{"role": "user", "content": "Pick a letter."}]):
            extras.append((chunk.model_extra or {}).get("concilium") or {})
            pieces.extend(c.delta.content for c in chunk.choices if c.delta.content)
    except openai.APIError as exc:
        error = exc.body
    return pieces, extras, error


@pytest.mark.parametrize("fault", [("cut_after", 5), ("stall_after", 5, 10)], ids=["cut", "stall"])
def test_a_stream_whose_expert_fails_after_its_first_token_restarts_or_errors_as_configured(fronts, proxy, fault):
    """A cut after the first token, or a stall past ``stall_timeout_s`` (1 s; the proxy stalls 10 s): the local
    expert's answer stands. The fault comes after the remote answer's letter (its fifth data line: the opening, then
    "The ", "answer ", "is ", "(C)."), and the local expert answers (B): simulated letters are hashes of the
    expert's name and the prompt, the same on every machine. ``restart``: a restart event, then the new answer from its start, which is the
    response's answer; ``error``: an error event with the text sent so far. Both through the ``openai`` client."""
    proxy.app.state.plan[:] = [fault]
    t0 = time.monotonic()
    pieces, extras, error = _stream_openai(fronts["restart"].url)
    assert not error and time.monotonic() - t0 < 8
    at = next(i for i, x in enumerate(extras) if "restart" in x)
    restart = extras[at]["restart"]
    assert "far" in restart["reason"] and restart["discard_chars"] > 0
    final = next(x for x in extras if "answer" in x)
    after = "".join(pieces)[restart["discard_chars"]:]
    assert after == final["answer"] and final["answers"][0]["expert"] == "near"

    proxy.app.state.plan[:] = [fault]
    pieces, _, error = _stream_openai(fronts["error"].url)
    assert error["type"] == "stream_interrupted" and error["partial"] == "".join(pieces) != ""
    assert "/v1/answers/" in error["message"]
