"""Running the app under uvicorn with the gateway's shutdown order."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from litestar import Litestar

from progress_service.api.health import HealthFront
from progress_service.api.hooks import HookFront
from progress_service.gateway.direct_send import DirectSendProtocol
from progress_service.gateway.endpoint import GatewayFront
from progress_service.settings import Settings
from progress_service.state import started_services, unwrap


log = logging.getLogger("progress_service.server")

#: The cyclic garbage collector's thresholds while serving (see :func:`tune_gc`).
GC_THRESHOLDS = (50_000, 20, 10)


def tune_gc() -> None:
    """Make the cyclic garbage collector run far less often in a serving process.

    The fan-out allocates short-lived containers at a high rate (parsed XREAD
    replies, one future and one handle per sender wake-up, frames), while the
    process holds hundreds of thousands of long-lived objects (a session, its
    tasks and buffers per connection). With the default gen-0 threshold of
    700, a many_rooms run (2,000 connections) made 829 collections, 7 of
    them full, costing 1.27 s of the process's 8.6 s CPU (measured with
    ``gc.callbacks`` and thread time), and the longest pause was 423 ms: a
    full collection walks every tracked object, and its cost is charged to
    whatever line allocated (hiredis ``gets()``, ``call_soon``: the
    "unexplained" hot spots of the profile). With these thresholds: 7
    collections, 0.12 s, longest 68 ms. The objects present at start
    (modules, the app) are frozen out of the scans altogether. Reference
    counting still frees everything without cycles at once; cyclic garbage
    waits for the next (rarer) collection.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)



class Server(uvicorn.Server):
    """uvicorn with the service's shutdown order, and a signal stop that is a clean exit.

    On SIGINT/SIGTERM: stop accepting connections, close every WebSocket
    with 1001 ``server restarting`` (uvicorn's own shutdown would send 1012;
    1001 lets clients reconnect elsewhere and resume with ``since``), let
    HTTP requests finish, then run the app's lifespan shutdown (which hands
    the in-process worker's running jobs back). Each step logs one line.

    uvicorn re-raises the signal that stopped it once it is done (so the
    process dies of it); here a stop asked by a signal is the normal way
    out: ``serve`` returns and the command exits 0 after its own cleanup
    (e.g. ``dev``'s embedded Redis, which must outlive the hand-back).
    """

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        tune_gc()
        await super().startup(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            if self._captured_signals:
                log.info("shutdown: stopped by %s", signal.Signals(self._captured_signals[-1]).name)
            self._captured_signals.clear()  # nothing to re-raise: see the class docstring

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        services = started_services(unwrap(self.config.loaded_app))
        if services is not None:  # 0. /readyz answers 503 from now on (load balancers take the node out)
            services.readiness.drain()
            await self._drain_delay(services.settings.drain_seconds)
        for server in self.servers:  # 1. no new connections (uvicorn does it again: harmless)
            server.close()
        for sock in sockets or []:
            sock.close()
        log.info("shutdown: stopped accepting connections")
        if services is not None:  # 2. WebSockets 1001 (the lifespan's drain then finds them closed)
            await services.gateway.close_all()
        await super().shutdown(sockets)  # 3. requests finish, then the lifespan (worker hand-back)

    async def _drain_delay(self, delay: float) -> None:
        """Keep serving ``PS_DRAIN_SECONDS`` with /readyz at 503, so load balancers take the node out first.

        A second signal (uvicorn's ``force_exit``) cuts it short.
        """
        if delay <= 0:
            return
        log.info("shutdown: draining, /readyz answers 503 for %.1f s before connections close", delay)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not self.force_exit:
            await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def connection_options(settings: Settings, ws: type[asyncio.Protocol] | str = DirectSendProtocol) -> dict[str, Any]:
    """uvicorn's settings for each connection: the WebSocket protocol, its limits and heartbeats, proxies, access log.

    ``ws``: uvicorn's WebSocket protocol; by default its websockets-sansio one
    plus a synchronous frame writer for the fan-out (gateway/direct_send.py).
    Shared with ``bench/floor.py``, which measures uvicorn as the gateway runs it.
    """
    return {
        "ws": ws,
        # Frames a little over the protocol limit reach the gateway, which
        # closes 1009 with its own reason; giant ones are refused unread.
        "ws_max_size": settings.ws_max_frame_bytes * 2 + 1024,
        "ws_ping_interval": settings.ws_ping_interval,
        "ws_ping_timeout": settings.ws_ping_timeout,
        "ws_per_message_deflate": settings.ws_per_message_deflate,
        "access_log": False,
        # X-Forwarded-For/-Proto only from PS_TRUSTED_PROXIES (none by default;
        # uvicorn's own default trusts loopback): see http_limits.
        "forwarded_allow_ips": list(settings.trusted_proxies),
        # With none trusted, uvicorn's proxy-headers layer changes nothing but
        # would hold a frame for each WebSocket's life.
        "proxy_headers": bool(settings.trusted_proxies),
    }


def make_config(app: Litestar, settings: Settings, *, host: str, port: int,
                ws: type[asyncio.Protocol] | str = DirectSendProtocol, **extra: Any) -> uvicorn.Config:
    """uvicorn settings that match the protocol's limits and heartbeats (:func:`connection_options`)."""
    return uvicorn.Config(
        # `/ws` handshakes skip Litestar's routing (same guard, same session);
        # so do Claude Code hook posts (same checks, same answers).
        # /readyz and /healthz are answered before all of it (api/health.py).
        HealthFront(HookFront(GatewayFront(app))),
        host=host,
        port=port,
        lifespan="on",
        **connection_options(settings, ws),
        # The fronts are plain callables returning the app's awaitable (not
        # coroutine functions), which uvicorn's guess would take for ASGI 2.
        interface="asgi3",
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
        **extra,
    )
