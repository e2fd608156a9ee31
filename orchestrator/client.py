"""The Python client SDK: ``Client`` and ``AsyncClient`` for a Concilium server.

Installs with the bare package (httpx and pydantic only) and imports neither
torch nor ray, so an application can call Concilium without the server's
dependencies. Responses are the server's own pydantic models.

Requests that were refused for load (429, 503) or never reached the server
(a refused connection) are retried with exponential backoff, honouring
``Retry-After``; any other error raises ``ConciliumError`` with the server's
error type and message.

    from orchestrator.client import Client
    with Client("http://127.0.0.1:8000") as c:
        r = c.query("What is the capital of France?", max_tokens=32)
        print(r.answer, r.routing.experts)
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
from pydantic import BaseModel

from orchestrator.api.schemas import (
    DEFAULT_MODEL,
    CacheCleared,
    ChatResponse,
    ExpertOut,
    FeedbackOut,
    JobOut,
    KeyUsage,
    ModelList,
    QueryResponse,
    RouteResponse,
    Routing,
)

RETRY_STATUS = (429, 503)
FINAL_TYPES = ("budget_exceeded",)
"""429s not worth retrying: a spent daily budget renews at UTC midnight, not in seconds."""
DEFAULT_URL = "http://127.0.0.1:8000"


def wait_until_ready(base_url: str, timeout_s: float, alive: Callable[[], bool] = lambda: True,
                     path: str = "/readyz") -> None:
    """Poll ``GET {path}`` until it answers 200: for scripts that start a server and then use it.

    ``alive`` says whether the server's process still runs, so that a server that dies while starting fails
    at once instead of after the whole timeout. Raises RuntimeError (it died) or TimeoutError.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the server for {base_url} exited during start-up")
        try:
            if httpx.get(f"{base_url}{path}", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base_url} was not ready after {timeout_s:g} s")


class ConciliumError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(f"{status} {kind}: {message}")
        self.status, self.type, self.message = status, kind, message


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        err = response.json()["error"]
        kind, message = err["type"], err["message"]
    except (ValueError, KeyError, TypeError):
        kind, message = "http_error", response.text[:500]
    raise ConciliumError(response.status_code, kind, message)


def _error_type(response: httpx.Response) -> str | None:
    try:
        return response.json()["error"]["type"]
    except (ValueError, KeyError, TypeError):
        return None


def _delay(attempt: int, backoff_s: float, response: httpx.Response | None) -> float:
    retry_after = response.headers.get("retry-after") if response is not None else None
    if retry_after and retry_after.isdigit():
        return float(retry_after)
    return backoff_s * 2**attempt


def _body(**fields: Any) -> dict[str, Any]:
    """Options left as None are left out, so the server's defaults apply."""
    return {k: v for k, v in fields.items() if v is not None}


def _chat_body(messages: list[dict[str, str]] | str, model: str, stream: bool, options: dict[str, Any]) -> dict:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return _body(model=model, messages=messages, stream=stream or None, **options)


def _events(lines: Iterator[str]) -> Iterator[dict]:
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            return
        yield json.loads(data)


class ChatStream:
    """Iterates over a streamed chat's text pieces as the expert writes them. ``plan`` (from the first event)
    says which expert writes the answer; ``response`` holds the whole response at the end. An error after the
    stream began raises ConciliumError with status 200, the status the stream was sent with."""

    def __init__(self, events: Iterator[dict] | None = None) -> None:
        self._events = events if events is not None else iter(())
        self.plan: dict[str, Any] | None = None
        self.response: QueryResponse | None = None

    def feed(self, event: dict) -> str:
        """One event's text; records the plan and the response on the way."""
        if "error" in event:
            raise ConciliumError(200, event["error"].get("type", "error"), event["error"].get("message", ""))
        meta = event.get("concilium")
        if meta and "plan" in meta:
            self.plan = meta["plan"]
        elif meta:
            self.response = QueryResponse.model_validate(meta)
        return "".join(c.get("delta", {}).get("content") or "" for c in event.get("choices", []))

    def __iter__(self) -> Iterator[str]:
        for event in self._events:
            piece = self.feed(event)
            if piece:
                yield piece


class _Base:
    def __init__(self, base_url: str, api_key: str | None, retries: int, backoff_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.retries = retries
        self.backoff_s = backoff_s

    def _wait_before_retry(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before the next attempt, or None when this response is final (returned or raised).

        ``response`` is None when the connection was refused; the caller re-raises that on the last attempt.
        """
        if response is not None and (response.status_code not in RETRY_STATUS or attempt == self.retries
                                     or _error_type(response) in FINAL_TYPES):
            _raise_for(response)
            return None
        return _delay(attempt, self.backoff_s, response)


class Client(_Base):
    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout_s: float = 600.0,
                 retries: int = 3, backoff_s: float = 0.5, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(base_url, api_key, retries, backoff_s)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout_s, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, body: dict | None = None) -> httpx.Response:
        for attempt in range(self.retries + 1):
            response = None
            try:
                response = self._http.request(method, path, json=body)
            except httpx.ConnectError:
                if attempt == self.retries:
                    raise
            wait = self._wait_before_retry(attempt, response)
            if wait is None:
                return response
            time.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _get(self, path: str, model: type[BaseModel]) -> Any:
        return model.model_validate(self._send("GET", path).json())

    def _post(self, path: str, body: dict, model: type[BaseModel]) -> Any:
        return model.model_validate(self._send("POST", path, body).json())

    def query(self, query: str, **options: Any) -> QueryResponse:
        """Options: router, k, policy, aggregation, experts, budget, lambda, max_tokens, temperature."""
        return self._post("/v1/query", _body(query=query, **options), QueryResponse)

    def route(self, query: str, **options: Any) -> Routing:
        return self._post("/v1/route", _body(query=query, **options), RouteResponse).routing

    def chat(self, messages: list[dict[str, str]] | str, model: str = DEFAULT_MODEL, **options: Any) -> ChatResponse:
        return self._post("/v1/chat/completions", _chat_body(messages, model, False, options), ChatResponse)

    def chat_stream(self, messages: list[dict[str, str]] | str, model: str = DEFAULT_MODEL, **options: Any) -> ChatStream:
        body = _chat_body(messages, model, True, options)

        def events() -> Iterator[dict]:
            with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for(response)
                yield from _events(response.iter_lines())

        return ChatStream(events())

    def experts(self) -> list[ExpertOut]:
        return [ExpertOut.model_validate(e) for e in self._send("GET", "/v1/experts").json()]

    def models(self) -> ModelList:
        return self._get("/v1/models", ModelList)

    def submit_job(self, query: str, **options: Any) -> JobOut:
        return self._post("/v1/jobs", _body(query=query, **options), JobOut)

    def job(self, job_id: str) -> JobOut:
        return self._get(f"/v1/jobs/{job_id}", JobOut)

    def wait_job(self, job_id: str, timeout_s: float = 600.0, poll_s: float = 0.5) -> JobOut:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if job.status in ("done", "failed"):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout_s:g} s")
            time.sleep(poll_s)

    def feedback(self, answer_id: str, correct: bool | None = None, rating: float | None = None,
                 expert: str | None = None) -> FeedbackOut:
        body = _body(answer_id=answer_id, correct=correct, rating=rating, expert=expert)
        return self._post("/v1/feedback", body, FeedbackOut)

    def answer(self, answer_id: str) -> QueryResponse:
        """An answer this key received earlier (an admin key may read any)."""
        return self._get(f"/v1/answers/{answer_id}", QueryResponse)

    def usage(self, key_id: str | None = None) -> KeyUsage:
        """Today's usage and budget of this key, or (admin keys only) of ``key_id``."""
        return self._get("/v1/usage" + (f"?key_id={key_id}" if key_id else ""), KeyUsage)

    def clear_cache(self) -> CacheCleared:
        """Empty the exact and the semantic cache, for every replica (an admin key)."""
        return self._post("/v1/admin/cache/clear", {}, CacheCleared)


class AsyncClient(_Base):
    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout_s: float = 600.0,
                 retries: int = 3, backoff_s: float = 0.5, transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(base_url, api_key, retries, backoff_s)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=timeout_s,
                                       transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, path: str, body: dict | None = None) -> httpx.Response:
        for attempt in range(self.retries + 1):
            response = None
            try:
                response = await self._http.request(method, path, json=body)
            except httpx.ConnectError:
                if attempt == self.retries:
                    raise
            wait = self._wait_before_retry(attempt, response)
            if wait is None:
                return response
            await asyncio.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _get(self, path: str, model: type[BaseModel]) -> Any:
        return model.model_validate((await self._send("GET", path)).json())

    async def _post(self, path: str, body: dict, model: type[BaseModel]) -> Any:
        return model.model_validate((await self._send("POST", path, body)).json())

    async def query(self, query: str, **options: Any) -> QueryResponse:
        return await self._post("/v1/query", _body(query=query, **options), QueryResponse)

    async def route(self, query: str, **options: Any) -> Routing:
        return (await self._post("/v1/route", _body(query=query, **options), RouteResponse)).routing

    async def chat(self, messages: list[dict[str, str]] | str, model: str = DEFAULT_MODEL,
                   **options: Any) -> ChatResponse:
        return await self._post("/v1/chat/completions", _chat_body(messages, model, False, options), ChatResponse)

    async def chat_stream(self, messages: list[dict[str, str]] | str, model: str = DEFAULT_MODEL,
                          **options: Any) -> AsyncIterator[str]:
        body = _chat_body(messages, model, True, options)
        async with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code >= 400:
                await response.aread()
                _raise_for(response)
            state = ChatStream()
            async for line in response.aiter_lines():
                for event in _events(iter([line])):
                    piece = state.feed(event)
                    if piece:
                        yield piece

    async def experts(self) -> list[ExpertOut]:
        return [ExpertOut.model_validate(e) for e in (await self._send("GET", "/v1/experts")).json()]

    async def submit_job(self, query: str, **options: Any) -> JobOut:
        return await self._post("/v1/jobs", _body(query=query, **options), JobOut)

    async def models(self) -> ModelList:
        return await self._get("/v1/models", ModelList)

    async def job(self, job_id: str) -> JobOut:
        return await self._get(f"/v1/jobs/{job_id}", JobOut)

    async def wait_job(self, job_id: str, timeout_s: float = 600.0, poll_s: float = 0.5) -> JobOut:
        deadline = time.monotonic() + timeout_s
        while True:
            job = await self.job(job_id)
            if job.status in ("done", "failed"):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout_s:g} s")
            await asyncio.sleep(poll_s)

    async def feedback(self, answer_id: str, correct: bool | None = None, rating: float | None = None,
                       expert: str | None = None) -> FeedbackOut:
        body = _body(answer_id=answer_id, correct=correct, rating=rating, expert=expert)
        return await self._post("/v1/feedback", body, FeedbackOut)

    async def answer(self, answer_id: str) -> QueryResponse:
        """An answer this key received earlier (an admin key may read any)."""
        return await self._get(f"/v1/answers/{answer_id}", QueryResponse)

    async def usage(self, key_id: str | None = None) -> KeyUsage:
        """Today's usage and budget of this key, or (admin keys only) of ``key_id``."""
        return await self._get("/v1/usage" + (f"?key_id={key_id}" if key_id else ""), KeyUsage)
