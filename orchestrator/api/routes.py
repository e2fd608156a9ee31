"""The endpoints. Each is thin: the body is validated by its schema, ``Service`` does the work, and the reply
is shaped here. ``guard`` protects every ``/v1`` endpoint and ``admin`` the admin actions (``security``)."""

from __future__ import annotations

import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from orchestrator.api import streaming
from orchestrator.api.schemas import (
    ChatBody,
    ChatChoice,
    ChatChoiceMessage,
    ChatResponse,
    CompletionBody,
    CompletionChoice,
    CompletionResponse,
    ExpertOut,
    FeedbackBody,
    FeedbackOut,
    JobOut,
    ModelList,
    QueryBody,
    QueryResponse,
    ReloadOut,
    RouteBody,
    RouteResponse,
)
from orchestrator.api.security import Security
from orchestrator.api.service import Service
from workers.types import Message

SSE = "text/event-stream"


def get_service(request: Request) -> Service:
    return request.app.state.service


Svc = Annotated[Service, Depends(get_service)]


async def answer_stream(request: Request, svc: Service, body: QueryBody, events: streaming.Events,
                        messages: tuple[Message, ...] = ()) -> StreamingResponse:
    """Admit and route first (errors keep their status), then stream."""
    live = await svc.open_stream(body, messages)
    plan = await streaming.start(request, svc, live)
    return StreamingResponse(streaming.relay(svc, live, plan, events), media_type=SSE,
                             headers=streaming.plan_headers(live, plan))


def openai_events(body: ChatBody | CompletionBody, object_name: str, prefix: str,
                  choice: streaming.ChoiceFn) -> streaming.OpenAIEvents:
    base = {"id": prefix + uuid.uuid4().hex, "object": object_name, "created": int(time.time()), "model": body.model}
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return streaming.OpenAIEvents(base, choice, include_usage)


def build(security: Security) -> APIRouter:
    router = APIRouter()
    guarded, admin = [Depends(security.guard)], [Depends(security.admin)]

    @router.post("/v1/query", response_model=QueryResponse, dependencies=guarded)
    async def query(body: QueryBody, svc: Svc, request: Request) -> Response:
        if body.stream:
            return await answer_stream(request, svc, body, streaming.QueryEvents())
        result = await streaming.until_disconnect(request, svc, svc.query(body))
        return JSONResponse(result.model_dump(mode="json"), headers=streaming.headers(result))

    @router.post("/v1/route", response_model=RouteResponse, dependencies=guarded)
    async def route(body: RouteBody, svc: Svc) -> RouteResponse:
        return RouteResponse(routing=await svc.route(body))

    @router.post("/v1/chat/completions", response_model=ChatResponse, dependencies=guarded)
    async def chat(body: ChatBody, svc: Svc, request: Request) -> Response:
        query_body, messages = svc.chat_query(body)
        if body.stream:
            events = openai_events(body, "chat.completion.chunk", "chatcmpl-", streaming.chat_choice)
            return await answer_stream(request, svc, query_body, events, messages)
        result = await streaming.until_disconnect(request, svc, svc.query(query_body, messages))
        reply = ChatResponse(id="chatcmpl-" + uuid.uuid4().hex, created=int(time.time()), model=body.model,
                             usage=result.total_usage, concilium=result,
                             choices=[ChatChoice(message=ChatChoiceMessage(content=result.answer))])
        return JSONResponse(reply.model_dump(mode="json"), headers=streaming.headers(result))

    @router.post("/v1/completions", response_model=CompletionResponse, dependencies=guarded)
    async def completions(body: CompletionBody, svc: Svc, request: Request) -> Response:
        query_body = svc.completion_query(body)
        if body.stream:
            events = openai_events(body, "text_completion", "cmpl-", streaming.completion_choice)
            return await answer_stream(request, svc, query_body, events)
        result = await streaming.until_disconnect(request, svc, svc.query(query_body))
        reply = CompletionResponse(id="cmpl-" + uuid.uuid4().hex, created=int(time.time()), model=body.model,
                                   usage=result.total_usage, concilium=result,
                                   choices=[CompletionChoice(text=result.answer)])
        return JSONResponse(reply.model_dump(mode="json"), headers=streaming.headers(result))

    @router.get("/v1/models", response_model=ModelList, dependencies=guarded)
    async def models(svc: Svc) -> ModelList:
        return svc.models()

    @router.get("/v1/experts", response_model=list[ExpertOut], dependencies=guarded)
    async def experts(svc: Svc) -> list[ExpertOut]:
        return await svc.experts()

    @router.post("/v1/jobs", response_model=JobOut, status_code=202, dependencies=guarded)
    async def submit_job(body: QueryBody, svc: Svc) -> JobOut:
        return await svc.submit_job(body)

    @router.get("/v1/jobs/{job_id}", response_model=JobOut, dependencies=guarded)
    async def get_job(job_id: str, svc: Svc) -> JobOut:
        return await svc.job(job_id)

    @router.post("/v1/feedback", response_model=FeedbackOut, dependencies=admin)
    async def feedback(body: FeedbackBody, svc: Svc) -> FeedbackOut:
        return await svc.feedback(body)

    @router.post("/v1/admin/reload", response_model=ReloadOut, dependencies=admin)
    async def reload(svc: Svc) -> ReloadOut:
        return await svc.reload()

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz(svc: Svc) -> JSONResponse:
        state = await svc.ready()
        return JSONResponse(state, status_code=200 if state["ready"] else 503)

    @router.get("/metrics")
    async def metrics(svc: Svc) -> PlainTextResponse:
        return PlainTextResponse(svc.metrics.render(), media_type="text/plain; version=0.0.4")

    return router
