"""The HTTP API: FastAPI over the service controller.

Endpoints are thin: they validate with the models in ``orchestrator.schemas``,
call ``Service``, and shape the reply. Every error, whatever raised it, leaves
as ``{"error": {"type", "message"}}`` with a 4xx or 5xx status:
- 400 invalid_json: the body is not JSON (or not UTF-8);
- 401 unauthorized / 403 forbidden: a missing or wrong API key, or a user key on an admin action;
- 404 not_found: an unknown path, job, answer or model;
- 413 body_too_large: past ``server.max_body_bytes``;
- 422 invalid_request: a field is wrong, missing, unknown or past a limit;
- 429 rate_limited (with Retry-After): past ``server.rate_limit_per_minute``;
- 429 overloaded (with Retry-After): ``routing.max_pending`` requests are already admitted;
- 503 unavailable: every recruited expert failed, or the store is down for jobs;
- 504 timeout: no answer within ``server.request_timeout_s``.

Every response carries ``x-request-id``: the client's own, when it sent a valid one, so a client can match
each answer to what it sent.

Streaming (``stream: true``) is answer-level: the pipeline finishes first, so
an error still gets its status, and the text is then sent as server-sent
event chunks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator.auth import ADMIN_KEYS_ENV, KeyRing, digest
from orchestrator.config import ConciliumConfig
from orchestrator.scheduler import Overloaded
from orchestrator.schemas import (
    ChatBody,
    ChatChoice,
    ChatChoiceMessage,
    ChatResponse,
    ErrorBody,
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
from orchestrator.service import Service, ServiceError
from orchestrator.store import StoreUnavailable

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 413, 422, 429, 503, 504)}
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Rejects bodies past the limit, by their Content-Length or, for chunked bodies, as they arrive."""

    def __init__(self, app, limit: int) -> None:  # noqa: ANN001  (an ASGI app)
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        message = f"the request body is larger than {self.limit} bytes"
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error(413, "body_too_large", message)(scope, receive, send)
        seen = 0

        async def counted():  # noqa: ANN202
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return msg

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await error(413, "body_too_large", message)(scope, receive, send)


class Observe:
    """Counts requests by endpoint and status, times them, and tags each response with its request id.

    A pure ASGI middleware, not ``@app.middleware("http")``: Starlette's
    BaseHTTPMiddleware hides the client's disconnect from the endpoint, and
    the endpoints need it to cancel abandoned requests.
    """

    def __init__(self, app) -> None:  # noqa: ANN001  (an ASGI app)
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500
        sent = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = (sent if REQUEST_ID.match(sent) else uuid.uuid4().hex).encode()

        async def observed(message) -> None:  # noqa: ANN001
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id)]}
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            svc = getattr(scope["app"].state, "service", None)
            if svc is not None:
                endpoint = getattr(scope.get("route"), "path", "unmatched")
                svc.metrics.requests.labels(endpoint, str(status)).inc()
                svc.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


def _validation_message(exc: RequestValidationError) -> tuple[str, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return "invalid_json", f"the body is not valid JSON{': ' + str(detail) if detail else ''}"
    parts = []
    for e in errors:
        loc = ".".join(str(x) for x in e["loc"] if x != "body") or "body"
        streaming = loc == "stream" and e.get("type") == "extra_forbidden"
        parts.append(f"{loc}: {'this endpoint does not stream' if streaming else e['msg']}")
    return "invalid_request", "; ".join(parts)


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


def _chunks(text: str, size: int = 16) -> Iterator[str]:
    words = text.split(" ")
    for i in range(0, len(words), size):
        yield " ".join(words[i:i + size]) + (" " if i + size < len(words) else "")


def _sse(data: object) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _headers(r: QueryResponse) -> dict[str, str]:
    return {
        "x-concilium-id": r.id,
        "x-concilium-router": r.routing.router,
        "x-concilium-experts": ",".join(r.routing.experts),
        "x-concilium-aggregator": r.aggregator or "",
        "x-concilium-aggregation": r.aggregation,
        "x-concilium-cached": str(r.cached).lower(),
        "x-concilium-cost-usd": f"{r.cost_usd:.8f}",
    }


def get_service(request: Request) -> Service:
    return request.app.state.service


Svc = Annotated[Service, Depends(get_service)]


def create_app(config: ConciliumConfig, model_store: Path | None = None, service: Service | None = None,
               config_path: Path | None = None, detached: bool = False) -> FastAPI:
    """The app; without ``service`` it starts one (the pipeline, the pool, the store) in its lifespan.

    ``config_path`` is the file ``POST /v1/admin/reload`` re-reads (None: the same lookup as at start).
    ``detached``: the experts are shared, named actors that outlive the app, as Ray Serve replicas need.
    """
    keys = KeyRing.from_config(config.server.api_key_sha256)
    admin_keys = KeyRing.from_config(config.server.admin_key_sha256, ADMIN_KEYS_ENV)
    secured = keys.enabled or admin_keys.enabled

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = service is None
        app.state.service = service or await Service.start(config, model_store, config_path, detached)
        try:
            yield
        finally:
            if owned:
                await app.state.service.close()

    app = FastAPI(title="Concilium", version="0.1.0", lifespan=lifespan, responses=ERRORS,
                  description="Route each query to the right experts, run them batched by expert, aggregate.")

    def presented_key(request: Request) -> str:
        auth = request.headers.get("authorization", "")
        return auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key") or ""

    async def guard(request: Request, svc: Svc) -> None:
        """API key (when keys are configured) and the per-key rate limit, shared through the store."""
        presented = presented_key(request)
        if secured:
            if not presented:
                raise ServiceError("an API key is required (Authorization: Bearer KEY)", 401, "unauthorized")
            if not (keys.accepts(presented) | admin_keys.accepts(presented)):
                raise ServiceError("the API key is not valid", 403, "forbidden")
        limit = config.server.rate_limit_per_minute
        if limit is None:
            return
        who = digest(presented)[:16] if presented else (request.client.host if request.client else "-")
        window = int(time.time() // 60)
        try:
            count = await svc.store.incr(f"rate:{who}:{window}", ttl_s=60)
        except StoreUnavailable:  # fail open: a store outage must not take the API down
            svc.metrics.store_errors.labels("rate_limit").inc()
            return
        if count > limit:
            retry = str(60 - int(time.time()) % 60)
            raise ServiceError(f"more than {limit} requests this minute; retry in {retry} s", 429, "rate_limited",
                               {"Retry-After": retry})

    async def admin(request: Request, svc: Svc) -> None:
        """The admin scope, on top of ``guard``: reloading the config and feedback that changes routing."""
        await guard(request, svc)
        if secured and not admin_keys.accepts(presented_key(request)):
            raise ServiceError("this action needs an admin key (server.admin_key_sha256 or $CONCILIUM_ADMIN_KEYS)",
                               403, "forbidden")

    Guarded, Admin = [Depends(guard)], [Depends(admin)]

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error(exc.status, exc.type, str(exc), exc.headers)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return error(429, "overloaded", str(exc), {"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        kind, message = _validation_message(exc)
        return error(400 if kind == "invalid_json" else 422, kind, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, _TooLarge):  # a chunked body past the limit, met while FastAPI read it
            return error(413, "body_too_large", f"the request body is larger than {config.server.max_body_bytes} bytes")
        if isinstance(exc.__cause__, UnicodeDecodeError):
            return error(400, "invalid_json", f"the body is not UTF-8 text: {exc.__cause__.reason} at byte "
                                              f"{exc.__cause__.start}")
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error(exc.status_code, kind, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error(500, "internal_error", "internal error; the server log has the details")

    @app.post("/v1/query", response_model=QueryResponse, dependencies=Guarded)
    async def query(body: QueryBody, svc: Svc, request: Request) -> Response:
        result = await until_disconnect(request, svc, svc.query(body))
        if not body.stream:
            return JSONResponse(result.model_dump(mode="json"), headers=_headers(result))

        def events() -> Iterator[str]:
            for piece in _chunks(result.answer):
                yield _sse({"delta": piece})
            yield _sse(result.model_dump(mode="json"))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=_headers(result))

    @app.post("/v1/route", response_model=RouteResponse, dependencies=Guarded)
    async def route(body: RouteBody, svc: Svc) -> RouteResponse:
        return RouteResponse(routing=await svc.route(body))

    @app.post("/v1/chat/completions", response_model=ChatResponse, dependencies=Guarded)
    async def chat(body: ChatBody, svc: Svc, request: Request) -> Response:
        query_body, messages = svc.chat_query(body)
        result = await until_disconnect(request, svc, svc.query(query_body, messages))
        cid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        usage = result.total_usage
        if not body.stream:
            reply = ChatResponse(id=cid, created=created, model=body.model, usage=usage, concilium=result,
                                 choices=[ChatChoice(message=ChatChoiceMessage(content=result.answer))])
            return JSONResponse(reply.model_dump(mode="json"), headers=_headers(result))

        def events() -> Iterator[str]:
            base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model}
            yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}]})
            for piece in _chunks(result.answer):
                yield _sse({**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
            final = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                     "concilium": result.model_dump(mode="json")}
            if (body.stream_options or {}).get("include_usage"):
                final["usage"] = usage.model_dump()
            yield _sse(final)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=_headers(result))

    @app.get("/v1/models", response_model=ModelList, dependencies=Guarded)
    async def models(svc: Svc) -> ModelList:
        return svc.models()

    @app.get("/v1/experts", response_model=list[ExpertOut], dependencies=Guarded)
    async def experts(svc: Svc) -> list[ExpertOut]:
        return await svc.experts()

    @app.post("/v1/jobs", response_model=JobOut, status_code=202, dependencies=Guarded)
    async def submit_job(body: QueryBody, svc: Svc) -> JobOut:
        return await svc.submit_job(body)

    @app.get("/v1/jobs/{job_id}", response_model=JobOut, dependencies=Guarded)
    async def get_job(job_id: str, svc: Svc) -> JobOut:
        return await svc.job(job_id)

    @app.post("/v1/feedback", response_model=FeedbackOut, dependencies=Admin)
    async def feedback(body: FeedbackBody, svc: Svc) -> FeedbackOut:
        return await svc.feedback(body)

    @app.post("/v1/admin/reload", response_model=ReloadOut, dependencies=Admin)
    async def reload(svc: Svc) -> ReloadOut:
        return await svc.reload()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(svc: Svc) -> JSONResponse:
        state = await svc.ready()
        return JSONResponse(state, status_code=200 if state["ready"] else 503)

    @app.get("/metrics")
    async def metrics(svc: Svc) -> PlainTextResponse:
        return PlainTextResponse(svc.metrics.render(), media_type="text/plain; version=0.0.4")

    if config.server.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.server.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type", "x-api-key", "x-request-id"])
    app.add_middleware(Observe)
    app.add_middleware(BodyLimit, limit=config.server.max_body_bytes)
    return app
