"""Experts served elsewhere behind an OpenAI-compatible API (vLLM, TGI, a hosted model, another Concilium).

Each row of a batch is one streamed ``chat/completions`` request, all sent at once: the remote server batches,
so holding rows back here would only add latency. While the expert is loaded, its actor keeps one event loop on
a thread of its own (``loop_thread``), one ``httpx.AsyncClient`` on it (a pool of kept-alive connections), and
the expert's limits (``remote_limits``). A row:
- waits for room under its limits, then streams; each delta goes to the request's token stream as it arrives;
- on a 429, a 5xx, a refused or dropped connection or a malformed line before its first token reached a client,
  is tried again (``retry``: backoff with jitter, ``Retry-After`` honoured) inside its deadline (``timeout_s``);
- once a token has reached a client, fails as it is: a retry would send that text twice;
- ends early when its client goes away, which closes the upstream stream;
- takes its usage from the stream's last chunk (``stream_options.include_usage``), or else counts it: the
  deltas, and the prompt's bound (``count_tokens``). ``meta`` says which, and how many retries it took.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Callable

import httpx

from workers.backends import OnDelta, count_tokens
from workers.backends.loop_thread import LoopThread
from workers.backends.remote_limits import RemoteLimits
from workers.backends.retry import RETRYABLE_STATUS, RetryPolicy, retry_after_s
from workers.config import OpenAIExpert
from workers.types import Completion, Prompt, SamplingParams, ToolCall, ToolCallDelta

CANCEL_POLL_S = 0.05
"""How often a streaming row looks whether its client is still there."""


class RemoteExpertError(RuntimeError):
    """The remote endpoint refused or failed a request, for good."""


class _TryAgain(Exception):
    """A failure before any token reached a client: the row may be tried again."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class OpenAIBackend:
    device = "remote"
    concurrent = True
    """Calls overlap in the actor: the remote server batches, and the limits are the actor's own."""

    def __init__(self, config: OpenAIExpert) -> None:
        self.config = config
        self.headers: dict[str, str] | None = None
        self.policy = RetryPolicy(config.retries + 1, config.backoff_s, config.backoff_max_s)
        self._loop: LoopThread | None = None
        self._client: httpx.AsyncClient | None = None
        self._limits: RemoteLimits | None = None
        self._rng = random.Random()

    def _api_key(self) -> str | None:
        if self.config.api_key_env is None:
            return None
        key = os.environ.get(self.config.api_key_env)
        if not key:
            raise RemoteExpertError(
                f"{self.config.name}: environment variable {self.config.api_key_env} is not set"
            )
        return key

    def load(self) -> None:
        """Check that the endpoint answers and serves the configured model, then open the connection pool."""
        key = self._api_key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        url = self.config.base_url.rstrip("/") + "/models"
        try:
            resp = httpx.get(url, headers=headers, timeout=self.config.timeout_s)
        except httpx.HTTPError as exc:
            raise RemoteExpertError(f"{self.config.name}: cannot reach {url}: {exc}") from exc
        if resp.status_code != 200:
            raise RemoteExpertError(f"{self.config.name}: {url} answered {resp.status_code}")
        served = {m.get("id") for m in resp.json().get("data", [])}
        if self.config.model not in served:
            raise RemoteExpertError(
                f"{self.config.name}: {url} does not serve {self.config.model!r} (it serves {sorted(served)})"
            )
        self.headers = headers
        self._loop = LoopThread(f"remote-{self.config.name}")
        self._client, self._limits = self._loop.run(self._open())

    async def _open(self) -> tuple[httpx.AsyncClient, RemoteLimits]:
        c = self.config
        limits = httpx.Limits(max_connections=c.max_concurrency, max_keepalive_connections=c.max_concurrency,
                              keepalive_expiry=c.keepalive_s)
        client = httpx.AsyncClient(base_url=c.base_url, headers=self.headers, limits=limits, timeout=c.timeout_s)
        return client, RemoteLimits(c.max_concurrency, c.requests_per_minute, c.tokens_per_minute)

    def unload(self) -> None:
        if self._loop is not None:
            self._loop.run(self._client.aclose())
            self._loop.stop()
        self.headers = self._loop = self._client = self._limits = None

    def estimate_memory_bytes(self) -> int:
        return 0

    def memory_bytes(self) -> int:
        return 0

    def generate(self, prompts: list[Prompt], params: SamplingParams, on_delta: OnDelta | None = None,
                 cancelled: Callable[[int], bool] | None = None) -> list[Completion]:
        """Every row at once, each its own request: a row that failed for good comes back with its ``error`` and
        the others stand; the call fails only when every row failed."""
        if self._loop is None:
            raise RuntimeError(f"expert {self.config.name} is not loaded")
        rows = [self._loop.submit(self._row(row, p, params, on_delta, cancelled)) for row, p in enumerate(prompts)]
        errors = [r.exception() for r in rows]
        if all(e is not None for e in errors):
            raise errors[0]
        return [r.result() if e is None else Completion("", 0, 0, "error", error=str(e)) for r, e in zip(rows, errors)]

    def body(self, prompt: Prompt, params: SamplingParams) -> dict[str, object]:
        body: dict[str, object] = {"model": self.config.model, "messages": prompt.as_messages(),
                                   "max_tokens": params.max_new_tokens, "temperature": params.temperature,
                                   "top_p": params.top_p, "stream": True, "stream_options": {"include_usage": True}}
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if prompt.tools:
            body["tools"] = list(prompt.tools)
            if prompt.tool_choice is not None:
                body["tool_choice"] = prompt.tool_choice
        return body

    async def _row(self, row: int, prompt: Prompt, params: SamplingParams, on_delta: OnDelta | None,
                   cancelled: Callable[[int], bool] | None) -> Completion:
        deadline = time.monotonic() + self.config.timeout_s
        bound = count_tokens(self, [prompt])[0]
        stream = _RowStream(self, row, bound, on_delta, cancelled)
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._limits.admit(bound + params.max_new_tokens) as used:
                    completion = await stream.run(self.body(prompt, params), deadline)
                    used(completion.prompt_tokens + completion.completion_tokens)
                completion.meta["retries"] = attempt - 1
                return completion
            except _TryAgain as exc:
                wait = self.policy.next_wait(attempt, exc.retry_after, deadline, self._rng)
                if wait is None:
                    raise RemoteExpertError(f"{self.config.name}: {exc} (after {attempt} tries)") from None
                await asyncio.sleep(wait)

    def describe(self) -> dict[str, object]:
        return {"base_url": self.config.base_url, "model": self.config.model}


class _RowStream:
    """One try of one row: its request, its stream read line by line, and what has reached the client."""

    def __init__(self, backend: OpenAIBackend, row: int, prompt_bound: int, on_delta: OnDelta | None,
                 cancelled: Callable[[int], bool] | None) -> None:
        self.name, self.client = backend.config.name, backend._client
        self.row, self.prompt_bound, self.on_delta, self.cancelled = row, prompt_bound, on_delta, cancelled
        self.delivered = False
        """Whether a token of this row has gone to a client: after that, no retry."""
        self.left = False
        """Whether the row's client went away (its stream then closed here)."""

    def _failed(self, reason: str, retry_after: float | None = None) -> Exception:
        if self.delivered:
            return RemoteExpertError(f"{self.name}: {reason} after the first token reached the client; not retried")
        return _TryAgain(reason, retry_after)

    async def run(self, body: dict[str, object], deadline: float) -> Completion:
        try:
            async with self.client.stream("POST", "chat/completions", json=body,
                                          timeout=max(0.1, deadline - time.monotonic())) as resp:
                if resp.status_code != 200:
                    detail = (await resp.aread())[:200].decode(errors="replace")
                    if resp.status_code in RETRYABLE_STATUS:
                        raise _TryAgain(f"the endpoint answered {resp.status_code}",
                                        retry_after_s(resp.headers.get("retry-after")))
                    raise RemoteExpertError(f"{self.name}: endpoint answered {resp.status_code}: {detail}")
                return await self._read(resp)
        except httpx.TransportError as exc:  # refused, dropped, timed out, or a broken HTTP stream
            raise self._failed(f"the request failed ({type(exc).__name__})") from None

    async def _read(self, resp: httpx.Response) -> Completion:
        pieces: list[str] = []
        state = {"usage": None, "finish": "stop", "calls": {}}
        watch = asyncio.create_task(self._watch(resp)) if self.cancelled is not None else None
        try:
            async for line in resp.aiter_lines():
                if self._take(line, pieces, state):
                    break
        except (httpx.HTTPError, httpx.StreamError):
            if not self.left:
                raise
        finally:
            if watch is not None:
                watch.cancel()
        if self.left:
            state["finish"] = "cancelled"
        usage = state["usage"]
        if usage:
            prompt, completion, source = int(usage["prompt_tokens"]), int(usage["completion_tokens"]), "reported"
        else:
            prompt, completion, source = self.prompt_bound, len(pieces), "counted"
        calls = [ToolCall(c["id"], c["name"], c["arguments"]) for _, c in sorted(state["calls"].items())]
        return Completion(text="".join(pieces).strip(), prompt_tokens=prompt, completion_tokens=completion,
                          finish_reason=state["finish"], meta={"usage": source}, tool_calls=calls)

    async def _watch(self, resp: httpx.Response) -> None:
        """Close the upstream stream as soon as the row's client has gone, even while the server is silent."""
        while not self.cancelled(self.row):
            await asyncio.sleep(CANCEL_POLL_S)
        self.left = True
        await resp.aclose()

    def _take(self, line: str, pieces: list[str], state: dict) -> bool:
        """One line of the stream into the row; True at its end (``[DONE]``)."""
        if not line.strip() or line.startswith(":"):
            return False
        data = line[5:].strip() if line.startswith("data:") else None
        if data == "[DONE]":
            return True
        chunk = _json(data)
        if chunk is None or "error" in chunk:
            raise self._failed("the stream sent " + ("an error event" if chunk else f"a malformed line {line[:60]!r}"))
        state["usage"] = chunk.get("usage") or state["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                pieces.append(text)
                self._deliver(text)
            for item in delta.get("tool_calls") or []:
                self._deliver(_tool_piece(item, state["calls"]))
            state["finish"] = choice.get("finish_reason") or state["finish"]
        return False

    def _deliver(self, piece: str | ToolCallDelta) -> None:
        if self.on_delta is not None:
            self.on_delta(self.row, piece)
            self.delivered = True


def _tool_piece(item: dict, calls: dict[int, dict[str, str]]) -> ToolCallDelta:
    """One ``delta.tool_calls`` item added to the call it continues (by its ``index``), and passed on as it came."""
    function = item.get("function") or {}
    index = int(item.get("index", 0))
    call = calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
    call["id"] = item.get("id") or call["id"]
    call["name"] = function.get("name") or call["name"]
    call["arguments"] += function.get("arguments") or ""
    return ToolCallDelta(index, item.get("id"), function.get("name"), function.get("arguments") or "")


def _json(data: str | None) -> dict | None:
    if data is None:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
