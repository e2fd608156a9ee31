"""Every error leaves the API as ``{"error": {"type", "message"}}`` with its status.

- 400 invalid_json: the body is not JSON (or not UTF-8);
- 401 unauthorized / 403 forbidden: a missing or wrong API key, or a user key on an admin action;
- 404 not_found: an unknown path, job, answer or model;
- 413 body_too_large: past ``server.max_body_bytes``;
- 422 invalid_request: a field is wrong, missing, unknown or past a limit;
- 429 rate_limited (with Retry-After): past ``server.rate_limit_per_minute``;
- 429 budget_exceeded (with Retry-After and ``remaining``): the key has spent its daily budget (``tenants``);
- 429 overloaded (with Retry-After): ``routing.max_pending`` requests are already admitted;
- 503 unavailable: every recruited expert failed, or the store is down for jobs;
- 504 timeout: no answer within ``server.request_timeout_s``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator.api.schemas import ErrorBody
from orchestrator.engine.requests import Overloaded

log = logging.getLogger(__name__)

DOCUMENTED = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 413, 422, 429, 503, 504)}


class ServiceError(Exception):
    """An error with its HTTP status and type; subclasses fix the common ones."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str, status: int | None = None, kind: str | None = None,
                 headers: dict[str, str] | None = None, details: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.status = status or self.status
        self.type = kind or self.type
        self.headers = headers
        self.details = details or {}
        """Fields added to the error object beside type and message (``ErrorDetail`` documents them)."""


class InvalidRequest(ServiceError):
    status, type = 422, "invalid_request"


class NotFound(ServiceError):
    status, type = 404, "not_found"


class Unavailable(ServiceError):
    status, type = 503, "unavailable"


class BodyTooLarge(Exception):
    """Raised by the body-limit middleware while a chunked body is read past the limit."""


def error(status: int, kind: str, message: str, headers: dict[str, str] | None = None,
          details: dict[str, object] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message, **(details or {})}}, status_code=status,
                        headers=headers)


def validation_message(exc: RequestValidationError) -> tuple[str, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return "invalid_json", f"the body is not valid JSON{': ' + str(detail) if detail else ''}"
    parts = []
    for e in errors:
        loc = ".".join(str(x) for x in e["loc"] if x != "body") or "body"
        streaming = loc == "stream" and e.get("type") == "extra_forbidden"
        message = str(e["msg"]).removeprefix("Value error, ")  # a validator's own message says what is wrong
        parts.append(f"{loc}: {'this endpoint does not stream' if streaming else message}")
    return "invalid_request", "; ".join(parts)


def install(app: FastAPI, max_body_bytes: int) -> None:
    """The exception handlers, so that whatever raised an error, it leaves in the documented shape."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error(exc.status, exc.type, str(exc), exc.headers, exc.details)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return error(429, "overloaded", str(exc), {"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        kind, message = validation_message(exc)
        return error(400 if kind == "invalid_json" else 422, kind, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, BodyTooLarge):  # a chunked body past the limit, met while FastAPI read it
            return error(413, "body_too_large", f"the request body is larger than {max_body_bytes} bytes")
        if isinstance(exc.__cause__, UnicodeDecodeError):
            return error(400, "invalid_json", f"the body is not UTF-8 text: {exc.__cause__.reason} at byte "
                                              f"{exc.__cause__.start}")
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error(exc.status_code, kind, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error(500, "internal_error", "internal error; the server log has the details")
