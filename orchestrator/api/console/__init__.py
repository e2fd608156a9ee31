"""The console: a web page served by the API at ``/`` and ``/console``, a client of the public API only.

Its assets are static files in this package (no build step, nothing from a CDN), because the machines that run
Concilium may be offline. Mounted by ``create_app``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(__file__).resolve().parent / "static"
PAGE = ASSETS / "index.html"


def mount(app: FastAPI) -> None:
    """``/`` and ``/console`` answer the page; ``/console/assets/`` its script and style."""
    app.mount("/console/assets", StaticFiles(directory=ASSETS), name="console-assets")

    @app.get("/", include_in_schema=False)
    @app.get("/console", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html")
