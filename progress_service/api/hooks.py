"""``POST /api/hooks/claude-code``: Claude Code's HTTP hooks report a session.

The CLI waits for each hook's answer, so this route only authenticates
(a ``reporter`` token, cached), rate-limits per token, decodes the body
tolerantly (unknown fields ignored; size, depth and types checked), makes
sure the session belongs to the caller's team (its first hook claims it),
queues the hook for :class:`~progress_service.hooks.ingest.Ingest` and
answers ``204`` with no body: nothing in the answer can change what the
session does. A full queue is a ``503``; everything refused is a 4xx with a
body that says why, and has no effect.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Any

import msgspec
from litestar import Request, post
from litestar.exceptions import (
    ClientException,
    HTTPException,
    NotAuthorizedException,
    PermissionDeniedException,
    ServiceUnavailableException,
    TooManyRequestsException,
    ValidationException,
)
from litestar.enums import ScopeType
from litestar.types import ASGIApp, HTTPResponseBodyEvent, HTTPResponseStartEvent, Receive, Scope, Send
from litestar.status_codes import HTTP_204_NO_CONTENT, HTTP_413_REQUEST_ENTITY_TOO_LARGE

from progress_service import metrics, outage
from progress_service.api.deps import error_responses
from progress_service.auth import bearer_token
from progress_service.hooks.body import KNOWN_EVENTS, HookInput, body_hash
from progress_service.hooks.gate import HookGate
from progress_service.hooks.ingest import HookItem, session_job_id
from progress_service.ids import now_ms
from progress_service.state import started_services, unwrap

PATH = "/api/hooks/claude-code"
#: Header that names the machine a session runs on (set by ``hooks install``).
HOST_HEADER = "x-ps-host"
RETRY_AFTER = "1"

_decoder = msgspec.json.Decoder(HookInput)
_error_enc = msgspec.json.Encoder()
log = logging.getLogger("progress_service.hooks")


def too_deep(value: Any, limit: int) -> bool:
    """True when ``value`` nests lists/objects deeper than ``limit``."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, (dict, list)))
    return False


def host_label(value: str | None) -> str | None:
    """The ``X-PS-Host`` label, printable and bounded (None when absent)."""
    value = "".join(ch for ch in (value or "").strip() if ch.isprintable())[:200]
    return value or None


def decode_hook(body: bytes, max_depth: int) -> HookInput:
    """The hook body, or a 400 that names what is wrong with it."""
    try:
        hook = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ValidationException(f"hook body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ValidationException(f"hook body is not JSON: {exc}") from None
    except (UnicodeDecodeError, RecursionError):
        raise ValidationException("hook body: not UTF-8, or nested too deeply") from None
    if hook.hook_event_name not in KNOWN_EVENTS:
        raise ValidationException(f"hook_event_name: unknown hook event {hook.hook_event_name[:100]!r}")
    if hook.tool_input is not None and too_deep(hook.tool_input, max_depth):
        raise ValidationException(f"tool_input: nested deeper than {max_depth}")
    return hook


async def accept(gate: HookGate, authorization: str | None, host: str | None, body: bytes) -> None:
    """Authenticate, limit, decode, claim and queue one hook; raises the 4xx/503 that refuses it."""
    started = time.perf_counter()
    settings = gate.settings
    token = bearer_token(authorization)
    if token is None:
        raise NotAuthorizedException("missing credentials: send 'Authorization: Bearer <reporter token>'")
    # A store or Redis outage raised from here is a 503 (``progress_service.outage``).
    principal = await gate.principal(token)
    if principal is None:
        raise NotAuthorizedException("invalid, expired or revoked token")
    if not principal.is_reporter:
        raise PermissionDeniedException(f"hooks need a token of role 'reporter'; this one is '{principal.role}'")
    if not await gate.take(principal.token_id):
        raise TooManyRequestsException(
            f"over {settings.hook_rate:g} hooks per second for this token (counted over every node)", headers={"Retry-After": RETRY_AFTER}
        )
    if len(body) > settings.hook_max_body_bytes:
        raise ClientException(
            f"hook body larger than {settings.hook_max_body_bytes} bytes", status_code=HTTP_413_REQUEST_ENTITY_TOO_LARGE
        )
    hook = decode_hook(body, settings.hook_max_depth)
    job_id = session_job_id(hook.session_id)
    await gate.claim(job_id, principal)
    item = HookItem(
        job_id=job_id,
        team_id=principal.team_id,
        user_id=principal.user_id,
        user_name=principal.user_name,
        host=host_label(host),
        hook=hook,
        raw_hash=body_hash(body),
        at=now_ms(),
    )
    if not gate.ingest.offer(item):
        metrics.hooks_received.labels("busy").inc()
        raise ServiceUnavailableException(
            f"{settings.hook_queue} hooks are waiting already; retry", headers={"Retry-After": RETRY_AFTER}
        )
    metrics.hooks_received.labels("queued").inc()
    metrics.hook_seconds.observe(time.perf_counter() - started)


@post(
    PATH,
    status_code=HTTP_204_NO_CONTENT,
    tags=["hooks"],
    summary="Report a Claude Code hook event (reporter tokens)",
    description="Point a Claude Code `http` hook here (`progress-service hooks install`). Answers 204 with no body.",
    responses=error_responses(400, 401, 403, 409, 413, 503),
)
async def claude_code_hook(request: Request[Any, Any, Any], hooks: HookGate) -> None:
    """Accept one hook event of a session the caller's team runs.

    :class:`HookFront` answers this path before Litestar in a served app;
    this route documents it and serves it under a ``root_path``.
    """
    await accept(hooks, request.headers.get("authorization"), request.headers.get(HOST_HEADER), await request.body())


class HookFront:
    """ASGI layer in front of the app: hook posts skip Litestar's routing and access log.

    A busy session posts several hooks a second and a team's sessions add
    up; Litestar's per-request machinery (routing, DI, its middleware stack,
    the access log line) was most of the CPU of a post. This runs the same
    :func:`accept` and answers ``204``, or the same JSON error body the app's
    handlers give (``{"status_code", "detail"}``). Refusals are logged, not
    every accepted post.
    """

    __slots__ = ("app",)

    def __init__(self, app: ASGIApp) -> None:
        #: The wrapped app (``state.unwrap`` follows ``.app``).
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine: see HealthFront.__call__.
        if scope["type"] != ScopeType.HTTP or scope["path"] != PATH or scope["method"] != "POST" or scope.get("root_path"):
            return self.app(scope, receive, send)
        return self._post(scope, receive, send)

    async def _post(self, scope: Scope, receive: Receive, send: Send) -> None:
        services = started_services(unwrap(self.app))
        if services is None:  # not started yet: the app decides
            await self.app(scope, receive, send)
            return
        gate = services.hooks
        headers = {name: value for name, value in scope["headers"] if name in (b"authorization", b"x-ps-host")}
        limit = gate.settings.hook_max_body_bytes
        status, payload = 204, b""
        extra: list[tuple[bytes, bytes]] = []
        try:
            body = await _read_body(receive, limit)
            await accept(gate, _h(headers.get(b"authorization")), _h(headers.get(b"x-ps-host")), body)
        except HTTPException as exc:
            status = exc.status_code
            payload = _error_enc.encode({"status_code": status, "detail": exc.detail})
            extra = [(k.lower().encode(), str(v).encode()) for k, v in (exc.headers or {}).items()]
            extra.append((b"content-type", b"application/json"))
            log.info("POST %s -> %s", PATH, status)
            metrics.http_errors.labels(str(status)).inc()
        except Exception as exc:  # noqa: BLE001 - an outage is a 503, anything else a logged 500
            dependency = outage.classify(exc)
            if dependency is not None:
                outage.warn(dependency, f"POST {PATH}", exc)
                status, detail = 503, outage.describe(dependency)
                extra = [(b"retry-after", str(outage.RETRY_AFTER_SECONDS).encode())]
            else:
                log.exception("unhandled error in POST %s", PATH)
                status, detail, extra = 500, "Internal Server Error", []
            payload = _error_enc.encode({"status_code": status, "detail": detail})
            extra.append((b"content-type", b"application/json"))
        headers_out: list[tuple[bytes, bytes]] = [(b"content-length", str(len(payload)).encode()), *extra] if status != 204 else extra
        start: HTTPResponseStartEvent = {"type": "http.response.start", "status": status, "headers": headers_out}
        await send(start)
        end: HTTPResponseBodyEvent = {"type": "http.response.body", "body": payload, "more_body": False}
        await send(end)


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientException("the client went away", status_code=400)
        chunk = message.get("body", b"")
        if not isinstance(chunk, bytes):
            raise ClientException("the client went away", status_code=400)
        size += len(chunk)
        if size > limit:
            raise ClientException(f"hook body larger than {limit} bytes", status_code=HTTP_413_REQUEST_ENTITY_TOO_LARGE)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _h(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None
