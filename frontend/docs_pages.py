"""The /docs and /redoc pages on assets the gateway serves itself (`STATIC_URL`), not a CDN.

FastAPI's built-in pages load Swagger UI and ReDoc from a public CDN, so they stay blank on a
machine without internet access; these load them from the `fastapi-offline` package's copies
(swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js and a favicon). Below both users: the
open pages (`frontend.api.docs`) and the guarded ones when docs are protected by API keys
(`frontend.security.gateway.Security.install_docs`).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
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
