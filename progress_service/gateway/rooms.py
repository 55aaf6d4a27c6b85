"""A WebSocket connection's rooms: ``join`` and ``leave``.

A join checks access (one answer for unknown and other-team rooms, see
``job_access``), reads the room's state in the shared Redis batch
(``joins.JoinReads``), finds where the replay starts (``history`` and
``subscription.resume_point``), announces ``joined`` and hands the member to
the hub, which replays and then goes live. Every way out of a room
(``leave``, a failed replay, the session's teardown) is :func:`forget`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from progress_service import history, streams
from progress_service.events import ClientJoin, ClientLeave, JobSnapshot, LeftMsg, PresenceMember
from progress_service.gateway.hub import Member
from progress_service.gateway.subscription import announce, resume_point
from progress_service.ids import job_id_of
from progress_service.outage import STORE_ERRORS
from progress_service.store.jobs import JobRecord, get_job

if TYPE_CHECKING:
    from progress_service.gateway.session import Session


async def join(session: Session, message: ClientJoin) -> None:
    """Join the room of ``message`` (``joined``, replay, live), or answer ``error`` why not."""
    assert session.principal is not None
    room_id = message.roomId
    job_id = job_id_of(room_id)
    settings = session.settings
    if job_id in session.rooms:
        session.refuse("invalid", "already joined", room_id=room_id)
        return
    if len(session.rooms) >= settings.ws_max_rooms:
        session.refuse("limit", f"at most {settings.ws_max_rooms} rooms per connection", room_id=room_id)
        return
    gateway = session.gateway
    principal = session.principal
    since = message.since
    try:
        # Its own bounded waits: a reconnect storm queues here (see job_access).
        allowed = await gateway.access.allowed(job_id, principal.team_id)
    except STORE_ERRORS:
        session.refuse("unavailable", "try again later", room_id=room_id, counts=False)
        return
    if not allowed:
        # Unknown and other-team jobs: the same answer after the same work (rooms cannot be probed).
        session.audit("join.refused", room_id=room_id)
        session.refuse("not_found", "no such room", room_id=room_id)
        return
    try:
        # The room's reads queue behind the other joins' batches (JoinReads):
        # in a reconnect storm that is a wait, bounded like the store gate's.
        async with asyncio.timeout(settings.ws_store_wait):
            snapshot, cov, presence_head, members, count = await _read_room(session, job_id, since)
            # Redis while it holds the entries; the store answers for the rest.
            pos = await history.position(gateway.engine, job_id, since, cov) if cov.holds_from is None else (
                await gateway.store_gate.call(lambda: history.position(gateway.engine, job_id, since, cov))
            )
            if snapshot is None:
                # No live snapshot in Redis (expired): the stored one.
                job: JobRecord | None = await gateway.store_gate.call(
                    lambda: get_job(gateway.engine, job_id, principal.team_id)
                )
                if job is None:
                    session.refuse("not_found", "no such room", room_id=room_id)
                    return
                snapshot = job.to_snapshot()
    except STORE_ERRORS:
        session.refuse("unavailable", "try again later", room_id=room_id, counts=False)
        return
    point = resume_point(since, pos)
    member = Member(session.outbox, presence_after=streams.id_tuple(presence_head), owner=session)
    session.rooms[job_id] = member
    announce(session, room_id, principal.role, snapshot, point, since, members, count)
    try:
        await gateway.hub.attach(job_id, member, point.replay_from, head=point.head, presence_head=presence_head)
    except STORE_ERRORS:
        # The join is undone: the client sees `error` for the room it was told it joined.
        forget(session, job_id, member)
        session.refuse("unavailable", "replay failed; join again", room_id=room_id, counts=False)


async def _read_room(
    session: Session, job_id: str, since: str | None
) -> tuple[JobSnapshot | None, streams.Coverage, str, list[PresenceMember], int]:
    """Everything a join reads from Redis, in one MULTI (shared: :class:`JoinReads`).

    The same reads as ``streams.read_state`` and ``streams.coverage``
    plus the presence join script. Returns ``(snapshot, coverage,
    presence_head, members, member count)``.
    """
    assert session.principal is not None
    entry, replies = await session.gateway.joins.read(job_id, since, session.id, session.principal)
    raw, last, first, length, (added, whole) = replies[:5]
    cov = streams.coverage_of(first, last, length, added, whole)
    snapshot = streams.decode_snapshot(raw) if raw else None
    if snapshot is not None:
        snapshot.lastEventId = cov.head
    presence_head, members, count = replies[-1]
    session.gateway.presence.joined(job_id, entry, session.principal)
    return snapshot, cov, presence_head, members, count


def leave(session: Session, message: ClientLeave) -> None:
    """Leave the room of ``message`` (``left``), or answer ``not_joined``."""
    job_id = job_id_of(message.roomId)
    member = session.rooms.get(job_id)
    if member is None:
        session.refuse("not_joined", "not in this room", room_id=message.roomId)
        return
    forget(session, job_id, member)
    session.put(LeftMsg(roomId=message.roomId))


def forget(session: Session, job_id: str, member: Member) -> None:
    """Take ``member`` out of the room: the session's rooms, the hub, the room's presence."""
    session.rooms.pop(job_id, None)
    session.gateway.hub.remove(job_id, member)
    if session.principal is not None:
        session.gateway.presence.leave(job_id, session.id, session.principal)
