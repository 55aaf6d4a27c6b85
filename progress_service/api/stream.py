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

from collections import Counter
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
from progress_service.events import TERMINAL_STATUSES, Gap, Joined
from progress_service.ids import is_event_id, is_job_id, room_id
from progress_service.services import Services
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


@get(
    "/api/jobs/{job_id:str}/stream",
    tags=["jobs"],
    summary="A job's events as Server-Sent Events",
    description="Resume with the Last-Event-ID header. Ends after the job is terminal.",
    responses=error_responses(401, 404),
)
async def job_stream(request: Request[Any, Any, Any], job_id: str, principal: Principal, services: Services) -> ServerSentEvent:
    """The job's snapshot, then its events after ``Last-Event-ID``, then live ones."""
    if not is_job_id(job_id):
        raise NotFoundException("no such job")
    since = request.headers.get("last-event-id") or None
    if since is not None and not is_event_id(since):
        raise ValidationException("Last-Event-ID: not an event id")
    job = await get_job(services.engine, job_id, team_id=principal.team_id)
    if job is None:
        raise NotFoundException("no such job")
    # Like the WebSocket's connections cap: each stream holds a hub member
    # and a buffer, so one user cannot open them without bound.
    limit = services.settings.ws_max_connections_per_user
    if _open_streams(services)[principal.user_id] >= limit:
        raise TooManyRequestsException(
            f"too many open streams for this user (at most {limit}); close one first",
            headers={"Retry-After": "10"},
        )
    snapshot, _ = await streams.read_state(services.redis, job_id)
    # Redis while it holds the entries, the archive for what it does not.
    pos = await history.position(services.engine, job_id, since, await streams.coverage(services.redis, job_id))
    snapshot = snapshot or job.to_snapshot()
    if pos.head is not None:
        snapshot.lastEventId = pos.head
    return ServerSentEvent(
        _messages(services, principal, job_id, since, snapshot, pos),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _open_streams(services: Services) -> Counter[str]:
    """Open SSE streams of this process, per user id."""
    counter = services.extras.get("sse_streams")
    if counter is None:
        counter = services.extras["sse_streams"] = Counter()
    return counter


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
    services: Services,
    principal: Principal,
    job_id: str,
    since: str | None,
    snapshot: JobSnapshot,
    pos: history.Position,
) -> AsyncIterator[ServerSentEventMessage]:
    from progress_service.gateway.hub import Member  # noqa: PLC0415 - the gateway imports this module
    from progress_service.gateway.outbox import Outbox  # noqa: PLC0415

    settings = services.settings
    gateway = services.gateway
    assert gateway is not None
    room = room_id(job_id)
    outbox = Outbox(settings.ws_outbox_bytes)
    member = Member(outbox)
    finished = snapshot.status in TERMINAL_STATUSES
    head, gap, oldest = pos.head, pos.gap, pos.oldest
    joined = Joined(roomId=room, role=principal.role, snapshot=snapshot, head=head, presence=[])
    streams_open = _open_streams(services)
    streams_open[principal.user_id] += 1
    # Gateway.close_all closes these at shutdown: the stream ends at once
    # (the EventSource resumes elsewhere) instead of holding uvicorn's
    # graceful shutdown until its timeout.
    sse_outboxes: set[Outbox] = services.extras.setdefault("sse_outboxes", set())
    sse_outboxes.add(outbox)
    try:
        yield ServerSentEventMessage(event="joined", data=_enc.encode(joined).decode(), retry=RETRY_MS)
        if gap:
            yield ServerSentEventMessage(event="gap", data=_enc.encode(Gap(roomId=room, since=since or "", oldest=oldest)).decode())
        pages = gateway.hub.replay_pages(job_id, member, since, head=head, presence_head=None)
        async with aclosing(pages):
            async for page in pages:
                for eid, text, _size in page:
                    kind, _ = _sse_fields(text)
                    finished = finished or (kind == "event" and _is_terminal(text))
                    yield ServerSentEventMessage(event=kind, id=eid, data=text)
        while not outbox.overflowed:
            text = None
            with anyio.move_on_after(LINGER if finished else settings.ws_heartbeat):
                text = await outbox.get()
            if text is None:
                if finished or outbox.closed:
                    return
                yield ServerSentEventMessage(comment="heartbeat", data=None)
                continue
            kind, eid = _sse_fields(text)
            finished = finished or (kind == "event" and _is_terminal(text))
            yield ServerSentEventMessage(event=kind, id=eid, data=text)
    except Exception as exc:
        dependency = outage.classify(exc)
        if dependency is None:
            raise
        # The response has started, so no 503: the stream ends and the
        # EventSource reconnects (``retry``), resuming with Last-Event-ID.
        outage.warn(dependency, "GET /api/jobs/{id}/stream (replay)", exc)
    finally:
        sse_outboxes.discard(outbox)
        streams_open[principal.user_id] -= 1
        if streams_open[principal.user_id] <= 0:
            del streams_open[principal.user_id]
        gateway.hub.remove(job_id, member)
        outbox.close()
