"""A reverse proxy for an OpenAI-compatible server that injects the faults a remote model endpoint shows.

Written for the tests and ``concilium bench remote``: it sits between Concilium and a real upstream on
127.0.0.1, and it counts what the upstream would feel (requests, requests in flight and their most, streams
whose client left early, and the exceptions that ended a relay). Faults come from ``app.state.plan`` (the next chat requests', in order) or else from
``app.state.chance`` (a function that draws one per request), else none:
``("status", code, headers)``, ``("slow_first_byte", s)``, ``("stall_after", k, s)``, ``("cut_after", k)`` (the
connection drops after k data lines) and ``("malformed", k)`` (a broken line after k).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from orchestrator.env import LOOPBACK, free_port


def fault_proxy_app(upstream: str) -> FastAPI:
    app = FastAPI()
    app.state.plan, app.state.requests, app.state.in_flight, app.state.most_in_flight = [], 0, 0, 0
    app.state.closed_early, app.state.chance, app.state.faults, app.state.errors = 0, None, {}, []
    client = httpx.AsyncClient(base_url=upstream, timeout=120)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        r = await client.get("models")
        return JSONResponse(r.json(), r.status_code)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await request.json()
        if app.state.plan:
            fault = app.state.plan.pop(0)
        else:
            fault = app.state.chance() if app.state.chance is not None else ("pass",)
        app.state.requests += 1
        app.state.faults[fault[0]] = app.state.faults.get(fault[0], 0) + 1
        if fault[0] == "status":
            return JSONResponse({"error": {"type": "injected", "message": "a fault"}}, fault[1],
                                headers=fault[2] if len(fault) > 2 else None)
        app.state.in_flight += 1
        app.state.most_in_flight = max(app.state.most_in_flight, app.state.in_flight)
        return StreamingResponse(_relay(app, client, body, fault), media_type="text/event-stream")

    return app


async def _relay(app: FastAPI, client: httpx.AsyncClient, body: dict, fault: tuple) -> AsyncIterator[str]:
    finished = False
    try:
        if fault[0] == "slow_first_byte":
            await asyncio.sleep(fault[1])
        async with client.stream("POST", "chat/completions", json=body) as upstream:
            lines = 0
            async for line in upstream.aiter_lines():
                if line.startswith("data:"):
                    lines += 1
                    if fault[0] == "cut_after" and lines > fault[1]:
                        raise ConnectionAbortedError("an injected cut")  # the connection drops mid-body
                    if fault[0] == "malformed" and lines == fault[1] + 1:
                        yield "data: {not json\n\n"
                    if fault[0] == "stall_after" and lines == fault[1] + 1:
                        await asyncio.sleep(fault[2])
                yield line + "\n"
        finished = True
    except Exception as exc:
        app.state.errors.append(repr(exc)[:200])
        raise
    finally:
        app.state.in_flight -= 1
        app.state.closed_early += not finished and fault[0] != "cut_after"


class AppThread:
    """An OpenAI-style app under uvicorn in a daemon thread, on a free loopback port (``base_url`` ends in /v1)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        port = free_port()
        self.base_url = f"http://{LOOPBACK}:{port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=LOOPBACK, port=port, log_level="critical"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)


class FaultProxy(AppThread):
    """``fault_proxy_app`` in front of ``upstream``."""

    def __init__(self, upstream: str) -> None:
        super().__init__(fault_proxy_app(upstream))
