"""Liveness, readiness and Prometheus metrics for operators.

The readiness itself (background probe, draining flag, the body) is
:class:`~progress_service.readiness.Readiness` (``Services.readiness``).
:class:`HealthFront` answers ``GET /readyz`` and ``/healthz`` in front of
everything else (no routing, middleware, DI or access log line), like
``GatewayFront`` does for ``/ws``; the routes here answer the same for a
request that reaches the app (e.g. under a ``root_path``).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, cast

import msgspec
from litestar import Litestar, MediaType, Response, get
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from progress_service import metrics, outage
from progress_service.readiness import Health, Readiness
from progress_service.services import Services
from progress_service.state import started_services, unwrap

__all__ = ["Health", "HealthFront", "Readiness", "healthz", "metrics_endpoint", "readyz"]

_enc = msgspec.json.Encoder()

_HEADERS_503 = [
    (b"content-type", b"application/json"),
    (b"retry-after", str(outage.RETRY_AFTER_SECONDS).encode()),
    (b"cache-control", b"no-store"),
]
_HEADERS_200 = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
_HEALTHZ = _enc.encode(Health(status="ok"))


class HealthFront:
    """ASGI layer in front of everything: ``GET``/``HEAD`` ``/readyz`` and ``/healthz`` answered at once.

    Until the lifespan has built the services, ``/readyz`` goes on to the
    app's own route (which then answers 503 from Litestar's startup state).
    """

    __slots__ = ("app", "_litestar")

    def __init__(self, app: ASGIApp) -> None:
        #: The wrapped app (``state.unwrap`` follows ``.app``).
        self.app = app
        self._litestar: Litestar = unwrap(app)

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine: what goes on returns the app's own awaitable, so a
        # WebSocket's life holds no frame of this layer (uvicorn is told asgi3).
        path = scope["path"] if scope["type"] == ScopeType.HTTP else None
        method = scope.get("method")
        if path not in ("/readyz", "/healthz") or method not in ("GET", "HEAD") or scope.get("root_path"):
            return self.app(scope, receive, send)
        return self._answer(path, method, scope, receive, send)

    async def _answer(self, path: str, method: str, scope: Scope, receive: Receive, send: Send) -> None:
        if path == "/healthz":
            status, body = 200, _HEALTHZ
        else:
            services = started_services(self._litestar)
            if services is None:
                await self.app(scope, receive, send)
                return
            status, health = services.readiness.answer()
            body = _enc.encode(health)
        headers = _HEADERS_200 if status == 200 else _HEADERS_503
        start = {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
        await send(cast("Any", start))
        await send(cast("Any", {"type": "http.response.body", "body": b"" if method == "HEAD" else body}))


@get("/healthz", tags=["ops"], summary="The process is up")
async def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@get("/readyz", tags=["ops"], summary="This node's dependencies answer and it is not draining")
async def readyz(services: Services) -> Response[Health]:
    """Readiness: the background probe's last result (normally answered by :class:`HealthFront`)."""
    status, health = services.readiness.answer()
    if status == 200:
        return Response(health)
    return Response(health, status_code=503, headers={"Retry-After": str(outage.RETRY_AFTER_SECONDS)})


@get("/metrics", tags=["ops"], media_type=MediaType.TEXT, summary="Prometheus metrics")
async def metrics_endpoint() -> Response[bytes]:
    """Prometheus metrics of this process."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
