"""The API's ASGI middleware. ``create_app`` registers them so that a request meets them in this order:
1. ``BodyLimit`` (outermost): refuses an oversized body before anything reads it;
2. ``Observe``: opens each request's trace span, counts and times every request, and tags its response with
   ``x-request-id`` and ``x-concilium-trace-id``;
3. CORS, only when ``server.cors_origins`` lists origins.

Both are pure ASGI, not ``@app.middleware("http")``: Starlette's
BaseHTTPMiddleware hides the client's disconnect from the endpoint, and the
endpoints need it to cancel abandoned requests.
"""

from __future__ import annotations

import re
import time
import uuid

from opentelemetry.trace import SpanKind

from orchestrator.api.errors import BodyTooLarge, error
from orchestrator.tracing import TRACE_HEADER, TRACER, trace_id

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


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
                raise BodyTooLarge
            return msg

        try:
            await self.app(scope, counted, send)
        except BodyTooLarge:
            await error(413, "body_too_large", message)(scope, receive, send)


class Observe:
    """Counts requests by endpoint and status, times them, and tags each response with its request id: the
    client's own when it sent a valid one, so that a client can match each answer to what it sent."""

    def __init__(self, app) -> None:  # noqa: ANN001  (an ASGI app)
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500
        sent = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = (sent if REQUEST_ID.match(sent) else uuid.uuid4().hex).encode()
        with TRACER.start_as_current_span(scope["method"], kind=SpanKind.SERVER) as span:
            tagged = [(b"x-request-id", request_id), (TRACE_HEADER.encode(), (trace_id() or "").encode())]

            async def observed(message) -> None:  # noqa: ANN001
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    message = {**message, "headers": [*message.get("headers", []), *tagged]}
                await send(message)

            try:
                await self.app(scope, receive, observed)
            finally:
                endpoint = getattr(scope.get("route"), "path", "unmatched")
                span.update_name(f"{scope['method']} {endpoint}")
                span.set_attributes({"http.request.method": scope["method"], "http.route": endpoint,
                                     "http.response.status_code": status, "concilium.request_id": request_id.decode()})
                svc = getattr(scope["app"].state, "service", None)
                if svc is not None:
                    svc.metrics.requests.labels(endpoint, str(status)).inc()
                    svc.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
