"""``GET /ws``: the raw WebSocket handler and the handshake guard.

The guard runs before accept, so a refusal is an HTTP 403 to the handshake:
a browser ``Origin`` that is neither this host nor allow-listed (cross-site
WebSocket hijacking), or credentials in the query string (which proxies and
access logs would keep). The token arrives in the first message instead.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast
from urllib.parse import parse_qsl, urlsplit

from litestar import Litestar, WebSocket, websocket
from litestar.connection import ASGIConnection
from litestar.exceptions import PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send

from progress_service import closes, metrics
from progress_service.gateway.session import Session
from progress_service.state import services_of, started_services

#: Query parameters that look like credentials; their presence refuses the handshake.
SECRET_PARAMS = frozenset({"token", "ticket", "access_token", "auth"})


def handshake_refusal(query: bytes, origin: str | None, host: str | None, allowed: tuple[str, ...]) -> str | None:
    """Why a handshake is refused (a secret in the URL, a foreign Origin), or None.

    The reason never repeats the query string.
    """
    if query:
        names = {name.lower() for name, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True)}
        if names & SECRET_PARAMS:
            return "credentials are not accepted in the URL; send them in the auth message"
    if origin is not None and not origin_allowed(origin, host, allowed):
        return "origin not allowed"
    return None


async def handshake_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Refuse (403 before accept) a foreign Origin or a secret in the URL.

    ``async`` although it never awaits: Litestar runs a sync guard in a
    worker thread, a thread hop per handshake (about 12 % of a mass connect).
    Only reached when :class:`GatewayFront` did not take the handshake.
    """
    refusal = handshake_refusal(
        connection.scope.get("query_string", b""),
        connection.headers.get("origin"),
        connection.headers.get("host"),
        services_of(connection.app).settings.allowed_origins,
    )
    if refusal is not None:
        raise PermissionDeniedException(refusal)


def origin_allowed(origin: str, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Same origin (the Origin's host:port equals the Host header) or allow-listed."""
    normalized = origin.strip().rstrip("/").lower()
    if normalized in {o.rstrip("/").lower() for o in allowed}:
        return True
    parts = urlsplit(normalized)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False  # includes the opaque origin "null"
    return host is not None and parts.netloc == host.strip().lower()


#: Scope key under which :func:`keep_asgi_send` leaves the server's ``send``.
ASGI_SEND = "ps.asgi_send"


def keep_asgi_send(app: ASGIApp) -> ASGIApp:
    """Route middleware: remember the ``send`` this route was called with.

    Litestar wraps ``send`` twice more below this point (its route-level
    exception middleware and ``WebSocket``'s disconnected-state check), two
    coroutine calls per frame on the fan-out hot path. The session sends
    frames through this one instead; a vanished peer still surfaces as
    uvicorn's ``ClientDisconnected`` (an ``OSError``), which the session
    handles.
    """

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        # Our own scope key: the ASGI scope is a dict, its TypedDict names only the standard keys.
        cast(dict[str, Any], scope)[ASGI_SEND] = send
        await app(scope, receive, send)

    return middleware


@websocket("/ws", guards=[handshake_guard], name="ws", middleware=[keep_asgi_send])
async def ws_endpoint(socket: WebSocket[Any, Any, Any]) -> None:
    """The realtime gateway (protocol v1, docs/protocol.md)."""
    gateway = services_of(socket.app).gateway
    await socket.accept()
    if gateway.closing:
        await socket.close(code=closes.RESTARTING.code, reason=closes.RESTARTING.reason)
        return
    asgi_send = cast("Send | None", cast(dict[str, Any], socket.scope).get(ASGI_SEND))
    if asgi_send is not None:
        socket.send = asgi_send
    await Session(gateway, socket).run()


class RawSocket:
    """The little of a WebSocket a :class:`Session` uses, straight on ASGI.

    A Litestar ``WebSocket`` wraps ``receive`` and ``send`` and carries its
    own connection state; the session needs none of it (it handles the
    disconnect event and uvicorn's ``ClientDisconnected`` itself).
    """

    __slots__ = ("receive", "scope", "send")

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Send the close frame (before accept, uvicorn answers HTTP 403)."""
        await self.send({"type": "websocket.close", "code": code, "reason": reason or ""})


#: The paths :class:`GatewayFront` serves itself (Litestar's route serves the same).
WS_PATHS = frozenset({"/ws"})


class GatewayFront:
    """ASGI layer in front of the app: ``/ws`` handshakes skip Litestar.

    Litestar's per-connection routing (scope state, a route-handler copy for
    the guard, the ``WebSocket`` object and its wrappers) was about 15 % of a
    mass connect. This layer applies the same guard (403 before accept, the
    query string never logged) and runs the same :class:`Session`; every
    other scope, and ``/ws`` under a ``root_path``, goes to the app, whose
    ``/ws`` route stays as it was.
    """

    __slots__ = ("app",)

    def __init__(self, app: Litestar) -> None:
        #: The wrapped app (``state.unwrap`` follows ``.app``).
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.WEBSOCKET or scope["path"] not in WS_PATHS or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        services = started_services(self.app)
        if services is None:  # not started yet (lifespan): the app's route decides
            await self.app(scope, receive, send)
            return
        origin = host = None
        for name, value in scope["headers"]:
            if name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"host":
                host = value.decode("latin-1")
        socket = RawSocket(scope, receive, send)
        gateway = services.gateway
        refusal = handshake_refusal(scope.get("query_string", b""), origin, host, gateway.settings.allowed_origins)
        if refusal is not None:
            # Any close before accept is an HTTP 403 to the handshake.
            close = closes.handshake_refused(refusal)
            await socket.close(code=close.code, reason=close.reason)
            return
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept", "subprotocol": None, "headers": []})
        # The guard has read them; the scope lives as long as the connection.
        scope["headers"] = []
        if gateway.closing:
            await socket.close(code=closes.RESTARTING.code, reason=closes.RESTARTING.reason)
            return
        await Session(gateway, socket).run()


class RedactQueryString(logging.Filter):
    """Drops the query string from uvicorn's WebSocket and access log lines.

    uvicorn logs ``"WebSocket /ws?…" 403`` with the full query string; a
    misbehaving client may have put its token there.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(isinstance(a, str) and "?" in a for a in args):
            record.args = tuple(a.split("?", 1)[0] + "?…" if isinstance(a, str) and a.startswith("/") and "?" in a else a for a in args)
        return True


class QuietClientFrameErrors(logging.Filter):
    """uvicorn's traceback per malformed client frame becomes a counted, throttled warning.

    uvicorn logs every text frame that is not valid UTF-8 with
    ``logger.exception`` (the client gets 1007): a client's mistake, not a
    server bug, and a log flood for whoever sends them in a loop. Each one
    is counted (``ps_ws_client_frame_errors_total``); one warning line, without
    a traceback, goes out per ``interval`` seconds with the count.
    """

    #: uvicorn's messages for a client's malformed frame (not "Exception in ASGI application").
    MESSAGES = {"Invalid UTF-8 sequence received from client.": "invalid UTF-8"}

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.interval = interval
        self._last = -interval
        self._count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        kind = self.MESSAGES.get(str(record.msg))
        if kind is None:
            return True
        metrics.ws_client_frame_errors.labels(kind).inc()
        self._count += 1
        now = time.monotonic()
        if now - self._last < self.interval:
            return False
        self._last = now
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg = "WebSocket: a client sent %s (closed 1007); %d such frame(s) since start"
        record.args = (kind, self._count)
        return True


class _LogFilters:
    """uvicorn's log filters, attached while at least one gateway runs (several may share a process)."""

    def __init__(self) -> None:
        self.users = 0
        self.filters: tuple[logging.Filter, ...] = ()

    def install(self) -> None:
        self.users += 1
        if self.users > 1:
            return
        self.filters = (RedactQueryString(), QuietClientFrameErrors())
        for name in ("uvicorn.error", "uvicorn.access"):
            for flt in self.filters:
                logging.getLogger(name).addFilter(flt)

    def remove(self) -> None:
        self.users -= 1
        if self.users > 0:
            return
        for name in ("uvicorn.error", "uvicorn.access"):
            for flt in self.filters:
                logging.getLogger(name).removeFilter(flt)
        self.filters = ()


# uvicorn's loggers are process-wide, so the count of their users is too.
_log_filters = _LogFilters()


def install_log_redaction() -> None:
    """Attach the redaction and frame-error filters to uvicorn's loggers (until the matching remove)."""
    _log_filters.install()


def remove_log_redaction() -> None:
    """Undo one :func:`install_log_redaction`; the filters go with the last one."""
    _log_filters.remove()
