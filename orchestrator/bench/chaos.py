"""``concilium bench chaos``: streaming load with real faults, and an account of every client.

It starts a redis-server (append-only file on, as a deployment would run it) and two ``concilium serve`` API
processes that share it, each with its own local Ray and two simulated experts that stream a word per decode
step. Then, for ``duration_s``:
- ``streams`` clients stream chat completions with the official ``openai`` client, one after another;
- ``queries`` clients send plain ``/v1/query`` requests; ``jobs`` clients submit jobs;
- the faults, in order: an expert actor of the first server is killed (SIGKILL) while it streams; an expert
  actor of the second is stalled (SIGSTOP for ``stall_s``, then SIGCONT); redis-server is killed and started
  again on its port; the first API process is killed with its local Ray.

Clients reach the servers as a load balancer would send them: a request refused at connect (its server is gone)
goes to the other server; a request cut after it was sent is not retried. Every request ends in one outcome:
``complete``, ``sse_error`` (an error event in the documented shape, after the stream began), ``http_error``
(a 4xx or 5xx in the documented shape), ``cut`` (the connection dropped mid-request: allowed only on the killed
API process) or ``hung`` (no end before the client's deadline). Afterwards every job is polled on the surviving
server until it ends. Each client uses one key, so ``/v1/usage`` must equal the costs of the answers served.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

from orchestrator import env
from orchestrator.api.security import digest
from orchestrator.bench.load import LoadError, StartedServer

KEY = "chaos-" + os.urandom(8).hex()
"""Every client's key: its usage is what the clients were served."""
PROMPT = "Tell me a short story about a lighthouse."


@dataclass
class Outcome:
    kind: str
    """stream, query or job."""
    result: str
    server: str
    detail: str = ""
    cost_usd: float = 0.0


@dataclass
class ChaosReport:
    outcomes: list[Outcome] = field(default_factory=list)
    faults: list[tuple[float, str]] = field(default_factory=list)
    jobs: dict[str, str] = field(default_factory=dict)
    """Job id → its final state (done, failed, or lost when it never ended)."""
    job_costs: float = 0.0
    usage_usd: float = 0.0
    killed: str = ""
    """The URL of the API process that was killed: a ``cut`` there is the kill, anywhere else a failure."""

    def counts(self) -> Counter:
        return Counter((o.kind, o.result) for o in self.outcomes)

    @property
    def hung(self) -> int:
        return sum(o.result == "hung" for o in self.outcomes)

    @property
    def stray_cuts(self) -> int:
        return sum(o.result == "cut" and o.server != self.killed for o in self.outcomes)

    @property
    def lost_jobs(self) -> int:
        return sum(state not in ("done", "failed") for state in self.jobs.values())

    @property
    def served_usd(self) -> float:
        """What the clients got: whole answers, answers fetched after an interrupted stream, and done jobs."""
        return sum(o.cost_usd for o in self.outcomes) + self.job_costs

    @property
    def kill_slack_usd(self) -> float:
        """What usage may hold beyond what was served: an answer counted, then cut by the API process's kill
        before its last chunk left (one request's cost for each cut there)."""
        costs = [o.cost_usd for o in self.outcomes if o.cost_usd > 0]
        cut = sum(o.result == "cut" and o.server == self.killed for o in self.outcomes)
        return cut * max(costs, default=0.0)

    @property
    def usage_matches(self) -> bool:
        """Usage equals what was served to the cent, or exceeds it by no more than the kill's cut answers (never
        less: no served answer goes uncounted)."""
        extra = round(self.usage_usd - self.served_usd, 6)
        return round(self.usage_usd, 2) == round(self.served_usd, 2) or 0 <= extra <= self.kill_slack_usd

    @property
    def ok(self) -> bool:
        return self.hung == 0 and self.stray_cuts == 0 and self.lost_jobs == 0 and self.usage_matches


class RedisProcess:
    """A redis-server on a loopback port (a free one, or ``port`` to come back where its clients expect it),
    stopped, killed and started again by its PID. ``append_only``: its data survives a restart, as a deployment
    would run it; without, nothing is written to disk (the tests' throwaway servers)."""

    def __init__(self, folder: Path, port: int | None = None, append_only: bool = True) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise LoadError("redis-server is not installed: apt-get install -y redis-server (make test does)")
        self.folder, self.port, self.append_only = folder, port or env.free_port(), append_only
        self.url = f"redis://{env.LOOPBACK}:{self.port}/0"
        folder.mkdir(parents=True, exist_ok=True)
        self.start()

    def start(self) -> None:
        durable = ["--appendonly", "yes", "--appendfsync", "always"] if self.append_only else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [self.binary, "--bind", env.LOOPBACK, "--port", str(self.port), "--save", "", *durable,
             "--dir", str(self.folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection((env.LOOPBACK, self.port), timeout=0.5).close()
                return
            time.sleep(0.05)
        raise LoadError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@dataclass
class ChaosSettings:
    duration_s: float = 40.0
    streams: int = 32
    queries: int = 4
    jobs: int = 4
    max_tokens: int = 24
    step_s: float = 0.05
    stall_s: float = 6.0
    timeout_s: float = 20.0
    """Each server's request_timeout_s; clients give up (``hung``) at twice it."""


def chaos_config(redis_url: str, s: ChaosSettings) -> dict:
    """Two simulated experts priced at $0.50 per 1k tokens; an expert call times out before the stall ends."""
    sim = {"backend": "simulated", "memory_gb": 0.1, "load_s": 0.0, "step_s": s.step_s, "cost_per_1k_tokens": 0.5}
    return {"routing": {"aggregation": "best", "k": 1, "max_wait_ms": 5, "expert_timeout_s": s.stall_s * 2 / 3},
            "server": {"redis_url": redis_url, "api_key_sha256": [digest(KEY)], "cache_ttl_s": 0,
                       "request_timeout_s": s.timeout_s},
            "experts": [{"name": "sim-a", **sim}, {"name": "sim-b", **sim}]}


class Balancer:
    """The servers a client may use; one refused at connect is dropped, as a load balancer drops a dead backend."""

    def __init__(self, urls: list[str]) -> None:
        self.live, self.turn = list(urls), 0

    def next(self) -> str:
        self.turn += 1
        return self.live[self.turn % len(self.live)]

    def dead(self, url: str) -> None:
        if url in self.live and len(self.live) > 1:
            self.live.remove(url)


Attempt = Callable[[str], Awaitable[Outcome]]


async def _balanced(balancer: Balancer, attempt: Attempt) -> Outcome:
    for _ in range(3):
        url = balancer.next()
        try:
            return await attempt(url)
        except (httpx.ConnectError, openai.APIConnectionError) as exc:
            if isinstance(exc, openai.APIConnectionError) and not isinstance(exc.__cause__, httpx.ConnectError):
                return Outcome("?", "cut", url, str(exc)[:200])
            balancer.dead(url)
    return Outcome("?", "cut", url, "no server accepted the connection")


async def _stream(url: str, max_tokens: int, timeout_s: float) -> Outcome:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=timeout_s)
    try:
        stream = await client.chat.completions.create(model="concilium", max_tokens=max_tokens, stream=True,
                                                      messages=[{"role": "user", "content": PROMPT}])
        cost, answer_id = None, None
        async for chunk in stream:
            extra = (chunk.model_extra or {}).get("concilium") or {}
            answer_id = answer_id or extra.get("id")
            cost = extra.get("cost_usd", cost)
        if cost is None:
            return Outcome("stream", "cut", url, "the stream ended without its finishing chunk")
        return Outcome("stream", "complete", url, cost_usd=float(cost))
    except openai.APITimeoutError:
        return Outcome("stream", "hung", url, f"no end within {timeout_s:g} s")
    except openai.APIStatusError as exc:
        return Outcome("stream", "http_error", url, f"{exc.status_code}: {exc.message[:160]}")
    except openai.APIConnectionError:
        raise
    except openai.APIError as exc:
        shaped = isinstance(exc.body, dict) and {"type", "message"} <= set(exc.body)
        outcome = Outcome("stream", "sse_error" if shaped else "cut", url, str(exc.message)[:200])
        if shaped and exc.body["type"] == "stream_interrupted":  # the answer exists: fetch it, as a client would
            outcome.cost_usd = await _answer_cost(url, answer_id)
        return outcome
    finally:
        await client.close()


async def _answer_cost(url: str, answer_id: str | None) -> float:
    async with httpx.AsyncClient(headers={"authorization": f"Bearer {KEY}"}, timeout=30) as http:
        r = await http.get(f"{url}/v1/answers/{answer_id}")
    return float(r.json()["cost_usd"]) if r.status_code == 200 else 0.0


async def _query(http: httpx.AsyncClient, url: str, max_tokens: int) -> Outcome:
    try:
        r = await http.post(f"{url}/v1/query", json={"query": PROMPT, "max_tokens": max_tokens})
    except httpx.TimeoutException:
        return Outcome("query", "hung", url)
    except (httpx.ReadError, httpx.RemoteProtocolError) as exc:
        return Outcome("query", "cut", url, repr(exc)[:200])
    if r.status_code == 200:
        return Outcome("query", "complete", url, cost_usd=float(r.json()["cost_usd"]))
    shaped = "error" in r.json() if r.headers.get("content-type", "").startswith("application/json") else False
    return Outcome("query", "http_error" if shaped else "cut", url, f"{r.status_code}: {r.text[:160]}")


async def _submit(http: httpx.AsyncClient, url: str, report: ChaosReport) -> Outcome:
    try:
        r = await http.post(f"{url}/v1/jobs", json={"query": PROMPT, "max_tokens": 8})
    except httpx.TimeoutException:
        return Outcome("job", "hung", url)
    except (httpx.ReadError, httpx.RemoteProtocolError) as exc:
        return Outcome("job", "cut", url, repr(exc)[:200])
    if r.status_code == 202 or r.status_code == 200:
        report.jobs[r.json()["id"]] = "submitted"
        return Outcome("job", "accepted", url)
    return Outcome("job", "http_error", url, f"{r.status_code}: {r.text[:160]}")


async def _experts(url: str) -> dict[str, int]:
    async with httpx.AsyncClient(headers={"authorization": f"Bearer {KEY}"}, timeout=30) as http:
        return {e["name"]: e["pid"] for e in (await http.get(f"{url}/v1/experts")).json() if e.get("pid")}


async def _faults(servers: list[StartedServer], redis: RedisProcess, s: ChaosSettings, report: ChaosReport,
                  t0: float) -> None:
    """The four faults, spread over the run's first three quarters."""
    def log(what: str) -> None:
        report.faults.append((round(time.monotonic() - t0, 1), what))

    step = s.duration_s / 5
    await asyncio.sleep(step)
    pid = (await _experts(servers[0].url))["sim-a"]
    os.kill(pid, signal.SIGKILL)
    log(f"killed sim-a's actor on the first server (pid {pid}) while it streamed")
    await asyncio.sleep(step)
    pid = (await _experts(servers[1].url))["sim-b"]
    os.kill(pid, signal.SIGSTOP)
    log(f"stalled sim-b's actor on the second server (pid {pid}, SIGSTOP)")
    await asyncio.sleep(s.stall_s)
    os.kill(pid, signal.SIGCONT)
    log("sim-b's actor goes on (SIGCONT)")
    await asyncio.sleep(max(0.0, step - s.stall_s))
    await asyncio.to_thread(redis.kill)
    log("killed redis-server")
    await asyncio.sleep(2)
    await asyncio.to_thread(redis.start)
    log("started redis-server again (its append-only file kept the data)")
    await asyncio.sleep(step)
    os.killpg(servers[0].proc.pid, signal.SIGKILL)
    report.killed = servers[0].url
    log("killed the first API process and its local Ray (SIGKILL to its process group)")


async def _clients(balancer: Balancer, s: ChaosSettings, report: ChaosReport, stop: float) -> None:
    limits = httpx.Limits(max_connections=s.queries + s.jobs + 4)
    async with httpx.AsyncClient(headers={"authorization": f"Bearer {KEY}"}, timeout=2 * s.timeout_s,
                                 limits=limits) as http:
        async def loop(attempt: Attempt, kind: str) -> None:
            while time.monotonic() < stop:
                outcome = await _balanced(balancer, attempt)
                outcome.kind = kind
                report.outcomes.append(outcome)
                if kind == "job" or outcome.result != "complete":
                    await asyncio.sleep(1.0)  # a job client submits about one a second

        await asyncio.gather(
            *(loop(lambda url: _stream(url, s.max_tokens, 2 * s.timeout_s), "stream") for _ in range(s.streams)),
            *(loop(lambda url: _query(http, url, s.max_tokens), "query") for _ in range(s.queries)),
            *(loop(lambda url: _submit(http, url, report), "job") for _ in range(s.jobs)))


async def _settle_jobs(url: str, report: ChaosReport, wait_s: float) -> None:
    """Poll every job on the surviving server until it ends; one that never does is lost."""
    deadline = time.monotonic() + wait_s
    async with httpx.AsyncClient(headers={"authorization": f"Bearer {KEY}"}, timeout=30) as http:
        while time.monotonic() < deadline:
            for job_id in [j for j, state in report.jobs.items() if state not in ("done", "failed")]:
                r = await http.get(f"{url}/v1/jobs/{job_id}")
                if r.status_code == 200 and r.json()["status"] in ("done", "failed"):
                    report.jobs[job_id] = r.json()["status"]
                    if r.json()["status"] == "done":
                        report.job_costs += float(r.json()["result"]["cost_usd"])
            if all(state in ("done", "failed") for state in report.jobs.values()):
                return
            await asyncio.sleep(1.0)
        for job_id, state in report.jobs.items():
            if state not in ("done", "failed"):
                report.jobs[job_id] = "lost"


async def run_chaos(s: ChaosSettings, progress: Callable[[str], None]) -> ChaosReport:
    folder = Path(tempfile.mkdtemp(prefix="concilium-chaos-"))
    redis = RedisProcess(folder)
    servers: list[StartedServer] = []
    report = ChaosReport()
    try:
        for _ in range(2):
            progress(f"starting API process {len(servers) + 1} of 2")
            servers.append(await asyncio.to_thread(StartedServer, chaos_config(redis.url, s)))
        progress(f"{s.streams} streaming clients, {s.queries} query clients and {s.jobs} job clients, with faults")
        t0 = time.monotonic()
        await asyncio.gather(_clients(Balancer([x.url for x in servers]), s, report, t0 + s.duration_s),
                             _faults(servers, redis, s, report, t0))
        progress(f"waiting for {len(report.jobs)} jobs")
        await _settle_jobs(servers[1].url, report, wait_s=90)
        async with httpx.AsyncClient(headers={"authorization": f"Bearer {KEY}"}, timeout=30) as http:
            report.usage_usd = float((await http.get(f"{servers[1].url}/v1/usage")).json()["cost_usd"])
    finally:
        for server in servers:
            with contextlib.suppress(ProcessLookupError):
                server.stop()
        with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
            redis.kill()
    return report
