"""The FastAPI application: ``create_app`` assembles the service, the error handlers, the routes and the
middleware (``middleware`` documents their order). The endpoints themselves are in ``routes``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from orchestrator.api import console, docs, errors, routes
from orchestrator.api.middleware import BodyLimit, Observe
from orchestrator.api.security import Security
from orchestrator.api.service import Service
from orchestrator.config import ConciliumConfig


def create_app(config: ConciliumConfig, service: Service | None = None, config_path: Path | None = None,
               detached: bool = False) -> FastAPI:
    """The app; without ``service`` it starts one (the pipeline, the pool, the store) in its lifespan.

    ``config_path`` is the file ``POST /v1/admin/reload`` re-reads (None: the same lookup as at start).
    ``detached``: the experts are shared, named actors that outlive the app, as Ray Serve replicas need.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = service is None
        app.state.service = service or await Service.start(config, config_path, detached)
        port = config.server.metrics_port
        scrape = app.state.service.metrics.serve(config.server.metrics_host, port) if port else None
        try:
            yield
        finally:
            if scrape is not None:
                scrape.shutdown()
                scrape.server_close()
            if owned:
                await app.state.service.close()

    app = FastAPI(title="Concilium", version="0.1.0", lifespan=lifespan, responses=errors.DOCUMENTED,
                  docs_url=None, redoc_url=None,  # served by ``docs`` from packaged assets, not from a CDN
                  description="Route each query to the right experts, run them batched by expert, aggregate.")
    errors.install(app, config.server.max_body_bytes)
    app.state.security = Security(config.server)
    app.include_router(routes.build(metrics_here=config.server.metrics_port is None))
    console.mount(app)
    docs.mount(app)
    if config.server.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.server.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type", "x-api-key", "x-request-id"])
    app.add_middleware(Observe)
    app.add_middleware(BodyLimit, limit=config.server.max_body_bytes)
    return app
