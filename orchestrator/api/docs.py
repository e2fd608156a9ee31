"""``/docs`` (Swagger UI), with its script and style served from an installed package.

FastAPI's default page loads those assets from a public CDN, so on a machine without internet it stays blank.
``fastapi-offline`` ships the same assets in its wheel; only its static folder is used here, with FastAPI's own
page builder, and no favicon is fetched from elsewhere. There is no ``/redoc``: ReDoc's bundle loads its logo
from Redocly's CDN whatever the page says, so offline it would log a failed request on every visit.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
PREFIX = "/docs-assets"


def mount(app: FastAPI) -> None:
    app.mount(PREFIX, StaticFiles(directory=ASSETS), name="docs-assets")
    title = f"{app.title} API"

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=title,
                                   swagger_js_url=f"{PREFIX}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{PREFIX}/swagger-ui.css",
                                   swagger_favicon_url=f"{PREFIX}/favicon.png")
