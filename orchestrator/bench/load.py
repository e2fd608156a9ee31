"""``concilium bench load``: many concurrent clients, and an account of every request.

Each request carries its own ``x-request-id``; the server echoes it. A request
ends in exactly one outcome:
- ``answered``: 200, the echoed id is the one sent, and, against the replay
  server this command starts, every expert's answer is the one recorded for
  that request's question (so no answer reached the wrong request);
- ``rejected``: 429 (rate limit or a full queue, with Retry-After) or 503, in
  the documented error shape;
- ``lost``: anything else: a dropped connection, a timeout, a 5xx, a wrong
  echoed id or a wrong answer.

``duplicated`` counts request ids or answer ids seen more than once. Clients do
not retry: a retry would be a new request and blur the accounting. One warm-up
request, outside the count and the clock, loads the experts first, so that
the percentiles describe serving rather than a cold start.

The run is bounded: ``clients × requests`` requests at most, a per-request
timeout, and a time limit for the whole run (what is still out then is
counted as ``unfinished``). Traffic stays on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import yaml

from orchestrator import env
from orchestrator.client import wait_until_ready
from routers.vocabulary import Aggregation
from workers.errors import UserError
from workers.recorded import load_recorded

LOOPBACK_HOSTS = {env.LOOPBACK, "localhost", "::1", "[::1]"}
REPLAY_MODELS = ("gemini-1.5-pro-002", "Meta-Llama-3_1-70B-Instruct", "Qwen1.5-72B-Chat")


class LoadError(UserError, ValueError):
    """A load test that cannot run as asked (a remote URL, a server that would not start)."""


@dataclass
class Outcome:
    request_id: str
    client: int
    outcome: str
    status: int | None
    latency_s: float
    detail: str = ""
    answer_id: str | None = None


@dataclass
class LoadReport:
    url: str
    clients: int
    requests_per_client: int
    wall_s: float
    sent: int
    counts: dict[str, int]
    duplicated: int
    p50_ms: float | None
    p99_ms: float | None
    answered_per_s: float
    checked_answers: bool
    warmup_status: int | None
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def accounted(self) -> bool:
        """Answered plus rejected is exactly the set sent: nothing lost, unfinished or duplicated."""
        return (self.counts.get("answered", 0) + self.counts.get("rejected", 0) == self.sent
                and self.duplicated == 0)


def _key(text: str) -> str:
    return " ".join(text.split())


def require_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host not in LOOPBACK_HOSTS:
        raise LoadError(f"--url {url}: the load test only targets loopback (127.0.0.1 or localhost), not {host!r}")


def replay_server_config(data: Path, max_pending: int) -> dict:
    """Three replay experts over recorded MMLU-Pro answers, the cache off so every request is computed."""
    recorded = load_recorded(data)
    models = [m for m in REPLAY_MODELS if m in recorded.models] or list(recorded.models[:3])
    return {
        "routing": {"aggregation": Aggregation.VOTE.value, "max_wait_ms": 5, "max_batch": 32, "max_pending": max_pending},
        "server": {"cache_ttl_s": 0},
        "experts": [{"name": f"replay-{i}", "backend": "replay", "path": str(data), "model": m}
                    for i, m in enumerate(models)],
    }


class StartedServer:
    """``concilium serve`` in its own process group on a free loopback port, stopped by its PID."""

    def __init__(self, config: dict, ready_timeout_s: float = 240) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="concilium-load-"))
        (self.folder / "config.yaml").write_text(yaml.safe_dump(config))
        port = env.free_port()
        self.url = f"http://{env.LOOPBACK}:{port}"
        self.log = (self.folder / "serve.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "serve", "--port", str(port),
             "--config", str(self.folder / "config.yaml")],
            stdout=self.log, stderr=self.log, start_new_session=True,
        )
        try:
            wait_until_ready(self.url, ready_timeout_s, lambda: self.proc.poll() is None)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise LoadError(f"{exc}; its log: {self.folder / 'serve.log'}") from None

    def stop(self) -> None:
        stop_group(self.proc, 60)
        self.log.close()


def stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    """Stop a process started in a session of its own, and everything it started: SIGTERM to its group, then
    SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def expected_answers(config: dict) -> dict[str, dict[str, str]]:
    """Question text → expert → the answer its replay backend must give (only questions with a recorded one)."""
    out: dict[str, dict[str, str]] = {}
    for expert in config["experts"]:
        data = load_recorded(Path(expert["path"]))
        column = data.model_index(expert["model"])
        for r in data.records:
            if r.pred and r.pred[column]:  # later records win, as in the replay backend's lookup
                out.setdefault(_key(r.text), {})[expert["name"]] = f"The answer is ({r.pred[column]})."
    return {q: a for q, a in out.items() if len(a) == len(config["experts"])}


def _classify(rid: str, response: httpx.Response, expected: dict[str, str] | None) -> tuple[str, str, str | None]:
    """The outcome, a detail, and the answer id."""
    try:
        body = response.json()
    except ValueError:
        return "lost", f"HTTP {response.status_code} with a body that is not JSON", None
    if response.status_code in (429, 503):
        shaped = isinstance(body, dict) and {"type", "message"} <= set(body.get("error", {}))
        has_retry = response.status_code == 503 or "retry-after" in response.headers
        if shaped and has_retry:
            return "rejected", body["error"]["type"], None
        return "lost", f"HTTP {response.status_code} without the error shape or Retry-After", None
    if response.status_code != 200:
        return "lost", f"HTTP {response.status_code}: {str(body)[:200]}", None
    if response.headers.get("x-request-id") != rid:
        return "lost", f"echoed request id {response.headers.get('x-request-id')!r}", None
    if expected is not None:
        got = {a["expert"]: a["text"] for a in body.get("answers", [])}
        if got != expected:
            return "lost", f"answers {got} are not the ones recorded for this question", body.get("id")
    return "answered", "", body.get("id")


async def _client(
    http: httpx.AsyncClient, client: int, n: int, questions: list[str], expected: dict[str, dict[str, str]] | None,
    outcomes: list[Outcome], headers: dict[str, str],
) -> None:
    for j in range(n):
        rid = f"load-{client:03d}-{j:03d}"
        question = questions[(client * n + j) % len(questions)]
        t0 = time.perf_counter()
        try:
            r = await http.post("/v1/query", json={"query": question, "max_tokens": 8},
                                headers={**headers, "x-request-id": rid})
            want = expected.get(_key(question)) if expected is not None else None
            kind, detail, answer_id = _classify(rid, r, want)
            outcomes.append(Outcome(rid, client, kind, r.status_code, time.perf_counter() - t0, detail, answer_id))
        except httpx.HTTPError as exc:
            outcomes.append(Outcome(rid, client, "lost", None, time.perf_counter() - t0,
                                    f"{type(exc).__name__}: {exc}"))


async def run_load(
    url: str, clients: int, requests: int, questions: list[str], expected: dict[str, dict[str, str]] | None,
    time_limit_s: float, request_timeout_s: float, api_key: str | None, progress: Callable[[str], None],
) -> LoadReport:
    outcomes: list[Outcome] = []
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=request_timeout_s, limits=limits) as http:
        try:
            warm = await http.post("/v1/query", json={"query": questions[0], "max_tokens": 8},
                                   headers={**headers, "x-request-id": "warmup"})
            warmup_status: int | None = warm.status_code
        except httpx.HTTPError:
            warmup_status = None
        started = time.perf_counter()
        tasks = [asyncio.create_task(_client(http, c, requests, questions, expected, outcomes, headers))
                 for c in range(clients)]

        async def report_progress() -> None:
            while True:
                await asyncio.sleep(1)
                progress(f"{len(outcomes)}/{clients * requests} requests done")

        ticker = asyncio.create_task(report_progress())
        _, still = await asyncio.wait(tasks, timeout=time_limit_s)
        ticker.cancel()
        for t in still:
            t.cancel()
        await asyncio.gather(*still, return_exceptions=True)
    wall = time.perf_counter() - started
    sent_ids = [f"load-{c:03d}-{j:03d}" for c in range(clients) for j in range(requests)]
    seen = Counter(o.request_id for o in outcomes)
    answer_ids = Counter(o.answer_id for o in outcomes if o.answer_id)
    duplicated = sum(n - 1 for n in seen.values() if n > 1) + sum(n - 1 for n in answer_ids.values() if n > 1)
    outcomes += [Outcome(rid, int(rid.split("-")[1]), "unfinished", None, wall, "past the time limit")
                 for rid in sent_ids if rid not in seen]
    counts = dict(Counter(o.outcome for o in outcomes))
    latencies = [o.latency_s for o in outcomes if o.outcome == "answered"]
    p50 = statistics.median(latencies) * 1000 if latencies else None
    p99 = statistics.quantiles(latencies, n=100, method="inclusive")[98] * 1000 if len(latencies) > 1 else p50
    return LoadReport(url, clients, requests, wall, len(sent_ids), counts, duplicated, p50, p99,
                      counts.get("answered", 0) / wall, expected is not None, warmup_status,
                      sorted(outcomes, key=lambda o: o.request_id))


def write_report(report: LoadReport, path: Path) -> None:
    data = asdict(report)
    data["accounted"] = report.accounted
    path.write_text(json.dumps(data, indent=1))
