"""FastAPI app factory and lifespan. With the in-process queue the app also runs the worker thread."""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from server.errors import InvalidInput, ServeError, error_body
from server.metrics import Metrics
from server.middleware import (
    AuthMiddleware,
    BodyLimitMiddleware,
    MetricsMiddleware,
    SecurityHeadersMiddleware,
)
from server.queue import make_api_queue
from server.queue.base import ApiQueue
from server.runtime import Runtime
from server.settings import Settings

log = logging.getLogger("rvr.app")


def create_app(
    settings: Settings | None = None, queue: ApiQueue | None = None, engine: Any = None
) -> FastAPI:
    """The API. `queue`/`engine` may be passed in (tests share them); otherwise built from settings.

    Example::

        app = create_app(Settings(model="/ckpt/tiny"))   # in-process queue + worker thread
        uvicorn.run(app)
    """
    settings = settings or Settings()
    metrics = Metrics()
    rt = Runtime(settings=settings, queue=queue or make_api_queue(settings), metrics=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        rt.decode_limiter = anyio.CapacityLimiter(settings.decode_threads)
        if rt.queue.name == "memory":
            from server.worker import Worker  # imports no torch until the engine loads

            rt.worker = Worker(settings, rt.queue, metrics, engine=engine)  # type: ignore[arg-type]
            rt.worker_thread = threading.Thread(target=rt.worker.run, name="rvr-worker", daemon=True)
            rt.worker_thread.start()
        try:
            yield
        finally:
            rt.draining.set()
            if rt.worker is not None:
                rt.worker.stop()
                await anyio.to_thread.run_sync(rt.worker_thread.join, settings.drain_timeout_s + 5)
            await rt.queue.close()

    app = FastAPI(
        title="rvr-serve",
        version="0.1.0",
        description="Refinement via Regeneration: refine, generate and judge images. Errors are "
        '`{"error": {"code", "message"}}`; 503 means the service is full or draining (retry after '
        "`Retry-After`), 429 is reserved for per-client limits at the ingress.",
        lifespan=lifespan,
        docs_url=None,  # server.web serves /docs and /redoc with local assets
        redoc_url=None,
    )
    app.state.rt = rt

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        metrics.failures.labels(code=exc.code).inc()
        return JSONResponse(error_body(exc, request.url.path), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await _serve_error(request, InvalidInput(str(exc.errors()[:3])[:500]))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        err = ServeError(str(exc.detail))
        err.code, err.status = (
            {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error"),
            exc.status_code,
        )
        return await _serve_error(request, err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return await _serve_error(request, ServeError("internal error"))

    from server import web
    from server.routes import health, info, jobs, openai_images, submit

    app.include_router(health.router)
    app.include_router(submit.router)
    app.include_router(jobs.router)
    app.include_router(info.router)
    app.include_router(openai_images.router)
    web.install(app, settings)
    if settings.key_digests():
        _declare_bearer_auth(app)
    # The last added is outermost: security headers and metrics see every answer, auth runs before the
    # body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(AuthMiddleware, digests=settings.key_digests())
    routes = [r for router in (health, submit, jobs, info, openai_images) for r in router.router.routes]
    routes += [r for r in app.router.routes if hasattr(r, "path_regex")]  # the web page's, the docs'
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=routes)
    app.add_middleware(SecurityHeadersMiddleware)
    return app


def _declare_bearer_auth(app: FastAPI) -> None:
    """OpenAPI names the bearer scheme that AuthMiddleware enforces on every `/v1` route, so generated
    clients and Swagger's Authorize button send the key."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearerAuth": {"type": "http", "scheme": "bearer", "description": "An API key of api_keys"}
        }
        for path, operations in schema.get("paths", {}).items():
            if path.startswith("/v1"):
                for op in operations.values():
                    op["security"] = [{"bearerAuth": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
