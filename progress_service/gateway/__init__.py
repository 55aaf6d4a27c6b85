"""The realtime gateway: ``/ws`` (protocol v1) and the SSE stream of a job.

Laid out like centrifuge: ``endpoint`` (transport, handshake guard),
``session`` (one connection's protocol state), ``hub`` (this process's rooms
and the one stream reader), ``outbox`` (bounded queue and sender),
``presence`` (room members in Redis), ``limits`` and ``closes`` (one table
of close codes).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections import Counter
from typing import TYPE_CHECKING

import anyio

from progress_service import closes
from progress_service.api.stream import job_stream
from progress_service.auth import PrincipalCache
from progress_service.closes import Close
from progress_service.gateway.endpoint import install_log_redaction, ws_endpoint
from progress_service.gateway.hub import Hub
from progress_service.gateway.job_access import JobAccess, StoreGate
from progress_service.gateway.outbox import WriteWindow
from progress_service.gateway.presence import Presence
from progress_service.gateway.session import JoinReads

if TYPE_CHECKING:
    from litestar.handlers import HTTPRouteHandler, WebsocketRouteHandler

    from progress_service.gateway.session import Session
    from progress_service.services import Services
    from progress_service.store.identity import Principal


class Gateway:
    """The gateway of one process: its sessions, hub and presence."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings
        self.node_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.hub = Hub(services, self.node_id)
        self.presence = Presence(services.redis, self.node_id, grace=self.settings.presence_grace)
        self.joins = JoinReads(services.redis, self.presence)
        #: Batching connections' senders wake together at the end of a short window (outbox.py).
        self.write_window = WriteWindow(self.settings.ws_write_window)
        self.sessions: dict[str, Session] = {}
        #: API-token principals trusted for a short while (evicted by close_token).
        self.principals = PrincipalCache()
        #: The store reads of joins and auths: bounded concurrency, bounded queue wait.
        self.store_gate = StoreGate(
            self.settings.ws_store_slots, wait=self.settings.ws_store_wait, timeout=self.settings.store_timeout
        )
        #: Who may join which room (positive answers cached: a job never changes team).
        self.access = JobAccess(services.engine, self.store_gate)
        self._per_user: Counter[str] = Counter()
        self.closing = False
        self.route_handlers = route_handlers
        if services.gateway is None:
            services.gateway = self
        install_log_redaction()

    async def run(self) -> None:
        """Run the hub, the presence task and the join reads until cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.hub.run)
            tg.start_soon(self.presence.run)
            tg.start_soon(self.joins.run)

    def register(self, session: Session) -> None:
        """Track an accepted connection (authenticated or not) for close_all."""
        self.sessions[session.id] = session

    def admit(self, session: Session, principal: Principal) -> bool:
        """Count an authenticated connection against its user's cap."""
        if self._per_user[principal.user_id] >= self.settings.ws_max_connections_per_user:
            return False
        self._per_user[principal.user_id] += 1
        session.counted_for = principal.user_id
        return True

    def unregister(self, session: Session) -> None:
        """Forget a finished connection."""
        self.sessions.pop(session.id, None)
        uid = session.counted_for
        if uid is not None:
            session.counted_for = None
            self._per_user[uid] -= 1
            if self._per_user[uid] <= 0:
                del self._per_user[uid]

    @property
    def job_teams(self) -> dict[str, str]:
        """job id -> team id of the jobs this process has let someone join."""
        return self.access.teams

    def remember_job_team(self, job_id: str, team_id: str) -> None:
        """Cache a job's team (see :class:`JobAccess`)."""
        self.access.remember(job_id, team_id)

    async def _close(self, targets: list[Session], close: Close) -> None:
        for s in targets:
            s.request_close(close)
        with anyio.move_on_after(self.settings.ws_send_timeout + 1):
            for s in targets:
                await s.wait_done()

    async def close_all(self, code: int = closes.RESTARTING.code, reason: str = closes.RESTARTING.reason) -> None:
        """Close every connection (1001 ``server restarting`` by default) and refuse new ones."""
        self.closing = True
        for outbox in list(self.services.extras.get("sse_outboxes", ())):
            outbox.close()  # SSE streams end (see api/stream.py)
        await self._close(list(self.sessions.values()), Close(code, closes.clip_reason(reason)))

    async def close_token(self, token_id: str, code: int = closes.REVOKED.code, reason: str = closes.REVOKED.reason) -> None:
        """Close the connections authenticated with ``token_id`` (revocation: 4403 ``token revoked``).

        The token's cached principal is evicted first, so no new connection
        is admitted with it from this process's cache.
        """
        self.principals.revoke(token_id)
        targets = [s for s in self.sessions.values() if s.principal is not None and s.principal.token_id == token_id]
        await self._close(targets, Close(code, closes.clip_reason(reason)))


#: The /ws handler and the SSE handler, for ``Litestar(route_handlers=[...])``.
route_handlers: list[HTTPRouteHandler | WebsocketRouteHandler] = [ws_endpoint, job_stream]

__all__ = ["Gateway", "route_handlers"]
