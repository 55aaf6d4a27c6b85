"""``GET /api/jobs/{id}/stream``: a job's events as Server-Sent Events.

For one-way watchers (curl, proxies that break WebSockets). Same Bearer
auth as the HTTP API; another team's job is a 404 like an unknown one.
The first message is ``event: joined`` (snapshot and head), then ``gap`` if
events after ``Last-Event-ID`` are gone, the events after it (from Redis, or
from the store's archive for what Redis no longer holds), then
live ones; every room item has an ``id:`` line (the stream id) so a
reconnecting EventSource resumes with ``Last-Event-ID``. ``event:`` is the
protocol message type (``event``, ``chat``) and ``data:`` the protocol
message itself. A ``: heartbeat`` comment goes out when idle.

The stream ends once the job is terminal and everything retained has been
sent (so ``curl`` returns); an SSE client whose buffer overflows is cut off
and resumes with ``Last-Event-ID``. SSE watchers are not shown in presence.
Live delivery goes through the process's hub: one Redis read per event per
process, not per watcher.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from litestar import Request, get
from litestar.exceptions import (
    NotFoundException,
    TooManyRequestsException,
    ValidationException,
)
from litestar.response import ServerSentEvent, ServerSentEventMessage

from progress_service import history, outage, streams
from progress_service.api.deps import error_responses
from progress_service.events import TERMINAL_STATUSES
from progress_service.gateway import Gateway
from progress_service.gateway.hub import Member
from progress_service.gateway.outbox import Outbox
from progress_service.gateway.subscription import announce, resume_point
from progress_service.ids import is_event_id, is_job_id, room_id
from progress_service.services import Services
from progress_service.settings import Settings
from progress_service.store.identity import Principal
from progress_service.store.jobs import get_job

if TYPE_CHECKING:
    from progress_service.events import JobSnapshot

#: After the terminal status, wait this long for trailing events before ending.
LINGER = 1.0
#: Milliseconds an EventSource waits before reconnecting.
RETRY_MS = 3000

_enc = msgspec.json.Encoder()
_status_dec = msgspec.json.Decoder()



class _Collect:
    """The SSE stream's :class:`~progress_service.gateway.subscription.Transport` for its first messages."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    def put(self, message: Any) -> None:
        self.messages.append(message)

@get(
    "/api/jobs/{job_id:str}/stream",
    tags=["jobs"],
    summary="A job's events as Server-Sent Events",
    description="Resume with the Last-Event-ID header. Ends after the job is terminal.",
    responses=error_responses(401, 404),
)
async def job_stream(
    request: Request[Any, Any, Any], job_id: str, principal: Principal, services: Services, gateway: Gateway
) -> ServerSentEvent:
    """The job's snapshot, then its events after ``Last-Event-ID``, then live ones."""
    if not is_job_id(job_id):
        raise NotFoundException("no such job")
    since = request.headers.get("last-event-id") or None
    if since is not None and not is_event_id(since):
        raise ValidationException("Last-Event-ID: not an event id")
    job = await get_job(services.engine, job_id, team_id=principal.team_id)
    if job is None:
        raise NotFoundException("no such job")
    snapshot, _ = await streams.read_state(services.redis, job_id)
    # Redis while it holds the entries, the archive for what it does not.
    pos = await history.position(services.engine, job_id, since, await streams.coverage(services.redis, job_id))
    snapshot = snapshot or job.to_snapshot()
    # Each stream holds a hub member and a buffer: it counts in the user's
    # connections cap with their WebSockets, over every node (in Redis).
    stream_id = f"sse-{uuid.uuid4().hex}"
    if not await gateway.connections.admit(principal.user_id, stream_id):
        limit = services.settings.ws_max_connections_per_user
        raise TooManyRequestsException(
            f"too many open connections and streams for this user (at most {limit} over every node); close one first",
            headers={"Retry-After": "10"},
        )
    return ServerSentEvent(
        _messages(services.settings, gateway, principal, job_id, since, snapshot, pos, stream_id),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _sse_fields(text: str) -> tuple[str, str | None]:
    """Type and id of a spliced room item (see ``streams.wire_bytes``)."""
    kind = text[9 : text.index('"', 9)]
    at = text.find('","id":"')
    return kind, (text[at + 8 : text.index('"', at + 8)] if at >= 0 else None)


def _is_terminal(text: str) -> bool:
    if '"kind":"status"' not in text:
        return False
    msg = _status_dec.decode(text)
    return msg.get("data", {}).get("status") in TERMINAL_STATUSES


async def _messages(
    settings: Settings,
    gateway: Gateway,
    principal: Principal,
    job_id: str,
    since: str | None,
    snapshot: JobSnapshot,
    pos: history.Position,
    stream_id: str,
) -> AsyncIterator[ServerSentEventMessage]:
    room = room_id(job_id)
    outbox = Outbox(settings.ws_outbox_bytes)
    member = Member(outbox)
    finished = snapshot.status in TERMINAL_STATUSES
    point = resume_point(since, pos)
    hello = _Collect()
    announce(hello, room, principal.role, snapshot, point, since, [], 0)  # SSE watchers are not in presence
    # Gateway.close_all closes the outbox at shutdown: the stream ends at
    # once (the EventSource resumes elsewhere) instead of holding uvicorn's
    # graceful shutdown until its timeout.
    gateway.sse.opened(outbox)
    try:
        for n, message in enumerate(hello.messages):
            yield ServerSentEventMessage(
                event=type(message).__struct_config__.tag, data=_enc.encode(message).decode(),
                retry=RETRY_MS if n == 0 else None,
            )
        pages = gateway.hub.replay_pages(job_id, member, point.replay_from, head=point.head, presence_head=None)
        async with aclosing(pages):
            async for page in pages:
                for eid, text, _size in page:
                    kind, _ = _sse_fields(text)
                    finished = finished or (kind == "event" and _is_terminal(text))
                    yield ServerSentEventMessage(event=kind, id=eid, data=text)
        while not outbox.overflowed:
            live: str | None = None
            with anyio.move_on_after(LINGER if finished else settings.ws_heartbeat):
                live = await outbox.get()
            if live is None:
                if finished or outbox.closed:
                    return
                yield ServerSentEventMessage(comment="heartbeat", data=None)
                continue
            kind, live_id = _sse_fields(live)
            finished = finished or (kind == "event" and _is_terminal(live))
            yield ServerSentEventMessage(event=kind, id=live_id, data=live)
    except Exception as exc:
        dependency = outage.classify(exc)
        if dependency is None:
            raise
        # The response has started, so no 503: the stream ends and the
        # EventSource reconnects (``retry``), resuming with Last-Event-ID.
        outage.warn(dependency, "GET /api/jobs/{id}/stream (replay)", exc)
    finally:
        gateway.connections.release(principal.user_id, stream_id)
        gateway.sse.ended(outbox)
        gateway.hub.remove(job_id, member)
        outbox.close()
