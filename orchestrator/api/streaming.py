"""Server-sent events, and running a request while watching its client.

Streaming is answer-level: the pipeline finishes first, so an error still gets
its status, and the text is then sent as server-sent-event chunks.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Iterator

from fastapi import Request

from orchestrator.api.errors import ServiceError
from orchestrator.api.schemas import QueryResponse, Usage
from orchestrator.api.service import Service

DISCONNECT_POLL_S = 0.25
DONE = "data: [DONE]\n\n"


async def until_disconnect(request: Request, svc: Service, work: Awaitable[QueryResponse]) -> QueryResponse:
    """Run ``work``, cancelling it when the client goes away or the time limit passes: a cancelled request is
    dropped from its window if the window has not started, and its answer is discarded if it has."""
    task = asyncio.ensure_future(work)
    limit = svc.config.server.request_timeout_s
    deadline = time.monotonic() + limit
    while True:
        done, _ = await asyncio.wait({task}, timeout=max(0.0, min(DISCONNECT_POLL_S, deadline - time.monotonic())))
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            svc.metrics.cancelled.inc()
            raise ServiceError("the client went away", 499, "client_closed_request")
        if time.monotonic() >= deadline:
            task.cancel()
            svc.metrics.timeouts.inc()
            raise ServiceError(f"no answer within {limit:g} s (server.request_timeout_s)", 504, "timeout")


def chunks(text: str, size: int = 16) -> Iterator[str]:
    words = text.split(" ")
    for i in range(0, len(words), size):
        yield " ".join(words[i:i + size]) + (" " if i + size < len(words) else "")


def sse(data: object) -> str:
    return f"data: {json.dumps(data)}\n\n"


def headers(r: QueryResponse) -> dict[str, str]:
    """The answer's metadata as headers, for clients that read only the body's text."""
    return {
        "x-concilium-id": r.id,
        "x-concilium-router": r.routing.router,
        "x-concilium-experts": ",".join(r.routing.experts),
        "x-concilium-aggregator": r.aggregator or "",
        "x-concilium-aggregation": r.aggregation,
        "x-concilium-cached": str(r.cached).lower(),
        "x-concilium-cost-usd": f"{r.cost_usd:.8f}",
    }


def query_events(result: QueryResponse) -> Iterator[str]:
    """``/v1/query``: text deltas, then the full response, then ``[DONE]``."""
    for piece in chunks(result.answer):
        yield sse({"delta": piece})
    yield sse(result.model_dump(mode="json"))
    yield DONE


def chat_events(result: QueryResponse, base: dict[str, object], usage: Usage | None) -> Iterator[str]:
    """``/v1/chat/completions``: OpenAI chunks (the role, text deltas, the finish), then ``[DONE]``."""
    yield sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]})
    for piece in chunks(result.answer):
        yield sse({**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
    final = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
             "concilium": result.model_dump(mode="json")}
    if usage is not None:
        final["usage"] = usage.model_dump()
    yield sse(final)
    yield DONE
