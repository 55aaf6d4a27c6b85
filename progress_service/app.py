"""``create_app``: the Litestar application — HTTP API, WebSocket gateway, web page."""

from __future__ import annotations

import logging
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from arq import create_pool
from litestar import Litestar, Request, Response
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from litestar.config.cors import CORSConfig
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.middleware.rate_limit import RateLimitConfig
from litestar.openapi import OpenAPIConfig
from litestar.static_files import create_static_files_router
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from progress_service import metrics, queue
from progress_service.api.audit import AuditController, TokensController
from progress_service.api.comments import CommentsController
from progress_service.api.deps import provide_principal, provide_services
from progress_service.api.health import healthz, metrics_endpoint, readyz
from progress_service.api.joblog import JobLogController
from progress_service.api.jobs import JobsController
from progress_service.api.me import whoami
from progress_service.api.tickets import create_ticket
from progress_service.comments import Comments
from progress_service.revocation import RevocationWatcher
from progress_service.services import Services
from progress_service.settings import Settings
from progress_service.store.audit import Audit
from progress_service.store.db import create_engine
from progress_service.store.migrations import migrate

log = logging.getLogger("progress_service")

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


def make_redis(url: str) -> Redis:
    """A Redis client that retries dropped connections instead of failing the request."""
    return Redis.from_url(
        url,
        socket_connect_timeout=5,
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=5),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionResetError],
    )


def claude_is_available(settings: Settings) -> bool:
    """True when a real Claude Code binary will run jobs (else: the replay program)."""
    if settings.claude_bin:
        return True
    return shutil.which("claude") is not None


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
    if exc.status_code == 413:
        detail = f"request body larger than {MAX_BODY_BYTES} bytes"
    elif isinstance(detail, str) and detail.startswith("Validation failed for ") and "?" in detail:
        # Litestar echoes the whole URL; the query string may hold a secret
        # that would then sit in client logs and proxies. "extra" names the field.
        detail = detail.split("?", 1)[0]
    body: dict[str, object] = {"status_code": exc.status_code, "detail": detail}
    extra = getattr(exc, "extra", None)
    if extra:
        body["extra"] = extra
    return Response(body, status_code=exc.status_code, headers=getattr(exc, "headers", None) or None)


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
    """Log a bug with its traceback (path only: the query string may hold secrets)."""
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return Response({"status_code": 500, "detail": "Internal Server Error"}, status_code=500)


def create_app(
    settings: Settings,
    *,
    redis_url: str,
    run_worker: bool = False,
) -> Litestar:
    """The application. ``run_worker`` also runs an arq worker in this process (dev mode)."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        from progress_service.gateway import Gateway  # noqa: PLC0415 - gateway imports services

        redis = make_redis(redis_url)
        engine = create_engine(settings.database_url)
        await migrate(engine)
        arq_pool = await create_pool(queue.arq_redis_settings(redis_url))
        services = Services(
            settings=settings,
            redis_url=redis_url,
            redis=redis,
            engine=engine,
            arq=arq_pool,
            demo=not claude_is_available(settings),
        )
        services.gateway = Gateway(services)
        # The hooks the gateway and the API call: durable comments, the
        # non-blocking audit writer, and revocation closing live connections.
        audit = services.extras["audit"] = Audit(engine)
        comments = services.extras["comments"] = Comments.from_services(services)
        revocations = services.extras["revocations"] = RevocationWatcher(services)
        app.state.services = services
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(services.gateway.run)
                tg.start_soon(audit.run)  # flushes what is queued on the way out
                tg.start_soon(revocations.run)
                # Lost-worker recovery runs here too, so a job whose worker
                # vanished is retried or failed even when no worker is alive.
                tg.start_soon(_run_sweeper, services)
                if run_worker:
                    tg.start_soon(_run_worker, services)
                try:
                    yield
                finally:
                    await services.gateway.close_all()
                    # The comment writer task is Comments' own; end it here.
                    await comments.aclose()
                    tg.cancel_scope.cancel()
        finally:
            await arq_pool.aclose()
            await redis.aclose()
            await engine.dispose()

    from progress_service.gateway import route_handlers as gateway_handlers  # noqa: PLC0415

    handlers: list = [
        JobsController,
        JobLogController,
        CommentsController,
        AuditController,
        TokensController,
        create_ticket,
        whoami,
        healthz,
        readyz,
        metrics_endpoint,
        *gateway_handlers,
    ]
    if WEB_DIR.is_dir():
        handlers.append(create_static_files_router(path="/", directories=[WEB_DIR], html_mode=True, name="web"))

    cors = CORSConfig(allow_origins=list(settings.allowed_origins)) if settings.allowed_origins else None
    rate_limit = RateLimitConfig(
        rate_limit=("minute", settings.http_rate_limit),
        exclude=["/healthz", "/readyz", "/metrics", "/ws", "/schema"],
    )
    return Litestar(
        route_handlers=handlers,
        lifespan=[lifespan],
        dependencies={"services": Provide(provide_services), "principal": Provide(provide_principal)},
        middleware=[access_log, rate_limit.middleware],
        cors_config=cors,
        exception_handlers={
            HTTPException: _client_error_handler,
            UnicodeDecodeError: _bad_body_handler,
            RecursionError: _bad_body_handler,
            Exception: _server_error_handler,
        },
        request_max_body_size=MAX_BODY_BYTES,
        openapi_config=OpenAPIConfig(title="progress-service", version="1", path="/schema"),
        debug=False,
    )


async def _run_sweeper(services: Services) -> None:
    """The lost-worker sweeper (:class:`worker.jobs.Sweeper`) for the app's lifetime."""
    from worker.recovery import Sweeper  # noqa: PLC0415 - the worker package is optional in serve mode

    await Sweeper(services.arq, services.engine, services.settings).run()


async def _run_worker(services: Services) -> None:
    """The in-process arq worker of ``dev`` mode, closed when the app stops."""
    from worker.settings import build_worker  # noqa: PLC0415 - worker is optional in serve mode

    worker = build_worker(services.settings, redis_url=services.redis_url, engine=services.engine, sweeper=False)
    try:
        await worker.async_run()
    finally:
        with anyio.CancelScope(shield=True):
            await worker.close()
