"""/docs and /redoc with their assets served by the gateway itself, not from a CDN (the pages:
`frontend.docs_pages`). When docs are protected by API keys (GATEWAY_AUTH_PROTECT=docs) the
security layer installs its own guarded pages instead
(`frontend.security.gateway.Security.install_docs`), on the same local assets.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_oauth2_redirect_html
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse

from frontend.docs_pages import STATIC_URL, assets_dir, redoc_page, swagger_ui_page


def install_local_docs(app: FastAPI) -> None:
    """Mount the assets and add /docs, /docs/oauth2-redirect and /redoc (create the app with
    `docs_url=None, redoc_url=None` so FastAPI does not add its CDN pages)."""
    app.mount(STATIC_URL, StaticFiles(directory=assets_dir()), name="docs-static")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        return swagger_ui_page(request, openapi_url, app.title)

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return redoc_page(request, openapi_url, app.title)
