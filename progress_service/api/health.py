"""Liveness, readiness and Prometheus metrics for operators.

``/readyz`` is what a load balancer asks every second, so it must answer
in milliseconds even when the process is busy fanning out events, and tell
the truth:

- the checks (Redis — each primary when it is a cluster —, the queue's
  Redis when it is another one, the SQL store) run in :class:`Readiness`'s
  background probe task, every ``PS_READY_PROBE_INTERVAL`` seconds, each
  bounded by a timeout; a request only reads the last result, so it never
  queues behind a connection pool or the store gate;
- :class:`HealthFront` answers ``GET /readyz`` and ``/healthz`` in front of
  everything else (no routing, middleware, DI or access log line);
- it turns 503 as soon as the node starts draining (``Server.shutdown``),
  while WebSockets are still being closed, so the balancer stops sending
  new clients before the listener goes away; and when the probe itself has
  not finished for a while (a stuck loop is not a ready node).

The body names what is down: ``{"status": "unavailable", "checks":
{"redis": "ok", "store": "error: ConnectionRefusedError"}, "status_code":
503, "detail": "not ready: store error: ConnectionRefusedError"}``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import anyio
import msgspec
import sqlalchemy as sa
from litestar import MediaType, Request, Response, get
from litestar.types import Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from progress_service import metrics, outage
from progress_service.services import Services

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine


class Health(msgspec.Struct, kw_only=True, omit_defaults=True):
    status: str
    checks: dict[str, str] = {}
    #: When unavailable: the API's error body fields too (``ErrorBody``).
    status_code: int | None = None
    detail: str | None = None


#: Seconds one dependency check may take before it counts as down.
CHECK_TIMEOUT = 2.0

_enc = msgspec.json.Encoder()


def _error(exc: BaseException) -> str:
    return f"error: {type(exc).__name__}" if not isinstance(exc, TimeoutError) else "error: timeout"


class Readiness:
    """The node's readiness: dependency checks probed in the background, and the draining flag.

    ``redis`` is the general client (a cluster client is checked per
    primary), ``queue`` the queue's client when it is another Redis (else
    None), ``engine`` the store. Run :meth:`run` in the app's task group.
    """

    def __init__(
        self,
        redis: Any,
        engine: AsyncEngine,
        *,
        queue: Any = None,
        interval: float = 1.0,
        timeout: float = CHECK_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.queue = queue
        self.engine = engine
        self.interval = interval
        self.timeout = timeout
        self._clock = clock
        self.checks: dict[str, str] = {}
        #: Monotonic time the last probe finished (None: none yet).
        self.checked_at: float | None = None
        self.draining = False

    def drain(self) -> None:
        """From now on answer 503 ``draining`` (the node is shutting down)."""
        self.draining = True

    async def run(self) -> None:
        """Probe every ``interval`` seconds until cancelled (the lifespan probes once before it)."""
        while True:
            await anyio.sleep(self.interval)  # the probe's period, not a synchronisation
            await self.probe()

    async def probe(self) -> None:
        """Run every check at once (each bounded by ``timeout``) and keep the results."""
        checks: dict[str, str] = {}

        async def check(name: str, call: Callable[[], Awaitable[object]]) -> None:
            try:
                with anyio.fail_after(self.timeout):
                    await call()
                checks[name] = "ok"
            except Exception as exc:  # noqa: BLE001 - any failure means not ready; say which
                checks[name] = _error(exc)

        async with anyio.create_task_group() as tg:
            primaries = self._primaries()
            if primaries is None:
                tg.start_soon(check, "redis", self.redis.ping)
            else:
                for node in primaries:
                    tg.start_soon(check, f"redis {node.host}:{node.port}", _ping_node(self.redis, node))
            if self.queue is not None:
                tg.start_soon(check, "queue", self.queue.ping)
            tg.start_soon(check, "store", self._select_one)
        self.checks = dict(sorted(checks.items()))
        self.checked_at = self._clock()

    def _primaries(self) -> list[Any] | None:
        """A cluster client's primary nodes, or None for one Redis."""
        get_primaries = getattr(self.redis, "get_primaries", None)
        return list(get_primaries()) if callable(get_primaries) else None

    async def _select_one(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    def answer(self) -> tuple[int, Health]:
        """The status code and body ``/readyz`` answers now (no I/O)."""
        checks = dict(self.checks)
        if self.draining:
            checks["node"] = "draining"
        elif self.checked_at is None:
            checks["node"] = "starting"
        elif self._clock() - self.checked_at > 2 * self.interval + self.timeout + 1:
            checks["node"] = "probe stalled"
        if all(v == "ok" for v in checks.values()):
            return 200, Health(status="ok", checks=checks)
        down = ", ".join(f"{k} {v}" for k, v in checks.items() if v != "ok")
        return 503, Health(status="unavailable", checks=checks, status_code=503, detail=f"not ready: {down}")


def _ping_node(redis: Any, node: Any) -> Callable[[], Awaitable[object]]:
    # The node's own connection, not the cluster client's routing: its
    # retries and topology refresh on one dead node would fail the others' pings.
    async def ping() -> object:
        return await node.execute_command("PING")

    return ping


def readiness_of(app: Any) -> Readiness | None:
    """The Litestar app's :class:`Readiness` (set by its lifespan), or None before it started."""
    state = getattr(app, "state", None)
    found = getattr(state, "readiness", None) if state is not None else None
    return found if isinstance(found, Readiness) else None


_HEADERS_503 = [
    (b"content-type", b"application/json"),
    (b"retry-after", str(outage.RETRY_AFTER_SECONDS).encode()),
    (b"cache-control", b"no-store"),
]
_HEADERS_200 = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
_HEALTHZ = _enc.encode(Health(status="ok"))


class HealthFront:
    """ASGI layer in front of everything: ``GET``/``HEAD`` ``/readyz`` and ``/healthz`` answered at once.

    ``app`` is the next ASGI app, ``litestar_app`` the application whose
    state holds the :class:`Readiness` (until the lifespan made one, the
    request goes on to the app's own route).
    """

    __slots__ = ("app", "litestar_app")

    def __init__(self, app: Any, litestar_app: Any) -> None:
        #: The wrapped app (``server._unwrap`` follows ``.app``).
        self.app = app
        self.litestar_app = litestar_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = cast("dict[str, Any]", scope)
        path = raw.get("path") if raw["type"] == "http" else None
        method = raw.get("method")
        if path not in ("/readyz", "/healthz") or method not in ("GET", "HEAD") or raw.get("root_path"):
            await self.app(scope, receive, send)
            return
        readiness = readiness_of(self.litestar_app)
        if readiness is None and path == "/readyz":
            await self.app(scope, receive, send)
            return
        if path == "/healthz":
            status, body = 200, _HEALTHZ
        else:
            assert readiness is not None
            status, health = readiness.answer()
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
async def readyz(services: Services, request: Request[Any, Any, Any]) -> Response[Health]:
    """Readiness (normally answered by :class:`HealthFront` before it gets here)."""
    readiness = readiness_of(request.app)
    if readiness is None:  # no probe task (not started through the lifespan): check now
        readiness = Readiness(services.redis, services.engine)
        await readiness.probe()
    status, health = readiness.answer()
    if status == 200:
        return Response(health)
    return Response(health, status_code=503, headers={"Retry-After": str(outage.RETRY_AFTER_SECONDS)})


@get("/metrics", tags=["ops"], media_type=MediaType.TEXT, summary="Prometheus metrics")
async def metrics_endpoint() -> Response[bytes]:
    """Prometheus metrics of this process."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
