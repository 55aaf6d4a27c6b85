"""Joining a room, for every transport: the WebSocket session and the SSE stream.

Both read the room's state their own way (the session batches its Redis
reads in ``JoinReads``; SSE reads once), then share what follows here:

- :func:`resume_point`: the head, whether there is a ``gap``, and where the
  replay starts (a ``since`` ahead of the head replays everything kept,
  with a gap, instead of silencing the room for good);
- :func:`announce`: the ``joined`` message, then ``gap`` when there is one,
  through the transport;
- the replay-then-live hand-over itself is the hub's
  (``Hub.attach``/``Hub.replay_pages``), the same for both.

A :class:`Transport` is what a subscriber needs to be told things: a way to
queue a server message.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

from progress_service import streams
from progress_service.events import Gap, JobSnapshot, Joined, PresenceMember
from progress_service.history import Position


class Transport(Protocol):
    """Where a room's messages go (a WebSocket session, an SSE stream)."""

    def put(self, message: Any) -> None:
        """Queue one server message."""


class ResumePoint(NamedTuple):
    """Where a join's replay starts."""

    head: str | None
    gap: bool
    oldest: str | None
    #: Replay the entries after this id (None: all that are kept).
    replay_from: str | None


def resume_point(since: str | None, pos: Position) -> ResumePoint:
    """The replay start for ``since`` given the log's position.

    A ``since`` ahead of the head (an id from elsewhere, a Redis restored
    from an older snapshot) would silence the room for good, as live items
    go out only when greater than it: that is a gap, and everything kept is
    replayed.
    """
    head, gap, oldest = pos.head, pos.gap, pos.oldest
    replay_from = since
    if since is not None and (head is None or streams.id_lt(head, since)):
        gap, replay_from = True, None
    return ResumePoint(head=head, gap=gap, oldest=oldest, replay_from=replay_from)


def announce(
    transport: Transport,
    room_id: str,
    role: str,
    snapshot: JobSnapshot,
    point: ResumePoint,
    since: str | None,
    presence: list[PresenceMember],
    presence_count: int,
) -> None:
    """Tell the transport it joined (snapshot at the log's head), then about a gap.

    ``presence`` is the first members (``presence.JOINED_MAX``) of
    ``presence_count``.
    """
    if point.head is not None:
        snapshot.lastEventId = point.head  # the log's head, wherever it is kept
    transport.put(Joined(roomId=room_id, role=role, snapshot=snapshot, head=point.head, presence=presence, presenceCount=presence_count))
    if point.gap:
        transport.put(Gap(roomId=room_id, since=since or "", oldest=point.oldest))
