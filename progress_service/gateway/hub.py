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
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from redis.asyncio import ConnectionPool
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from progress_service import history, metrics, streams
from progress_service.events import PresenceMember, PresenceMsg
from progress_service.gateway.outbox import Chunk, Outbox
from progress_service.ids import now_ms, room_id
from progress_service.keys import events_key, presence_stream_key, wake_key
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
#: With at least COALESCE_ROOMS rooms, an answer with fewer entries than
#: COALESCE_BELOW is followed by a pause of COALESCE_S before the next read, so
#: entries of many rooms share one read (a read names two keys per room, and
#: costs Redis and this process time per key). Not with few rooms: a read is
#: cheap there, and the pause would only make bursts bigger (a small outbox
#: could overflow on a burst its fast reader would have kept up with).
COALESCE_ROOMS = 64
COALESCE_BELOW = 64
COALESCE_S = 0.002
#: A member that wants no presence messages (SSE watchers).
NEVER = (1 << 64, 0)


class Member:
    """One subscriber of a room on this process: a connection's outbox and cursors."""

    __slots__ = ("after", "live", "outbox", "owner", "presence_after")

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

    __slots__ = ("cursor", "events_key", "job_id", "members", "presence_cursor", "presence_key", "room_id", "slot")

    def __init__(self, job_id: str, cursor: str, presence_cursor: str) -> None:
        self.job_id = job_id
        self.room_id = room_id(job_id)
        self.events_key = events_key(job_id)
        self.presence_key = presence_stream_key(job_id)
        #: Id of the last entry the hub read from the event / presence stream.
        self.cursor = cursor
        self.presence_cursor = presence_cursor
        self.members: dict[int, Member] = {}
        #: Index of the event stream's id in the hub's packed XREAD ids (presence: slot + 1).
        self.slot = 0


def _pack(arg: bytes) -> bytes:
    """One RESP bulk string (a command argument)."""
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


def _after(keys: list[tuple[int, int]], texts: list[str], sizes: list[int], after: tuple[int, int]) -> Chunk:
    """The entries of an answer past ``after`` (a member that had some of them already)."""
    i = next(i for i, key in enumerate(keys) if key > after)
    return Chunk.of(texts[i:], sizes[i:])


class Hub:
    """The rooms of this process and the one task that feeds them."""

    def __init__(self, services: Services, node_id: str, *, block_ms: int = BLOCK_MS) -> None:
        self.services = services
        self.block_ms = block_ms
        self.rooms: dict[str, Room] = {}
        self._by_key: dict[bytes, tuple[Room, bool]] = {}
        self._changed = anyio.Event()
        self._wake_key = wake_key(node_id)
        #: Rooms whose last answer showed a hole (see ``_fan_out_events``).
        self._holes: list[Room] = []
        self._wake_cursor = "0-0"
        # A dedicated connection: XREAD BLOCK holds it for up to block_ms, and
        # its socket timeout must be longer than that or redis-py times out.
        # It connects on first use and again after an error.
        self._reader = ConnectionPool.from_url(
            services.redis_url,
            socket_timeout=block_ms / 1000 + 5,
            socket_connect_timeout=2,
        ).make_connection()
        self.reconnects = 0
        # The XREAD command, packed once per change of the room set (the
        # key list) plus one packed id per stream, replaced when that
        # stream's cursor moves: a read costs one join, not a redis-py
        # argument encoding per key (1,000 keys at 500 rooms).
        self._head = b""
        self._ids: list[bytes] = []

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
        keys = [self._wake_key.encode()]
        ids = [_pack(self._wake_cursor.encode())]
        for room in self.rooms.values():
            room.slot = len(ids)
            events_key, presence_key = room.events_key.encode(), room.presence_key.encode()
            by_key[events_key] = (room, False)
            by_key[presence_key] = (room, True)
            keys += (events_key, presence_key)
            ids += (_pack(room.cursor.encode()), _pack(room.presence_cursor.encode()))
        self._by_key = by_key
        args = [b"XREAD", b"COUNT", str(READ_COUNT).encode(), b"BLOCK", str(self.block_ms).encode(), b"STREAMS", *keys]
        self._head = b"*%d\r\n" % (len(args) + len(ids)) + b"".join(_pack(a) for a in args)
        self._ids = ids
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

    async def attach(
        self,
        job_id: str,
        member: Member,
        since: str | None,
        *,
        head: str | None,
        presence_head: str | None,
    ) -> None:
        """Register ``member``, replay after ``since`` into its outbox, then make it live.

        Raises a Redis or store error when the replay fails; the caller
        removes the member.
        """
        pages = self.replay_pages(job_id, member, since, head=head, presence_head=presence_head)
        async with aclosing(pages):
            async for page in pages:
                for _eid, text, size in page:
                    if not await member.outbox.put_wait(text, size):
                        return  # the connection is going away

    async def replay_pages(
        self,
        job_id: str,
        member: Member,
        since: str | None,
        *,
        head: str | None,
        presence_head: str | None,
    ) -> AsyncGenerator[list[tuple[str, str, int]], None]:
        """Register ``member`` as pending and yield the replay after ``since``, page by page.

        Each page is ``(id, text, size)`` per entry. The consumer must have
        queued a page before asking for the next: when the iteration ends
        normally the member is live, and the hub delivers only what follows
        the last replayed id.
        """
        if self.add(job_id, member, head=head, presence_head=presence_head):
            await self.wake()
        room = self.rooms[job_id]
        redis, engine = self.services.redis, self.services.engine
        position = since
        empty_rounds = 0
        while True:
            # From the archive what Redis no longer holds (history.py), then Redis.
            entries = await history.read_page(redis, engine, job_id, position, count=READ_COUNT)
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
            conn = self._reader
            while True:
                if not self.rooms:
                    self._changed = anyio.Event()
                    await self._changed.wait()
                    continue
                try:
                    # The connection's own API: the command is packed already,
                    # and the reply stays raw (no per-entry dict building by
                    # redis-py's XREAD callback). On any error, cancellation
                    # included, redis-py drops the connection; the next send
                    # reconnects.
                    await conn.send_packed_command(self._head + b"".join(self._ids))
                    answer = await conn.read_response()
                except (RedisError, OSError) as exc:
                    self.reconnects += 1
                    delay = backoff * (0.5 + random.random())
                    log.warning("hub: Redis read failed (%s); retrying in %.2fs from the same ids", exc, delay)
                    await anyio.sleep(delay)
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.1
                metrics.hub_reads.inc()
                dispatched = self._dispatch(answer) if answer else 0
                if self._holes:
                    await self._fill_holes()
                if answer and dispatched < COALESCE_BELOW and len(self.rooms) >= COALESCE_ROOMS:
                    # A small answer: let a few ms of entries from other
                    # rooms gather, so they share the next read (each read
                    # names every room's streams) and each member's sender
                    # wakes once for all of them. Bounded by COALESCE_S.
                    await anyio.sleep(COALESCE_S)
        finally:
            with anyio.CancelScope(shield=True):
                await self._reader.disconnect()

    async def _reset_wake(self) -> None:
        try:
            await self.services.redis.delete(self._wake_key)
        except (RedisError, OSError):
            pass

    def _dispatch(self, answer: list[Any]) -> int:
        """Fan one XREAD answer out; the number of entries it held."""
        now = now_ms()
        total = 0
        for key, entries in answer:
            if not entries:
                continue
            total += len(entries)
            found = self._by_key.get(key)
            if found is None:
                # the wake stream, or a room that closed while we were reading
                if key == self._wake_key.encode():
                    self._wake_cursor = entries[-1][0].decode()
                    if self._ids:
                        self._ids[0] = _pack(entries[-1][0])
                continue
            room, presence = found
            if presence:
                self._fan_out_presence(room, entries)
            else:
                self._fan_out_events(room, entries, now)
        return total

    def _fan_out_events(self, room: Room, entries: list[Any], now: int) -> None:
        """Deliver an XREAD answer's entries up to the first hole; a hole is filled by ``_fill_holes``.

        Each entry's ``p`` names the entry before it (streams.py). One that
        does not follow the room's cursor means the stream lost entries this
        reader never saw (trimmed while it lagged, or Redis restarted empty):
        those come from the archive, in order, before anything after them.
        """
        cursor = b"" if room.cursor == "0-0" else room.cursor.encode()
        parsed: list[streams.Entry] = []
        for eid, flat in entries:
            fields = dict(zip(flat[::2], flat[1::2]))
            link = fields.get(b"p")
            if link is not None and link != cursor:
                self._holes.append(room)
                break
            parsed.append((eid, fields))
            cursor = eid
        if parsed:
            self._deliver(room, parsed, now)

    async def _fill_holes(self) -> None:
        """Read what the holed rooms' streams lost from the archive (``history.read_page``) and deliver it.

        A room whose fill fails keeps its cursor: the next read finds the
        same hole and tries again, so nothing after it is delivered first.
        """
        holes, self._holes = self._holes, []
        redis, engine = self.services.redis, self.services.engine
        for room in holes:
            try:
                while self.rooms.get(room.job_id) is room:
                    after = None if room.cursor == "0-0" else room.cursor
                    entries = await history.read_page(redis, engine, room.job_id, after, count=READ_COUNT)
                    if self.rooms.get(room.job_id) is not room:
                        break
                    if entries:
                        self._deliver(room, entries, now_ms())
                    if len(entries) < READ_COUNT:
                        break
                log.info("hub: %s: filled entries its stream no longer held", room.room_id)
            except (RedisError, OSError, SQLAlchemyError) as exc:
                log.warning("hub: %s: could not read the archive (%r); trying again", room.room_id, exc)
                await anyio.sleep(0.5)

    def _deliver(self, room: Room, entries: list[streams.Entry], now: int) -> None:
        # Encode each entry once, into one chunk shared by every member that
        # gets all of them: one put (one append, one wake-up) per member per
        # answer, and the entries are comma-joined once for all batching
        # senders.
        keys: list[tuple[int, int]] = []
        texts: list[str] = []
        sizes: list[int] = []
        for eid, fields in entries:
            key = id_tuple(eid.decode())
            metrics.hub_lag.observe(max(0, now - key[0]) / 1000)
            raw = wire_bytes(room.room_id, eid, fields)
            keys.append(key)
            texts.append(raw.decode())  # encoded once for every member
            sizes.append(len(raw))
        last_eid = entries[-1][0]
        room.cursor = last_eid.decode()
        self._ids[room.slot] = _pack(last_eid)
        first, last = keys[0], keys[-1]
        chunk = Chunk.of(texts, sizes)
        for m in list(room.members.values()):
            if not m.live:
                continue
            after = m.after
            if after >= last:
                continue
            m.after = last
            m.outbox.put_chunk(chunk if after < first else _after(keys, texts, sizes, after))

    def _fan_out_presence(self, room: Room, entries: list[Any]) -> None:
        # Like events: all the answer's changes in one chunk, one put per member.
        keys: list[tuple[int, int]] = []
        texts: list[str] = []
        sizes: list[int] = []
        for eid, flat in entries:
            fields = dict(zip(flat[::2], flat[1::2]))
            joined = [_member_dec.decode(fields[b"j"])] if b"j" in fields else []
            left = [_member_dec.decode(fields[b"l"])] if b"l" in fields else []
            raw = _enc.encode(PresenceMsg(roomId=room.room_id, joined=joined, left=left))
            keys.append(id_tuple(eid.decode()))
            texts.append(raw.decode())
            sizes.append(len(raw))
        last_eid = entries[-1][0]
        room.presence_cursor = last_eid.decode()
        self._ids[room.slot + 1] = _pack(last_eid)
        first, last = keys[0], keys[-1]
        chunk = Chunk.of(texts, sizes)
        for m in list(room.members.values()):
            after = m.presence_after
            if after >= last:
                continue
            m.presence_after = last
            m.outbox.put_chunk(chunk if after < first else _after(keys, texts, sizes, after))
