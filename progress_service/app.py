"""``create_app``: the Litestar application — HTTP API, WebSocket gateway, web page."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from arq import create_pool
from litestar import Litestar, Request, Response
from litestar.types import ASGIApp, ControllerRouterHandler, Message, Receive, Scope, Send
from litestar.config.cors import CORSConfig
from litestar.exceptions import HTTPException
from litestar.config.compression import CompressionConfig
from litestar.datastructures import CacheControlHeader
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import RapidocRenderPlugin
from litestar.static_files import create_static_files_router
from redis.asyncio import Redis

from progress_service import metrics, outage, queue, redis_client
from progress_service.api.audit import AuditController, TokensController
from progress_service.api.comments import CommentsController
from progress_service.api.deps import AUTHENTICATION, DEPENDENCIES, NO_AUTH
from progress_service.api.health import healthz, metrics_endpoint, readyz
from progress_service.api.hooks import PATH as HOOKS_PATH
from progress_service.api.hooks import claude_code_hook
from progress_service.api.joblog import JobLogController
from progress_service.api.jobs import JobsController
from progress_service.api.me import whoami
from progress_service.api.session import SessionController
from progress_service.api.steering import SteeringController
from progress_service.api.stream import job_stream
from progress_service.api.tickets import create_ticket
from progress_service.gateway.endpoint import ws_endpoint
from progress_service.http_limits import http_rate_limit_config
from progress_service.services import ChatHookFactory, Resources, Services, build_services
from progress_service.settings import Settings
from progress_service.state import set_services
from progress_service.store.db import create_engine
from progress_service.store.migrations import migrate
from worker.claude import resolve_binary
from worker.settings import build_worker

log = logging.getLogger("progress_service")

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


def make_redis(url: str, *, cluster: bool = False) -> Redis:
    """A Redis client that retries dropped connections (a cluster client with ``cluster``)."""
    return redis_client.make_redis(url, cluster=cluster)


def claude_is_available(settings: Settings) -> bool:
    """True when a worker started here runs the real Claude Code CLI (else: the replay program).

    Only ``dev`` (whose worker is in-process) asks; a job's ``demo`` flag is
    set by the worker that runs it.
    """
    return not resolve_binary(settings)[1]


def access_log(app: ASGIApp) -> ASGIApp:
    """Log each HTTP request's method, path and status.

    The query string is never logged: a misbehaving client may put secrets there.
    """

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, send_wrapper)
        finally:
            log.info("%s %s -> %s", scope["method"], scope["path"], status)
            if 400 <= status < 500:
                metrics.http_errors.labels(str(status)).inc()

    return middleware


#: Largest request body accepted (413 above it). A prompt of
#: ``PS_PROMPT_MAX_CHARS`` fits even fully ``\uXXXX``-escaped; nothing else
#: the API takes comes close.
MAX_BODY_BYTES = 2 << 20


def _client_error_handler(request: Request, exc: HTTPException) -> Response:
    detail = exc.detail
    if exc.status_code == 413 and detail == "Request Entity Too Large":  # Litestar's own, not a route's
        detail = f"request body larger than {MAX_BODY_BYTES} bytes"
    elif isinstance(detail, str) and detail.startswith("Validation failed for ") and "?" in detail:
        # Litestar echoes the whole URL; the query string may hold a secret
        # that would then sit in client logs and proxies. "extra" names the field.
        detail = detail.split("?", 1)[0]
    body: dict[str, object] = {"status_code": exc.status_code, "detail": detail}
    extra = getattr(exc, "extra", None)
    if extra:
        body["extra"] = extra
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 503:  # every 503 tells the client when to retry
        headers.setdefault("Retry-After", str(outage.RETRY_AFTER_SECONDS))
    return Response(body, status_code=exc.status_code, headers=headers or None)


def _bad_body_handler(request: Request, exc: Exception) -> Response:
    """Bodies the JSON decoder cannot even read: a 400 that says why, not a 500.

    msgspec raises ``UnicodeDecodeError`` for invalid UTF-8 and
    ``RecursionError`` for absurdly deep nesting, outside Litestar's own
    ``DecodeError`` → 400 mapping.
    """
    if isinstance(exc, UnicodeDecodeError):
        detail = f"request is not valid UTF-8 (byte {exc.start})"
    else:
        detail = "request body: JSON nested too deeply"
    return Response({"status_code": 400, "detail": detail}, status_code=400)


def _server_error_handler(request: Request, exc: Exception) -> Response:
    """A store/Redis outage is a 503 (see :mod:`progress_service.outage`); else a
    bug, logged with its traceback (path only: the query string may hold secrets)."""
    dependency = outage.classify(exc)
    if dependency is not None:
        outage.warn(dependency, f"{request.method} {request.url.path}", exc)
        return _unavailable(outage.describe(dependency))
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return Response({"status_code": 500, "detail": "Internal Server Error"}, status_code=500)


def _unavailable(detail: str) -> Response:
    return Response(
        {"status_code": 503, "detail": detail},
        status_code=503,
        headers={"Retry-After": str(outage.RETRY_AFTER_SECONDS)},
    )


def create_app(
    settings: Settings,
    *,
    redis_url: str,
    run_worker: bool = False,
    chat_hook: ChatHookFactory | None = None,
) -> Litestar:
    """The application. ``run_worker`` also runs an arq worker in this process (dev mode).

    Its lifespan is the composition root's runtime half: it opens the
    connections, builds the components (:func:`~progress_service.services.build_services`;
    ``chat_hook`` replaces the gateway's chat hook, for tests), runs their
    tasks and ends them. ``chat_hook`` does not change the HTTP comment routes.
    """

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        redis = make_redis(redis_url, cluster=settings.redis_cluster)
        engine = create_engine(settings.database_url)
        try:
            await migrate(engine)
            # PS_QUEUE_REDIS_URL: the queue may have a Redis of its own (arq cannot shard).
            arq_pool = await create_pool(queue.arq_redis_settings(settings.queue_url(redis_url)))
            redis_client.set_queue(redis, arq_pool)
            try:
                resources = Resources(settings=settings, redis_url=redis_url, redis=redis, engine=engine, arq=arq_pool)
                services = build_services(resources, chat_hook=chat_hook)
                set_services(app, services)
                async with anyio.create_task_group() as tg:
                    await tg.start(services.run)
                    if run_worker:
                        tg.start_soon(_run_worker, services)
                    try:
                        yield
                    finally:
                        await services.drain()
                        tg.cancel_scope.cancel()
            finally:
                await arq_pool.aclose()
        finally:
            await redis.aclose()
            await engine.dispose()

    handlers: list = [
        JobsController,
        JobLogController,
        SessionController,
        CommentsController,
        SteeringController,
        AuditController,
        TokensController,
        create_ticket,
        claude_code_hook,
        whoami,
        healthz,
        readyz,
        metrics_endpoint,
        ws_endpoint,
        job_stream,
    ]
    if WEB_DIR.is_dir():
        # Vendored files carry their version in the name: cache them for good.
        # The page's own files: a short cache, so a new version shows within a minute.
        handlers.append(
            create_static_files_router(
                path="/vendor",
                directories=[WEB_DIR / "vendor"],
                name="vendor",
                cache_control=CacheControlHeader(public=True, max_age=31_536_000, immutable=True),
                include_in_schema=False,
                opt=NO_AUTH,
            )
        )
        handlers.append(
            create_static_files_router(
                path="/",
                directories=[WEB_DIR],
                html_mode=True,
                name="web",
                cache_control=CacheControlHeader(max_age=60, must_revalidate=True),
                include_in_schema=False,
                opt=NO_AUTH,
            )
        )

    cors = CORSConfig(allow_origins=list(settings.allowed_origins)) if settings.allowed_origins else None
    # Counted in Redis, per user or client address, over every node, with
    # Services.http_limit (http_limits).
    rate_limit = http_rate_limit_config(
        settings,
        # Hooks have their own limit per reporter token (PS_HOOK_RATE): one
        # laptop's session must not spend the per-client budget of an office NAT.
        exclude=["/healthz", "/readyz", "/metrics", "/ws", "/schema", HOOKS_PATH],
    )
    return Litestar(
        route_handlers=handlers,
        lifespan=[lifespan],
        dependencies=DEPENDENCIES,
        # Authentication last: the rate limit counts refused requests too.
        middleware=[access_log, rate_limit.middleware, AUTHENTICATION],
        cors_config=cors,
        exception_handlers={
            HTTPException: _client_error_handler,
            UnicodeDecodeError: _bad_body_handler,
            RecursionError: _bad_body_handler,
            Exception: _server_error_handler,
        },
        request_max_body_size=MAX_BODY_BYTES,
        openapi_config=OpenAPIConfig(
            title="progress-service",
            version="1",
            path="/schema",
            # The renderer is vendored: the docs work offline, no CDN.
            render_plugins=[
                RapidocRenderPlugin(
                    js_url="/vendor/rapidoc-9.3.8-min.js",
                    path=["/", "/rapidoc"],
                    favicon='<link rel="icon" href="/favicon.svg" type="image/svg+xml">',
                )
            ],
        ),
        # Static assets only: API answers are small, and the SSE stream must not be buffered.
        compression_config=CompressionConfig(
            backend="brotli", brotli_gzip_fallback=True, minimum_size=1024, exclude=r"^/(api|ws|metrics|healthz|readyz)"
        ),
        debug=False,
    )


async def _run_worker(services: Services) -> None:
    """The in-process arq worker of ``dev`` mode, closed when the app stops."""
    worker = build_worker(services.settings, redis_url=services.redis_url, engine=services.engine, sweeper=False)
    try:
        await worker.async_run()
    finally:
        with anyio.CancelScope(shield=True):
            running = sum(not t.done() for t in worker.tasks.values())
            log.info("shutdown: stopping the worker; handing back %d running job(s)", running)
            await worker.close()
            log.info("shutdown: worker stopped")
