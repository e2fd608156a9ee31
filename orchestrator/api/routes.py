"""The endpoints. Each is thin: the body is validated by its schema, ``Service`` does the work, and the reply
is shaped here. ``guard`` protects every ``/v1`` endpoint and ``admin`` the admin actions (``security``); both
hand the endpoint its ``Caller``, whose key id owns what it creates and pays for what it asks."""

from __future__ import annotations

import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from orchestrator.api import sse
from orchestrator.api.schemas import (
    CacheCleared,
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
    KeyUsage,
    ModelList,
    QueryBody,
    QueryResponse,
    ReloadOut,
    RouteBody,
    RouteResponse,
)
from orchestrator.api.security import Caller
from orchestrator.api.service import Service
from workers.types import Message

SSE = "text/event-stream"


def get_service(request: Request) -> Service:
    return request.app.state.service


Svc = Annotated[Service, Depends(get_service)]


async def user_scope(request: Request) -> Caller:
    return await request.app.state.security.guard(request)


async def admin_scope(request: Request) -> Caller:
    return await request.app.state.security.admin(request)


User = Annotated[Caller, Depends(user_scope)]
Admin = Annotated[Caller, Depends(admin_scope)]


async def answer_stream(request: Request, svc: Service, body: QueryBody, events: sse.Events,
                        caller: Caller, messages: tuple[Message, ...] = ()) -> StreamingResponse:
    """Admit and route first (errors keep their status), then stream."""
    live = await svc.open_stream(body, messages, caller)
    plan = await sse.start(request, svc, live)
    return StreamingResponse(sse.relay(svc, live, plan, events), media_type=SSE,
                             headers=sse.plan_headers(live, plan))


def openai_events(body: ChatBody | CompletionBody, object_name: str, prefix: str,
                  choice: sse.ChoiceFn) -> sse.OpenAIEvents:
    base = {"id": prefix + uuid.uuid4().hex, "object": object_name, "created": int(time.time()), "model": body.model}
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return sse.OpenAIEvents(base, choice, include_usage)


answering = APIRouter()
"""The endpoints that route and answer."""
records = APIRouter()
"""The endpoints about the service and what its keys created."""
scrape = APIRouter()
GUARDED = [Depends(user_scope)]


@answering.post("/v1/query", response_model=QueryResponse)
async def query(body: QueryBody, svc: Svc, request: Request, caller: User) -> Response:
    if body.stream:
        return await answer_stream(request, svc, body, sse.QueryEvents(), caller)
    result = await sse.until_disconnect(request, svc, svc.query(body, caller=caller))
    return JSONResponse(result.model_dump(mode="json"), headers=sse.headers(result))


@answering.post("/v1/route", response_model=RouteResponse, dependencies=GUARDED)
async def route(body: RouteBody, svc: Svc) -> RouteResponse:
    return RouteResponse(routing=await svc.route(body))


@answering.post("/v1/chat/completions", response_model=ChatResponse)
async def chat(body: ChatBody, svc: Svc, request: Request, caller: User) -> Response:
    query_body, messages = svc.catalog().chat_query(body)
    if body.stream:
        events = openai_events(body, "chat.completion.chunk", "chatcmpl-", sse.chat_choice)
        return await answer_stream(request, svc, query_body, events, caller, messages)
    result = await sse.until_disconnect(request, svc, svc.query(query_body, messages, caller))
    calls = result.tool_calls or None
    message = ChatChoiceMessage(content=result.answer or (None if calls else ""), tool_calls=calls)
    reply = ChatResponse(id="chatcmpl-" + uuid.uuid4().hex, created=int(time.time()), model=body.model,
                         usage=result.total_usage, concilium=result,
                         choices=[ChatChoice(message=message, finish_reason="tool_calls" if calls else "stop")])
    return JSONResponse(reply.model_dump(mode="json"), headers=sse.headers(result))


@answering.post("/v1/completions", response_model=CompletionResponse)
async def completions(body: CompletionBody, svc: Svc, request: Request, caller: User) -> Response:
    query_body = svc.catalog().completion_query(body)
    if body.stream:
        events = openai_events(body, "text_completion", "cmpl-", sse.completion_choice)
        return await answer_stream(request, svc, query_body, events, caller)
    result = await sse.until_disconnect(request, svc, svc.query(query_body, caller=caller))
    reply = CompletionResponse(id="cmpl-" + uuid.uuid4().hex, created=int(time.time()), model=body.model,
                               usage=result.total_usage, concilium=result,
                               choices=[CompletionChoice(text=result.answer)])
    return JSONResponse(reply.model_dump(mode="json"), headers=sse.headers(result))


@records.get("/v1/models", response_model=ModelList, dependencies=GUARDED)
async def models(svc: Svc) -> ModelList:
    return svc.catalog().models()


@records.get("/v1/experts", response_model=list[ExpertOut], dependencies=GUARDED)
async def experts(svc: Svc) -> list[ExpertOut]:
    return await svc.experts()


@records.post("/v1/jobs", response_model=JobOut, status_code=202)
async def submit_job(body: QueryBody, svc: Svc, caller: User) -> JobOut:
    return await svc.submit_job(body, caller)


@records.get("/v1/jobs/{job_id}", response_model=JobOut)
async def get_job(job_id: str, svc: Svc, caller: User) -> JobOut:
    return await svc.job(job_id, caller)


@records.get("/v1/answers/{answer_id}", response_model=QueryResponse)
async def get_answer(answer_id: str, svc: Svc, caller: User) -> QueryResponse:
    return await svc.answer(answer_id, caller)


@records.post("/v1/feedback", response_model=FeedbackOut)
async def feedback(body: FeedbackBody, svc: Svc, caller: User) -> FeedbackOut:
    return await svc.feedback(body, caller)


@records.get("/v1/usage", response_model=KeyUsage)
async def usage(svc: Svc, caller: User, key_id: Annotated[str | None, Query(
        description="another key's id (admin keys only); default: the caller's own")] = None) -> KeyUsage:
    return await svc.ledger.usage_for(caller, key_id)


@records.post("/v1/admin/reload", response_model=ReloadOut)
async def reload(svc: Svc, caller: Admin) -> ReloadOut:
    return await svc.reload()


@records.post("/v1/admin/cache/clear", response_model=CacheCleared)
async def clear_cache(svc: Svc, caller: Admin) -> CacheCleared:
    return await svc.clear_cache()


@records.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@records.get("/readyz")
async def readyz(svc: Svc) -> JSONResponse:
    state = await svc.ready()
    return JSONResponse(state, status_code=200 if state["ready"] else 503)


@scrape.get("/metrics")
async def metrics(svc: Svc, caller: Admin) -> PlainTextResponse:
    return PlainTextResponse(svc.metrics.render(), media_type="text/plain; version=0.0.4")


def build(metrics_here: bool) -> APIRouter:
    """Every route; scopes come from ``app.state.security``. ``metrics_here``: serve /metrics on the API's port
    (admin scope once keys exist), not on a port of its own (``server.metrics_port``)."""
    router = APIRouter()
    router.include_router(answering)
    router.include_router(records)
    if metrics_here:
        router.include_router(scrape)
    return router
