"""The hub: one stream reader per process fanning job events out to local members.

One task (``Hub.run``) XREADs, with BLOCK and COUNT, the event stream and the
presence stream of every room that has members on this process, and hands
each entry, encoded once, to every member's outbox. A Redis error is retried
with backoff from the same cursors, so nothing is skipped.

Joining without gap or duplicate (``Hub.attach``): the member is registered
as *pending* (the hub skips it for events), the session replays the stream
from ``since`` into the member's outbox, and the member goes *live* in the
same event-loop step in which it checks that its replay position has reached
the hub's read position for that stream. From then on the hub delivers only
entries whose id is greater than the member's last delivered id. Because
both the check-and-flip and the hub's processing of one XREAD answer are
synchronous, no entry can fall between replay and live, and none is sent
twice.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING

import anyio
import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from progress_service import metrics, streams
from progress_service.events import PresenceMember, PresenceMsg, now_ms
from progress_service.gateway.outbox import Outbox
from progress_service.streams import id_lt, id_tuple, wire_bytes

if TYPE_CHECKING:
    from progress_service.services import Services

log = logging.getLogger("progress_service.gateway.hub")

_enc = msgspec.json.Encoder()
_member_dec = msgspec.json.Decoder(PresenceMember)

#: Entries per stream per XREAD; also the page size of a replay.
READ_COUNT = 500
#: How long one XREAD blocks (ms). The reader's socket timeout is longer.
BLOCK_MS = 5000
#: A member that wants no presence messages (SSE watchers).
NEVER = (1 << 64, 0)


class Member:
    """One subscriber of a room on this process: a connection's outbox and cursors."""

    __slots__ = ("outbox", "after", "presence_after", "live", "owner")

    def __init__(self, outbox: Outbox, *, presence_after: tuple[int, int] = NEVER, owner: object = None) -> None:
        self.outbox = outbox
        #: Id of the last event handed to the outbox (replay or live).
        self.after: tuple[int, int] = (0, 0)
        #: Presence entries up to this id are already in the member's `joined`.
        self.presence_after = presence_after
        self.live = False
        self.owner = owner


class Room:
    """A job's room as seen by this process: its cursors and local members."""

    __slots__ = ("job_id", "room_id", "events_key", "presence_key", "cursor", "presence_cursor", "members")

    def __init__(self, job_id: str, cursor: str, presence_cursor: str) -> None:
        self.job_id = job_id
        self.room_id = streams.room_id(job_id)
        self.events_key = streams.events_key(job_id)
        self.presence_key = presence_stream_key(job_id)
        #: Id of the last entry the hub read from the event / presence stream.
        self.cursor = cursor
        self.presence_cursor = presence_cursor
        self.members: dict[int, Member] = {}


def presence_stream_key(job_id: str) -> str:
    """The stream of presence changes of a job's room (not the job's event log)."""
    return f"ps:{{job:{job_id}}}:presence-log"


class Hub:
    """The rooms of this process and the one task that feeds them."""

    def __init__(self, services: Services, node_id: str, *, block_ms: int = BLOCK_MS) -> None:
        self.services = services
        self.block_ms = block_ms
        self.rooms: dict[str, Room] = {}
        self._by_key: dict[bytes, tuple[Room, bool]] = {}
        self._changed = anyio.Event()
        self._wake_key = f"ps:gw:{node_id}:wake"
        self._wake_cursor = "0-0"
        # A dedicated connection: XREAD BLOCK holds it for up to block_ms, and
        # its socket timeout must be longer than that or redis-py times out.
        self._reader = Redis.from_url(
            services.redis_url,
            socket_timeout=block_ms / 1000 + 5,
            socket_connect_timeout=2,
            single_connection_client=True,
        )
        self.reconnects = 0

    # ------------------------------------------------------------------ rooms

    def add(self, job_id: str, member: Member, *, head: str | None, presence_head: str | None) -> bool:
        """Register a pending member; True when the room is new on this process."""
        room = self.rooms.get(job_id)
        new = room is None
        if room is None:
            room = Room(job_id, head or "0-0", presence_head or "0-0")
            self.rooms[job_id] = room
            self._reindex()
        room.members[id(member)] = member
        return new

    def remove(self, job_id: str, member: Member) -> None:
        """Forget a member; the room goes when its last local member does."""
        room = self.rooms.get(job_id)
        if room is None:
            return
        room.members.pop(id(member), None)
        member.live = False
        if not room.members:
            del self.rooms[job_id]
            self._reindex()

    def _reindex(self) -> None:
        by_key: dict[bytes, tuple[Room, bool]] = {}
        for room in self.rooms.values():
            by_key[room.events_key.encode()] = (room, False)
            by_key[room.presence_key.encode()] = (room, True)
        self._by_key = by_key
        metrics.ws_rooms.set(len(self.rooms))
        self._changed.set()

    async def wake(self) -> None:
        """Interrupt the current XREAD BLOCK so a new room is read at once."""
        try:
            async with self.services.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wake_key, {"w": b"1"}, maxlen=10, approximate=True)
                pipe.expire(self._wake_key, 3600)
                await pipe.execute()
        except (RedisError, OSError):
            pass  # only latency is lost: the room is read after the current block

    async def attach(self, job_id: str, member: Member, since: str | None, *, head: str | None, presence_head: str | None) -> None:
        """Register ``member``, replay after ``since`` into its outbox, then make it live.

        Raises a Redis error when the replay fails; the caller removes the member.
        """
        async with aclosing(self.replay_pages(job_id, member, since, head=head, presence_head=presence_head)) as pages:
            async for page in pages:
                for _eid, text, size in page:
                    if not await member.outbox.put_wait(text, size):
                        return  # the connection is going away

    async def replay_pages(
        self, job_id: str, member: Member, since: str | None, *, head: str | None, presence_head: str | None
    ) -> AsyncIterator[list[tuple[str, str, int]]]:
        """Register ``member`` as pending and yield the replay after ``since``, page by page.

        Each page is ``(id, text, size)`` per entry. The consumer must have
        queued a page before asking for the next: when the iteration ends
        normally the member is live, and the hub delivers only what follows
        the last replayed id.
        """
        if self.add(job_id, member, head=head, presence_head=presence_head):
            await self.wake()
        room = self.rooms[job_id]
        redis = self.services.redis
        position = since
        empty_rounds = 0
        while True:
            entries = await streams.replay(redis, job_id, position, count=READ_COUNT)
            if entries:
                page = []
                for eid, fields in entries:
                    raw = wire_bytes(room.room_id, eid, fields)
                    page.append((eid.decode(), raw.decode(), len(raw)))
                yield page
                position = page[-1][0]
            if len(entries) == READ_COUNT:
                continue
            if self.rooms.get(job_id) is not room or id(member) not in room.members:
                return  # left while replaying
            # Caught up with the stream as of that read. If the hub has read
            # further meanwhile (it skipped those entries for this pending
            # member), replay again; otherwise go live in this same step.
            mine = position or "0-0"
            if not id_lt(mine, room.cursor):
                member.after = id_tuple(mine)
                member.live = True
                return
            # The hub is ahead but the stream has nothing after our position:
            # those entries were deleted (trimmed or the key expired). Go
            # live at the hub's position rather than retrying forever.
            empty_rounds = 0 if entries else empty_rounds + 1
            if empty_rounds >= 3:
                member.after = id_tuple(room.cursor)
                member.live = True
                return

    # ------------------------------------------------------------------ reader

    async def run(self) -> None:
        """Read and fan out until cancelled."""
        backoff = 0.1
        try:
            await self._reset_wake()
            while True:
                if not self.rooms:
                    self._changed = anyio.Event()
                    await self._changed.wait()
                    continue
                keys: dict[str, str] = {self._wake_key: self._wake_cursor}
                for room in self.rooms.values():
                    keys[room.events_key] = room.cursor
                    keys[room.presence_key] = room.presence_cursor
                try:
                    answer = await self._reader.xread(keys, count=READ_COUNT, block=self.block_ms)
                except (RedisError, OSError) as exc:
                    self.reconnects += 1
                    delay = backoff * (0.5 + random.random())
                    log.warning("hub: Redis read failed (%s); retrying in %.2fs from the same ids", exc, delay)
                    await anyio.sleep(delay)
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.1
                metrics.hub_reads.inc()
                if answer:
                    self._dispatch(answer)
        finally:
            with anyio.CancelScope(shield=True):
                await self._reader.aclose()

    async def _reset_wake(self) -> None:
        try:
            await self.services.redis.delete(self._wake_key)
        except (RedisError, OSError):
            pass

    def _dispatch(self, answer: list) -> None:
        now = now_ms()
        for key, entries in answer:
            if not entries:
                continue
            found = self._by_key.get(key)
            if found is None:
                # the wake stream, or a room that closed while we were reading
                if key == self._wake_key.encode():
                    self._wake_cursor = entries[-1][0].decode()
                continue
            room, presence = found
            if presence:
                self._fan_out_presence(room, entries)
            else:
                self._fan_out_events(room, entries, now)

    def _fan_out_events(self, room: Room, entries: list, now: int) -> None:
        members = list(room.members.values())
        for eid, fields in entries:
            eid_s = eid.decode()
            room.cursor = eid_s
            key = id_tuple(eid_s)
            metrics.hub_lag.observe(max(0, now - key[0]) / 1000)
            raw = wire_bytes(room.room_id, eid, fields)
            text, size = raw.decode(), len(raw)  # encoded once for every member
            for m in members:
                if m.live and key > m.after:
                    m.after = key
                    m.outbox.put(text, size)

    def _fan_out_presence(self, room: Room, entries: list) -> None:
        members = list(room.members.values())
        for eid, fields in entries:
            eid_s = eid.decode()
            room.presence_cursor = eid_s
            key = id_tuple(eid_s)
            joined = [_member_dec.decode(fields[b"j"])] if b"j" in fields else []
            left = [_member_dec.decode(fields[b"l"])] if b"l" in fields else []
            raw = _enc.encode(PresenceMsg(roomId=room.room_id, joined=joined, left=left))
            text, size = raw.decode(), len(raw)
            for m in members:
                if key > m.presence_after:
                    m.presence_after = key
                    m.outbox.put(text, size)
