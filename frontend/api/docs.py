"""/docs and /redoc with their assets served by the gateway itself, not from a CDN.

FastAPI's built-in pages load Swagger UI and ReDoc from a public CDN, so they stay blank on a
machine without internet access. The assets come from the `fastapi-offline` package (it bundles
swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js and a favicon) and are mounted at
`/docs/static`. When docs are protected by API keys (GATEWAY_AUTH_PROTECT=docs) the security
layer installs its own guarded pages (`frontend.security.gateway.Security.install_docs`) built
with `swagger_ui_page` / `redoc_page` from here, on the same local assets.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse

STATIC_URL = "/docs/static"


def assets_dir() -> Path:
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


def swagger_ui_page(request: Request, openapi_url: str, title: str) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=f"{root}{openapi_url}",
        title=f"{title} - Swagger UI",
        oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
        swagger_js_url=f"{root}{STATIC_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{STATIC_URL}/swagger-ui.css",
        swagger_favicon_url=f"{root}{STATIC_URL}/favicon.png",
    )


def redoc_page(request: Request, openapi_url: str, title: str) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_redoc_html(
        openapi_url=f"{root}{openapi_url}",
        title=f"{title} - ReDoc",
        redoc_js_url=f"{root}{STATIC_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{STATIC_URL}/favicon.png",
        with_google_fonts=False,
    )


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
