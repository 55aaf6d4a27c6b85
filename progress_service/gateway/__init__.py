"""The realtime gateway: ``/ws`` (protocol v1) and the SSE stream of a job.

Laid out like centrifuge: ``endpoint`` (transport, handshake guard),
``session`` (one connection's protocol state; its client messages are
handled by ``frames``, ``credentials``, ``rooms``, ``chat`` and ``steer``),
``hub`` (this process's rooms and the one stream reader), ``outbox``
(bounded queue and sender), ``presence`` (room members in Redis),
``limits`` and ``closes`` (one table of close codes).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from typing import TYPE_CHECKING

import anyio

from progress_service import closes, metrics
from progress_service.auth import PrincipalCache
from progress_service.closes import Close
from progress_service.gateway.chat import CommentsHook
from progress_service.gateway.endpoint import install_log_redaction, remove_log_redaction
from progress_service.gateway.hub import Hub
from progress_service.gateway.job_access import JobAccess, StoreGate
from progress_service.gateway.limits import ConnectionCap
from progress_service.gateway.outbox import Outbox, OutboxStats, WriteWindow
from progress_service.gateway.presence import Presence
from progress_service.gateway.joins import JoinReads
from progress_service.gateway.steer import SteeringHook

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from sqlalchemy.ext.asyncio import AsyncEngine

    from progress_service.gateway.session import Session
    from progress_service.services import Resources
    from progress_service.store.audit import Audit
    from progress_service.store.identity import Principal

log = logging.getLogger("progress_service.gateway")


def new_node_id() -> str:
    """A name for this gateway node, unique over the deployment (host, pid, random)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class SseStreams:
    """The SSE streams of this process: their outboxes, closed at shutdown.

    Each stream counts in its user's connections cap (``Gateway.connections``,
    over every node) with the user's WebSockets.
    """

    def __init__(self) -> None:
        self.outboxes: set[Outbox] = set()

    def opened(self, outbox: Outbox) -> None:
        """Track a new stream."""
        self.outboxes.add(outbox)

    def ended(self, outbox: Outbox) -> None:
        """Forget a finished stream."""
        self.outboxes.discard(outbox)

    def close_all(self) -> None:
        """End every stream at once (the EventSource resumes elsewhere with Last-Event-ID)."""
        for outbox in list(self.outboxes):
            outbox.close()


class Gateway:
    """The gateway of one process: its sessions, hub, presence and SSE streams.

    ``comments``, ``steering`` and ``audit`` are the hooks a session calls
    (None: that part answers ``unavailable`` / records nothing);
    ``connections`` is the per-user cap over all nodes.
    """

    def __init__(
        self,
        resources: Resources,
        *,
        comments: CommentsHook | None,
        steering: SteeringHook | None,
        audit: Audit | None,
        principals: PrincipalCache,
        connections: ConnectionCap,
    ) -> None:
        self.settings = resources.settings
        self.engine: AsyncEngine = resources.engine
        self.redis: Redis = resources.redis
        self.comments = comments
        self.steering = steering
        self.audit = audit
        #: The node's name (chosen with its connection cap, whose Redis entries carry it).
        self.node_id = connections.node_id
        self.hub = Hub(resources, self.node_id)
        self.presence = Presence(
            resources.redis, self.node_id, grace=self.settings.presence_grace, ttl=self.settings.presence_node_ttl
        )
        self.joins = JoinReads(resources.redis, self.presence)
        #: Batching connections' senders wake together at the end of a short window (outbox.py).
        self.write_window = WriteWindow(self.settings.ws_write_window)
        #: Bytes queued in, and frames sent from, this process's outboxes (the metrics).
        self.outbox_stats = OutboxStats()
        self.sse = SseStreams()
        self.sessions: dict[str, Session] = {}
        #: API-token principals trusted for a short while (evicted by close_token).
        self.principals = principals
        #: The store reads of joins and auths: bounded concurrency, bounded queue wait.
        self.store_gate = StoreGate(
            self.settings.ws_store_slots, wait=self.settings.ws_store_wait, timeout=self.settings.store_timeout
        )
        #: Who may join which room (positive answers cached: a job never changes team).
        self.access = JobAccess(resources.engine, self.store_gate)
        #: The per-user connection cap, counted in Redis over every node (its task runs in Services.run).
        self.connections = connections
        self.closing = False
        self._closed: anyio.Event | None = None

    async def run(self) -> None:
        """Run the hub, the presence task and the join reads until cancelled.

        For as long as it runs, uvicorn's log lines lose query strings and
        the outbox gauge reads this gateway's outboxes.
        """
        install_log_redaction()
        metrics.ws_outbox_bytes.set_function(self.outbox_stats.queued)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.hub.run)
                tg.start_soon(self.presence.run)
                tg.start_soon(self.joins.run)
        finally:
            metrics.ws_outbox_bytes.set_function(lambda: 0)
            remove_log_redaction()

    def register(self, session: Session) -> None:
        """Track an accepted connection (authenticated or not) for close_all."""
        self.sessions[session.id] = session

    async def admit(self, session: Session, principal: Principal) -> bool:
        """Count an authenticated connection against its user's cap (over all nodes)."""
        if not await self.connections.admit(principal.user_id, session.id):
            return False
        session.counted_for = principal.user_id
        return True

    def unregister(self, session: Session) -> None:
        """Forget a finished connection."""
        self.sessions.pop(session.id, None)
        uid = session.counted_for
        if uid is not None:
            session.counted_for = None
            self.connections.release(uid, session.id)

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

    async def close_all(self) -> None:
        """Close every connection with 1001 ``server restarting``, end SSE streams, refuse new ones.

        Runs once: a later call waits for the first to finish.
        """
        if self._closed is not None:
            await self._closed.wait()
            return
        self._closed = anyio.Event()
        self.closing = True
        try:
            self.sse.close_all()
            count = len(self.sessions)
            await self._close(list(self.sessions.values()), closes.RESTARTING)
            log.info("shutdown: closed %d WebSocket connection(s) with 1001", count)
        finally:
            self._closed.set()

    async def close_token(self, token_id: str, code: int = closes.REVOKED.code, reason: str = closes.REVOKED.reason) -> None:
        """Close the connections authenticated with ``token_id`` (revocation: 4403 ``token revoked``).

        The token's cached principal is evicted first, so no new connection
        is admitted with it from this process's cache.
        """
        self.principals.revoke(token_id)
        targets = [s for s in self.sessions.values() if s.principal is not None and s.principal.token_id == token_id]
        await self._close(targets, Close(code, closes.clip_reason(reason)))


__all__ = ["Gateway", "SseStreams"]
