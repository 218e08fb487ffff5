"""The browser side: the web page at `/` (static files of this package) and the API docs at `/docs` and
`/redoc`, whose Swagger UI / ReDoc assets come from the `fastapi-offline` package, never a CDN.

Every response gets `X-Content-Type-Options`, `Referrer-Policy` and a Content-Security-Policy from
`SecurityHeadersMiddleware`; the page and the docs pages set their own, stricter-than-needed policies
here (no inline script anywhere: the docs' one inline initializer is allowed by its hash).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import re
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

from server.settings import Settings

STATIC_DIR = Path(__file__).parent / "static"
# Swagger UI 5 + ReDoc 2 bundles, vendored and kept current by the fastapi-offline package.
DOCS_ASSETS_DIR = Path(str(importlib.resources.files("fastapi_offline") / "static"))
STATIC_URL = "/static"
DOCS_ASSETS_URL = "/docs-assets"

# The page: its own scripts and styles only; previews are data: URLs, results blob: URLs.
PAGE_CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def docs_csp(html: str) -> str:
    """Policy of a docs page: scripts from here plus its inline initializer by hash. Swagger UI and
    ReDoc inject <style> elements (styled components), so styles need 'unsafe-inline'."""
    hashes = [
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in _INLINE_SCRIPT.findall(html)
    ]
    return "; ".join(
        [
            "default-src 'self'",
            " ".join(["script-src 'self'", *hashes]),
            "style-src 'self' 'unsafe-inline'",
            "img-src 'self' data:",
            "worker-src 'self' blob:",
            "connect-src 'self'",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        ]
    )


def _html_with_csp(page: HTMLResponse) -> HTMLResponse:
    html = bytes(page.body).decode()
    return HTMLResponse(
        html, headers={"Content-Security-Policy": docs_csp(html), "Cache-Control": "no-cache"}
    )


class _Assets(StaticFiles):
    """Static files revalidated on every load (ETag), so an upgrade never mixes old and new files."""

    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def install(app: FastAPI, settings: Settings) -> None:
    """Mounts the docs (always) and the page (with `settings.web_ui`). The app is made with
    `docs_url=None, redoc_url=None`: these routes replace FastAPI's CDN-loading ones."""
    title = app.title
    openapi_url = app.openapi_url or "/openapi.json"
    favicon = f"{DOCS_ASSETS_URL}/favicon.png"
    app.mount(DOCS_ASSETS_URL, _Assets(directory=DOCS_ASSETS_DIR), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return _html_with_csp(
            get_swagger_ui_html(
                openapi_url=openapi_url,
                title=f"{title} - Swagger UI",
                swagger_js_url=f"{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
                swagger_css_url=f"{DOCS_ASSETS_URL}/swagger-ui.css",
                swagger_favicon_url=favicon,
                oauth2_redirect_url=None,
                # null: no calls to the public spec validator (offline hosts; it would leak the spec).
                swagger_ui_parameters={"validatorUrl": None},
            )
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return _html_with_csp(
            get_redoc_html(
                openapi_url=openapi_url,
                title=f"{title} - ReDoc",
                redoc_js_url=f"{DOCS_ASSETS_URL}/redoc.standalone.js",
                redoc_favicon_url=favicon,
                with_google_fonts=False,
            )
        )

    if not settings.web_ui:
        return
    app.mount(STATIC_URL, _Assets(directory=STATIC_DIR), name="static")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> FileResponse:
        headers = {"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"}
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=headers)
