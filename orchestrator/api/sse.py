"""Server-sent events, and running a request while watching its client.

A streaming request is answered in three parts. Before the first byte, the
service admits and routes it, so that bad input or a routing failure still gets
its status. The first event then says which expert writes the answer and why (a
vote, a consensus or a cascade cannot stream before they finish). Then the
answer's text goes out as that expert writes it, and the full response closes
the stream. A failure after the first byte is a final ``{"error": ...}`` event,
as OpenAI sends it, followed by ``[DONE]``; a client that goes away cancels its
request, which stops its row of the expert's batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from fastapi import Request

from orchestrator.api.answers import Live
from orchestrator.api.errors import ServiceError
from orchestrator.api.schemas import QueryResponse
from orchestrator.api.service import Service
from orchestrator.api.tools import ToolCallOut
from orchestrator.engine.token_stream import DELTA
from workers.types import ToolCallDelta

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25
DONE = "data: [DONE]\n\n"
CHUNK_WORDS = 16
"""Words per chunk when text that was not streamed (a vote, a cached answer) is sent as deltas."""

T = TypeVar("T")
ChoiceFn = Callable[[str | None, str | None], dict[str, object]]
"""(text, finish reason) → one OpenAI choice; None text: the opening chunk."""


async def until_disconnect(request: Request, svc: Service, work: Awaitable[T],
                           on_cancel: Callable[[], object] | None = None) -> T:
    """Run ``work``, cancelling it when the client goes away or the time limit passes: a cancelled request is
    dropped from its window if the window has not started, and its answer is discarded if it has."""
    task = asyncio.ensure_future(work)
    limit = svc.config.server.request_timeout_s
    deadline = time.monotonic() + limit
    while True:
        done, _ = await asyncio.wait({task}, timeout=max(0.0, min(DISCONNECT_POLL_S, deadline - time.monotonic())))
        if done:
            return task.result()
        gone = await request.is_disconnected()
        if gone or time.monotonic() >= deadline:
            task.cancel()
            if on_cancel is not None:
                on_cancel()
        if gone:
            svc.metrics.cancelled.inc()
            raise ServiceError("the client went away", 499, "client_closed_request")
        if time.monotonic() >= deadline:
            svc.metrics.timeouts.inc()
            raise ServiceError(f"no answer within {limit:g} s (server.request_timeout_s)", 504, "timeout")


def chunks(text: str, size: int = CHUNK_WORDS) -> Iterator[str]:
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


def plan_headers(live: Live, plan: dict[str, object]) -> dict[str, str]:
    """What is known when a stream starts: the answer's id and the routing."""
    experts = plan.get("experts") or []
    return {"x-concilium-id": live.id, "x-concilium-router": str(plan.get("router") or ""),
            "x-concilium-experts": ",".join(str(e) for e in experts)}


async def start(request: Request, svc: Service, live: Live) -> dict[str, object]:
    """Wait until the request is routed and return its plan; a failure before then raises, with its status."""
    if live.stream is None:
        hit = live.task.result()
        return {"streams": None, "why": "a cached answer: sent whole", "router": hit.routing.router,
                "experts": hit.routing.experts}
    plan = await until_disconnect(request, svc, live.stream.first(), live.cancel)
    if plan is None:  # closed before routing ended: the task holds the error
        await live.task
        raise ServiceError("the request ended before it was routed")
    return plan


class Events(Protocol):
    """How one endpoint writes the parts of a stream."""

    def opening(self, answer_id: str, plan: dict[str, object]) -> dict[str, object]: ...

    def delta(self, text: str) -> dict[str, object]: ...

    def tool(self, piece: ToolCallDelta) -> dict[str, object]:
        """A piece of a tool call (a request with tools)."""
        ...

    def closing(self, result: QueryResponse) -> list[dict[str, object]]: ...

    def restart(self, info: dict[str, object]) -> dict[str, object]:
        """The event that says the text starts again (``stream_fallback: restart``)."""
        ...


class QueryEvents:
    """``/v1/query``: ``{"id", "plan"}``, then ``{"delta"}`` events, then the full response."""

    def opening(self, answer_id: str, plan: dict[str, object]) -> dict[str, object]:
        return {"id": answer_id, "plan": plan}

    def delta(self, text: str) -> dict[str, object]:
        return {"delta": text}

    def tool(self, piece: ToolCallDelta) -> dict[str, object]:
        return {"tool_call": piece.as_openai()}

    def closing(self, result: QueryResponse) -> list[dict[str, object]]:
        return [result.model_dump(mode="json")]

    def restart(self, info: dict[str, object]) -> dict[str, object]:
        return {"restart": info}


@dataclass
class OpenAIEvents:
    """OpenAI chunks (``chat.completion.chunk`` or ``text_completion``). The first chunk carries the plan and
    the finishing chunk the whole response, under ``concilium``; with ``include_usage``, a last chunk has the
    usage and no choices."""

    base: dict[str, object]
    choice: ChoiceFn
    include_usage: bool = False

    def _chunk(self, text: str | None, finish: str | None, **extra: object) -> dict[str, object]:
        return {**self.base, "choices": [self.choice(text, finish)], **extra}

    def opening(self, answer_id: str, plan: dict[str, object]) -> dict[str, object]:
        return self._chunk(None, None, concilium={"id": answer_id, "plan": plan})

    def delta(self, text: str) -> dict[str, object]:
        return self._chunk(text, None)

    def tool(self, piece: ToolCallDelta) -> dict[str, object]:
        """OpenAI's ``delta.tool_calls`` chunk (chat only: completions take no tools)."""
        return {**self.base, "choices": [{"index": 0, "delta": {"tool_calls": [piece.as_openai()]},
                                          "finish_reason": None}]}

    def restart(self, info: dict[str, object]) -> dict[str, object]:
        return self._chunk("", None, concilium={"restart": info})

    def closing(self, result: QueryResponse) -> list[dict[str, object]]:
        finish = "tool_calls" if result.tool_calls else "stop"
        last = [self._chunk("", finish, concilium=result.model_dump(mode="json"))]
        if self.include_usage:
            last.append({**self.base, "choices": [], "usage": result.total_usage.model_dump()})
        return last


def chat_choice(text: str | None, finish: str | None) -> dict[str, object]:
    delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
    return {"index": 0, "delta": delta, "finish_reason": finish}


def completion_choice(text: str | None, finish: str | None) -> dict[str, object]:
    return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}


def error_event(kind: str, message: str, **details: object) -> str:
    return sse({"error": {"type": kind, "message": message, "code": None, **details}})


def remainder(sent: str, answer: str) -> str:
    """What of the answer is still to send after ``sent`` was streamed. A streamed expert's text is the answer,
    so this is what a vote, a skipped synthesis or a cache hit adds; ValueError if they parted ways."""
    if answer.startswith(sent):
        return answer[len(sent):]
    if sent.strip() == answer.strip():
        return ""
    raise ValueError("the streamed text is not the answer")


@dataclass
class Sent:
    """What a stream has sent of its answer: text, and the tool calls (name and arguments by index)."""

    text: list[str] = field(default_factory=list)
    calls: dict[int, tuple[str, str]] = field(default_factory=dict)

    def add(self, piece: object) -> None:
        if isinstance(piece, ToolCallDelta):
            name, arguments = self.calls.get(piece.index, ("", ""))
            self.calls[piece.index] = (piece.name or name, arguments + piece.arguments)
        else:
            self.text.append(str(piece))

    def rest(self, result: QueryResponse) -> tuple[str, list[ToolCallOut]]:
        """The text and the calls still to send; ValueError if what was sent is not the answer."""
        calls = [(c.function.name, c.function.arguments) for c in result.tool_calls]
        if self.calls and [self.calls[i] for i in sorted(self.calls)] != calls:
            raise ValueError("the streamed tool calls are not the answer's")
        return remainder("".join(self.text), result.answer), [] if self.calls else result.tool_calls


async def relay(svc: Service, live: Live, plan: dict[str, object], events: Events) -> AsyncIterator[str]:
    """The stream's body: the plan, each delta as it is written, whatever of the answer was not streamed, the
    closing events and ``[DONE]``. Leaving early (the client went away) cancels the request."""
    sent = Sent()
    try:
        yield sse(events.opening(live.id, plan))
        if live.stream is not None:
            async for kind, piece in live.stream.events():
                if kind == DELTA:
                    sent.add(piece)
                    yield sse(events.tool(piece) if isinstance(piece, ToolCallDelta) else events.delta(str(piece)))
        try:
            result = await live.task
        except ServiceError as exc:
            yield error_event(exc.type, str(exc))
        except Exception:
            log.exception("a streaming request failed after its first byte")
            yield error_event("internal_error", "internal error; the server log has the details")
        else:
            for event in _ending(result, sent, events, svc.config.server.stream_fallback):
                yield event
        yield DONE
    finally:
        if live.cancel():
            svc.metrics.cancelled.inc()


def _ending(result: QueryResponse, sent: Sent, events: Events, fallback: str) -> Iterator[str]:
    """The rest of the answer and the closing events. When the expert that was streaming failed after its first
    token and another one answered (``degraded`` says who and why), ``server.stream_fallback`` decides: ``error``
    ends the stream with an error event holding the text sent so far; ``restart`` sends a restart event, then the
    new answer from its start (its text and its tool calls: a client drops the calls it had, as the text)."""
    try:
        rest, calls = sent.rest(result)
    except ValueError:
        why = "; ".join(result.degraded) or "the expert that was streaming failed"
        partial = "".join(sent.text)
        if fallback == "error":
            yield error_event("stream_interrupted", f"{why}; the whole answer is at GET /v1/answers/{result.id}",
                              partial=partial)
            return
        yield sse(events.restart({"reason": why, "discard_chars": len(partial), "discard_tool_calls": len(sent.calls)}))
        rest, calls = result.answer, result.tool_calls
    for piece in chunks(rest) if rest else ():
        yield sse(events.delta(piece))
    for i, call in enumerate(calls):
        yield sse(events.tool(ToolCallDelta(i, call.id, call.function.name, call.function.arguments)))
    for event in events.closing(result):
        yield sse(event)
