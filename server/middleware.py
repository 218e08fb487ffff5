"""Pure ASGI middleware (safe with streaming responses): bearer auth, body byte cap, request metrics."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from typing import Any

from server.errors import PayloadTooLarge, ServeError, Unauthorized, error_body
from server.metrics import Metrics

Scope = dict[str, Any]


async def send_error(scope: Scope, send: Any, err: ServeError) -> None:
    body = json.dumps(error_body(err, scope.get("path", ""))).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


class AuthMiddleware:
    """Bearer keys on `/v1*`; probes and metrics stay open. Only SHA-256 digests are kept, and every
    digest is compared in constant time with no early exit, so timing says nothing about which matched."""

    def __init__(self, app: Any, digests: list[bytes]) -> None:
        self.app, self.digests = app, digests

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1") or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        client = "anon"
        if self.digests:
            auth = _header(scope, b"authorization") or ""
            scheme, _, token = auth.partition(" ")
            digest = hashlib.sha256(token.strip().encode()).digest()
            ok = False
            for d in self.digests:
                ok |= secrets.compare_digest(digest, d)
            if scheme.lower() != "bearer" or not token or not ok:
                err = Unauthorized("missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})
                return await send_error(scope, send, err)
            client = digest.hex()[:16]
        scope.setdefault("state", {})["client"] = client  # scopes Idempotency-Key per client
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 on a declared `Content-Length` over the cap, and while streaming once the bytes read pass it
    (chunked bodies declare nothing). Multipart file parts are otherwise unbounded in starlette."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await send_error(scope, send, PayloadTooLarge(f"the body is over {self.max_bytes} bytes"))
        seen = 0

        async def counting_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise PayloadTooLarge(f"the body is over {self.max_bytes} bytes")
            return message

        return await self.app(scope, counting_receive, send)


def _route_name(scope: Scope, routes: list[Any]) -> str:
    """The route template of a request; also for answers sent before routing (a 413 on Content-Length, a
    401), which would otherwise all count as `unmatched`."""
    route = scope.get("route")
    if route is None:
        from starlette.routing import Match

        route = next((r for r in routes if r.matches(scope)[0] == Match.FULL), None)
    return getattr(route, "path", None) or "unmatched"


class MetricsMiddleware:
    """Counts requests by route template (never by job id) and status code."""

    def __init__(self, app: Any, metrics: Metrics, routes: list[Any]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        t0 = time.perf_counter()

        async def capture(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            name = _route_name(scope, self.routes)
            self.metrics.requests.labels(route=name, code=str(status)).inc()
            self.metrics.request_seconds.labels(route=name).observe(time.perf_counter() - t0)


# Every answer: no MIME sniffing, no referrer, no framing. Routes that serve HTML set their own CSP
# (server/web.py); everything else (JSON, images, SSE) may load nothing.
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
_DEFAULT_CSP = b"default-src 'none'; frame-ancestors 'none'"


class SecurityHeadersMiddleware:
    """Adds the headers above to every response, and the default CSP where a route set none."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def add_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in _SECURITY_HEADERS if k not in names]
                if b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", _DEFAULT_CSP))
                message = {**message, "headers": headers}
            await send(message)

        return await self.app(scope, receive, add_headers)
