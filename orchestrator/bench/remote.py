"""``concilium bench remote``: what a remote expert costs, and how it behaves under an upstream's faults.

It starts an upstream Concilium (``concilium serve``: one simulated expert that streams a word per step, the
cache off), the fault proxy in front of it (``fault_proxy``), and a front Concilium whose experts are a remote one
(``far``, through the proxy) and a local simulated one to fall back on (``near``), with ``stream_fallback:
restart``. Then, side by side in one run:
1. time to first token of a streamed chat completion, straight to the upstream and through a second front whose
   one expert is the same upstream without the proxy, alternated, no faults;
2. one row through the remote backend in this process against a bare ``httpx`` streamed request, same upstream,
   alternated: the backend's own overhead;
3. ``faulted`` streamed requests through the front with the official ``openai`` client, ``concurrency`` at a
   time, while the proxy answers 20% of calls with 429 or 503 and cuts 5% after their first text. A request
   fails if its client gets an error; every request's text after its last restart must be its final answer.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import openai

from orchestrator.bench.fault_proxy import FaultProxy
from orchestrator.bench.load import StartedServer
from workers.backends.openai_backend import OpenAIBackend
from workers.config import OpenAIExpert
from workers.types import Prompt, SamplingParams

MAX_TOKENS = 6
SIM = {"backend": "simulated", "memory_gb": 0.1, "load_s": 0.0, "step_s": 0.02}


@dataclass
class RemoteReport:
    ttft_direct_ms: float = 0.0
    ttft_front_ms: float = 0.0
    call_bare_ms: float = 0.0
    call_backend_ms: float = 0.0
    sent: int = 0
    failed: list[str] = field(default_factory=list)
    restarts: int = 0
    unreadable: int = 0
    """Streams whose text after their last restart is not their final answer."""
    proxy: dict[str, int] = field(default_factory=dict)
    """What the proxy did, by fault, and its most requests in flight."""
    retried_answers: int = 0
    reasons: list[str] = field(default_factory=list)
    """Why each restart happened (the answer's degraded notes)."""


def _chance(rng: random.Random) -> Callable[[], tuple]:
    def draw() -> tuple:
        x = rng.random()
        if x < 0.10:
            return ("status", 429, {"Retry-After": "0.2"})
        if x < 0.20:
            return ("status", 503)
        if x < 0.25:
            return ("cut_after", rng.randint(2, 5))  # after the opening and one to four words
        return ("pass",)
    return draw


async def _ttft(base_url: str, model: str) -> float:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=60)
    try:
        t0 = time.perf_counter()
        stream = await client.chat.completions.create(model=model, stream=True, max_tokens=MAX_TOKENS,
                                                      messages=[{"role": "user", "content": "Pick a letter."}])
        first = None
        async for chunk in stream:
            if first is None and any(c.delta.content for c in chunk.choices):
                first = time.perf_counter() - t0
        return (first or 0.0) * 1000
    finally:
        await client.close()


def _bare(http: httpx.Client, body: dict) -> float:
    t0 = time.perf_counter()
    with http.stream("POST", "chat/completions", json=body) as r:
        for _ in r.iter_lines():
            pass
    return (time.perf_counter() - t0) * 1000


def _backend_call(backend: OpenAIBackend, params: SamplingParams) -> float:
    t0 = time.perf_counter()
    backend.generate([Prompt("Pick a letter.")], params, lambda _r, _t: None)
    return (time.perf_counter() - t0) * 1000


def overheads(upstream: str, front: str, n: int, report: RemoteReport) -> None:
    """Parts 1 and 2, alternated so that drift hits both sides alike."""
    direct, through = [], []
    for _ in range(n):
        direct.append(asyncio.run(_ttft(f"{upstream}/v1", "sim-a")))
        through.append(asyncio.run(_ttft(f"{front}/v1", "direct")))
    report.ttft_direct_ms, report.ttft_front_ms = statistics.median(direct), statistics.median(through)
    backend = OpenAIBackend(OpenAIExpert(name="bench", backend="openai", base_url=f"{upstream}/v1", model="sim-a"))
    backend.load()
    params = SamplingParams(max_new_tokens=MAX_TOKENS)
    body = backend.body(Prompt("Pick a letter."), params)  # the very request the backend sends
    bare, ours = [], []
    try:
        with httpx.Client(base_url=f"{upstream}/v1/", timeout=60) as http:
            for _ in range(n):
                bare.append(_bare(http, body))
                ours.append(_backend_call(backend, params))
    finally:
        backend.unload()
    report.call_bare_ms, report.call_backend_ms = statistics.median(bare), statistics.median(ours)


async def faulted(front: str, n: int, concurrency: int, report: RemoteReport) -> None:
    """Part 3: every request's outcome, and whether its client can tell its final answer."""
    client = openai.AsyncOpenAI(base_url=f"{front}/v1", api_key="none", max_retries=0, timeout=120)
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with slots:
            text, final = "", None
            try:
                stream = await client.chat.completions.create(
                    model="concilium", stream=True, max_tokens=MAX_TOKENS,
                    messages=[{"role": "user", "content": f"Question {i}: pick a letter."}])
                async for chunk in stream:
                    extra = (chunk.model_extra or {}).get("concilium") or {}
                    if "restart" in extra:
                        report.restarts += 1
                        report.reasons.append(str(extra["restart"].get("reason"))[:200])
                        text = ""
                    final = extra.get("answer", final)
                    report.retried_answers += sum(a.get("retries", 0) > 0 for a in extra.get("answers", []))
                    text += "".join(c.delta.content or "" for c in chunk.choices)
            except openai.APIError as exc:
                report.failed.append(str(exc)[:160])
                return
            report.unreadable += text.strip() != (final or "").strip()

    report.sent = n
    try:
        await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        await client.close()


def run_remote(n: int, faulted_n: int, concurrency: int, seed: int, progress: Callable[[str], None]) -> RemoteReport:
    report = RemoteReport()
    progress("starting the upstream")
    upstream = StartedServer({"routing": {"aggregation": "best", "max_wait_ms": 2}, "server": {"cache_ttl_s": 0},
                              "experts": [{"name": "sim-a", **SIM}]})
    proxy = FaultProxy(f"{upstream.url}/v1/")
    front = None
    try:
        progress("starting the front")
        front = StartedServer({
            "routing": {"aggregation": "best", "max_wait_ms": 2, "stall_timeout_s": 5},
            "server": {"cache_ttl_s": 0, "stream_fallback": "restart"},
            "experts": [{"name": "far", "backend": "openai", "base_url": proxy.base_url, "model": "sim-a",
                         "max_concurrency": concurrency, "backoff_s": 0.05},
                        {"name": "near", **SIM}]})
        progress("starting a front with the upstream as its one expert, for time to first token")
        plain = StartedServer({"routing": {"aggregation": "best", "max_wait_ms": 2}, "server": {"cache_ttl_s": 0},
                               "experts": [{"name": "direct", "backend": "openai", "base_url": f"{upstream.url}/v1",
                                            "model": "sim-a"}]})
        progress(f"time to first token and call overhead, {n} alternated pairs each")
        try:
            overheads(upstream.url, plain.url, n, report)
        finally:
            plain.stop()
        progress(f"{faulted_n} streamed requests under faults")
        proxy.app.state.most_in_flight = 0
        proxy.app.state.chance = _chance(random.Random(seed))
        asyncio.run(faulted(front.url, faulted_n, concurrency, report))
        report.proxy = {**proxy.app.state.faults, "most in flight": proxy.app.state.most_in_flight,
                        "closed early": proxy.app.state.closed_early}
    finally:
        if front is not None:
            front.stop()
        proxy.stop()
        upstream.stop()
    return report
