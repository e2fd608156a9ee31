"""The API's view of an answer: the response made from a pipeline answer, and a streamed answer in flight."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

from orchestrator import tracing
from orchestrator.api.schemas import ExpertAnswerOut, QueryResponse, Routing, Usage
from orchestrator.api.tools import ToolCallOut
from orchestrator.engine.requests import Answer
from orchestrator.engine.token_stream import TokenStream
from routers.base import Decision


def new_answer_id() -> str:
    return "cc-" + uuid.uuid4().hex


@dataclasses.dataclass
class Live:
    """A streaming request in flight: where its tokens arrive, and the task that ends with its response.
    A cached answer has no stream and a finished task."""

    id: str
    task: asyncio.Future[QueryResponse]
    stream: TokenStream | None

    def cancel(self) -> bool:
        """Stop the request (its row stops generating); False if it had already finished."""
        if self.task.done():
            return False
        if self.stream is not None:
            self.stream.cancel()
        self.task.cancel()
        return True


def to_routing(d: Decision) -> Routing:
    return Routing(router=str(d.trace.get("router", "")), mode=d.mode, experts=d.experts, scores=d.scores,
                   aggregator=d.aggregator, skills=d.skills, fallback=d.fallback, trace=d.trace)


def to_response(answer: Answer, answer_id: str) -> QueryResponse:
    usage = {
        e: Usage(prompt_tokens=u["prompt_tokens"], completion_tokens=u["completion_tokens"],
                 total_tokens=u["prompt_tokens"] + u["completion_tokens"])
        for e, u in answer.usage.items()
    }
    total = Usage(
        prompt_tokens=sum(u.prompt_tokens for u in usage.values()),
        completion_tokens=sum(u.completion_tokens for u in usage.values()),
    )
    total.total_tokens = total.prompt_tokens + total.completion_tokens
    return QueryResponse(
        id=answer_id, answer=answer.text,
        answers=[ExpertAnswerOut(expert=a.expert, text=a.text, prompt_tokens=a.prompt_tokens,
                                 completion_tokens=a.completion_tokens, finished_at=a.finished_at,
                                 seconds=a.seconds, retries=a.retries)
                 for a in answer.answers],
        aggregation=answer.aggregation, aggregator=answer.aggregator, aggregation_skipped=answer.aggregation_skipped,
        routing=to_routing(answer.decision), usage=usage, total_usage=total, cost_usd=answer.cost_usd,
        cost_by_expert=answer.cost_by_expert,
        timings=answer.timings, degraded=answer.degraded,
        tool_calls=[ToolCallOut.model_validate(c.as_openai()) for c in answer.tool_calls],
    )


def describe_in_trace(r: QueryResponse) -> None:
    """The answer's figures on its request's span."""
    tracing.describe({"answer_id": r.id, "router": r.routing.router, "experts": r.routing.experts,
                      "k": len(r.routing.experts), "aggregation": r.aggregation, "cost_usd": r.cost_usd,
                      "prompt_tokens": r.total_usage.prompt_tokens, "completion_tokens": r.total_usage.completion_tokens,
                      "cache_hit": r.cache.hit if r.cache else "none", "retries": sum(a.retries for a in r.answers)})
