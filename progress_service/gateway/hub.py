"""The hub: this process's rooms and their members, fed by the broker.

The broker (``broker.py``) tells the hub what each room's event stream and
presence log gained (it reads only rooms with news, per Redis shard); the
hub hands each entry, encoded once, to every member's outbox. A Redis error
is retried by the broker from the same cursors, so nothing is skipped.

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

import asyncio
import logging
from collections import deque
from collections.abc import AsyncGenerator, Awaitable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from progress_service import history, metrics, streams
from progress_service.events import PresenceMember, PresenceMsg
from progress_service.gateway.broker import READ_COUNT, Broker, StreamBroker
from progress_service.gateway.outbox import BATCH_FRAME_BYTES, Broadcast, Chunk, Outbox
from progress_service.gateway.recent_pages import Page, PageKey, RecentPages
from progress_service.gateway.single_flight import SingleFlight
from progress_service.ids import now_ms, room_id
from progress_service.keys import events_key, presence_stream_key
from progress_service.outage import STORE_ERRORS
from progress_service.streams import id_lt, id_tuple, wire_bytes

if TYPE_CHECKING:
    from progress_service.services import Resources

log = logging.getLogger("progress_service.gateway.hub")

#: Seconds a replay page read for one join answers the room's later joins from the same id (recent_pages.py).
PAGE_REUSE_SECONDS = 1.0
#: Entries of such pages kept at most (a page is up to READ_COUNT; ~0.5 KB an entry).
PAGE_REUSE_ENTRIES = 20_000

_enc = msgspec.json.Encoder()
_member_dec = msgspec.json.Decoder(PresenceMember)

__all__ = ["READ_COUNT", "Hub", "Member", "Room", "presence_stream_key"]
#: A member that wants no presence messages (SSE watchers).
NEVER = (1 << 64, 0)


class Member:
    """One subscriber of a room on this process: a connection's outbox and cursors."""

    __slots__ = ("after", "broadcast", "live", "outbox", "owner", "presence_after")

    def __init__(self, outbox: Outbox, *, presence_after: tuple[int, int] = NEVER, owner: object = None) -> None:
        self.outbox = outbox
        #: Id of the last event handed to the outbox (replay or live).
        self.after: tuple[int, int] = (0, 0)
        #: Presence entries up to this id are already in the member's `joined`.
        self.presence_after = presence_after
        self.live = False
        self.owner = owner
        #: The room's broadcast this member is owed (see ``Hub._deliver``), if any.
        self.broadcast: Broadcast | None = None


#: Seconds a room's presence changes wait after a fan-out before the next one.
#: A quiet room's change goes out at once; in a join storm into one room each
#: member gets the changes of a window in one chunk (one frame), not one per
#: read: the storm's frames grow with its length, not with joins x members.
PRESENCE_WINDOW = 0.05
#: Bigger rooms wait longer, ``members / PRESENCE_FRAMES_PER_S`` seconds (up to
#: ``PRESENCE_WINDOW_MAX``): a room's presence costs at most about this many
#: frames per second however many members it has (100 ms at 1,000 members).
PRESENCE_FRAMES_PER_S = 10_000
PRESENCE_WINDOW_MAX = 1.0
#: Presence changes a room keeps after fanning them out, for a member that
#: registers after they went out but joined (read the log) before them.
PRESENCE_RECENT = 256


class Room:
    """A job's room as seen by this process: its cursors and local members."""

    __slots__ = (
        "broadcast",
        "cursor",
        "events_key",
        "job_id",
        "members",
        "presence_cursor",
        "presence_key",
        "presence_pending",
        "presence_recent",
        "presence_timer",
        "room_id",
    )

    def __init__(self, job_id: str, cursor: str, presence_cursor: str) -> None:
        self.job_id = job_id
        self.room_id = room_id(job_id)
        self.events_key = events_key(job_id)
        self.presence_key = presence_stream_key(job_id)
        #: Id of the last entry the hub read from the event / presence stream.
        self.cursor = cursor
        self.presence_cursor = presence_cursor
        self.members: dict[int, Member] = {}
        #: The open broadcast of this write window to the members in step (``Hub._deliver``).
        self.broadcast: Broadcast | None = None
        #: Presence changes read but not fanned out yet: (ids, texts, sizes).
        self.presence_pending: tuple[list[tuple[int, int]], list[str], list[int]] = ([], [], [])
        #: The last changes fanned out: (id, text, size), oldest first.
        self.presence_recent: deque[tuple[tuple[int, int], str, int]] = deque(maxlen=PRESENCE_RECENT)
        #: Ends this room's presence window (None: no fan-out in the last ``PRESENCE_WINDOW``).
        self.presence_timer: asyncio.TimerHandle | None = None


#: A room's cursor before it read any entry (XREAD's "from the start").
_START = "0-0"


def _last_read(cursor: str) -> str | None:
    """The id of the last entry read at ``cursor``; None before the first (``_START``)."""
    return None if cursor == _START else cursor


def _after(keys: list[tuple[int, int]], texts: list[str], sizes: list[int], after: tuple[int, int]) -> Chunk:
    """The entries of an answer past ``after`` (a member that had some of them already)."""
    i = next(i for i, key in enumerate(keys) if key > after)
    return Chunk.of(texts[i:], sizes[i:])


class Hub:
    """The rooms of this process; the broker's reads are fanned out here."""

    def __init__(self, services: Resources, node_id: str, *, broker: Broker | None = None) -> None:
        self.services = services
        self.node_id = node_id
        self.broker: Broker = broker or StreamBroker(services.redis, services.redis_url)
        self.rooms: dict[str, Room] = {}
        self._by_key: dict[bytes, tuple[Room, bool]] = {}
        #: Rooms whose last answer showed a hole (see ``_fan_out_events``), filled by ``_fill_holes``.
        self._holes: dict[str, Room] = {}
        self._holes_ready = anyio.Event()
        #: Replay pages being read, by (job id, after): joins of one room at once share a read.
        self._pages: SingleFlight[PageKey, Page] = SingleFlight()
        #: ... and those that come a little later share its answer (recent_pages.py).
        self._recent = RecentPages(PAGE_REUSE_SECONDS, PAGE_REUSE_ENTRIES)

    @property
    def reconnects(self) -> int:
        """Reconnects of the broker's readers so far."""
        return int(getattr(self.broker, "reconnects", 0))

    # ------------------------------------------------------------------ rooms

    def add(self, job_id: str, member: Member, *, head: str | None, presence_head: str | None) -> bool:
        """Register a pending member; True when the room is new on this process."""
        room = self.rooms.get(job_id)
        new = room is None
        if room is None:
            room = Room(job_id, head or _START, presence_head or _START)
            self.rooms[job_id] = room
            self._by_key[room.events_key.encode()] = (room, False)
            self._by_key[room.presence_key.encode()] = (room, True)
            self.broker.subscribe(room)
            metrics.ws_rooms.set(len(self.rooms))
        room.members[id(member)] = member
        _catch_up_presence(room, member)
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
            self._by_key.pop(room.events_key.encode(), None)
            self._by_key.pop(room.presence_key.encode(), None)
            self.broker.unsubscribe(room)
            _end_presence_window(room)
            metrics.ws_rooms.set(len(self.rooms))

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
        self.add(job_id, member, head=head, presence_head=presence_head)
        room = self.rooms[job_id]
        position = since
        empty_rounds = 0
        while True:
            # From the archive what Redis no longer holds (history.py), then Redis.
            # A read shared with other joins may have started before this
            # member's check found the hub ahead; after an empty answer with
            # the hub ahead, read afresh (the deleted-entries count below
            # must not be fed stale answers).
            page = await self._replay_page(room.room_id, job_id, position, shared=empty_rounds == 0)
            if page.entries:
                yield page.entries
                position = page.entries[-1][0]
            if page.full:
                continue
            if self.rooms.get(job_id) is not room or id(member) not in room.members:
                return  # left while replaying
            # Caught up with the stream as of that read. If the hub has read
            # further meanwhile (it skipped those entries for this pending
            # member), replay again; otherwise go live in this same step.
            mine = position or _START
            if not id_lt(mine, room.cursor):
                member.after = id_tuple(mine)
                member.live = True
                return
            # The hub is ahead but the stream has nothing after our position:
            # those entries were deleted (trimmed or the key expired). Go
            # live at the hub's position rather than retrying forever.
            empty_rounds = 0 if page.entries else empty_rounds + 1
            if empty_rounds >= 3:
                member.after = id_tuple(room.cursor)
                member.live = True
                return

    async def _replay_page(self, room_id: str, job_id: str, after: str | None, *, shared: bool) -> Page:
        """``history.read_page``, encoded, waiting out a store or Redis outage for up to ``PS_WS_STORE_WAIT``.

        ``shared``: joins of the room replaying from the same id at once
        share one read (a join storm into one room asks it hundreds of times),
        and those up to ``PAGE_REUSE_SECONDS`` later share its answer.

        The member was told ``joined`` already and is skipped by live
        delivery meanwhile, so a blink of the store delays its replay
        instead of undoing the join; an outage longer than the wait raises
        (the session then answers ``unavailable``).
        """
        clock = asyncio.get_running_loop().time  # anyio.current_time() costs 4 calls more per join
        deadline = clock() + self.services.settings.ws_store_wait
        delay = 0.1
        key = (job_id, after)
        while True:
            try:
                if not shared:
                    return await self._read_page(room_id, key)
                page = self._recent.get(key)
                if page is None:
                    page = await self._pages.run(key, lambda: self._read_page(room_id, key))
                return page
            except STORE_ERRORS:
                if clock() + delay > deadline:
                    raise
            await anyio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _read_entries(self, job_id: str, after: str | None) -> Awaitable[list[streams.Entry]]:
        """One page (``READ_COUNT``) of the room's log after ``after``, Redis then the archive."""
        return history.read_page(self.services.redis, self.services.engine, job_id, after, count=READ_COUNT)

    async def _read_page(self, room_id: str, key: PageKey) -> Page:
        """:meth:`_read_entries` at ``key`` as wire texts, kept for the room's later joins (``_recent``)."""
        entries = await self._read_entries(*key)
        texts = []
        for eid, fields in entries:
            raw = wire_bytes(room_id, eid, fields)
            texts.append((eid.decode(), raw.decode(), len(raw)))
        page = Page(texts, full=len(entries) == READ_COUNT)
        self._recent.put(key, page)  # a fresh read (not shared) replaces an older answer
        return page

    # ------------------------------------------------------------------ reader

    async def run(self) -> None:
        """Let the broker read and fan out, and fill holes from the archive, until cancelled."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._hole_filler)
                await self.broker.run(self._dispatch)
        finally:
            for room in self.rooms.values():
                _end_presence_window(room)

    async def _hole_filler(self) -> None:
        while True:
            if not self._holes:
                self._holes_ready = anyio.Event()
                await self._holes_ready.wait()
                continue
            await self._fill_holes()

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
                continue  # a room that closed while it was being read
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
        cursor = (_last_read(room.cursor) or "").encode()  # the first entry's ``p`` is empty
        parsed: list[streams.Entry] = []
        for eid, flat in entries:
            fields = dict(zip(flat[::2], flat[1::2]))
            link = fields.get(b"p")
            if link is not None and link != cursor:
                self._holes[room.job_id] = room
                self._holes_ready.set()
                break
            parsed.append((eid, fields))
            cursor = eid
        if parsed:
            self._deliver(room, parsed, now)

    async def _fill_holes(self) -> None:
        """Read what the holed rooms' streams lost from the archive (``history.read_page``) and deliver it.

        Runs in its own task (the broker's reads go on for other rooms); an
        answer for a holed room that arrives meanwhile is not delivered past
        the hole (it shows the hole again). A room whose fill fails keeps
        its cursor and is tried again, so nothing after it is delivered first.
        """
        holes, self._holes = list(self._holes.values()), {}
        for room in holes:
            try:
                while self.rooms.get(room.job_id) is room:
                    after = _last_read(room.cursor)
                    entries = await self._read_entries(room.job_id, after)
                    if self.rooms.get(room.job_id) is not room:
                        break
                    if entries:
                        self._deliver(room, entries, now_ms())
                    if len(entries) < READ_COUNT:
                        break
                log.info("hub: %s: filled entries its stream no longer held", room.room_id)
            except (RedisError, OSError, SQLAlchemyError) as exc:
                log.warning("hub: %s: could not read the archive (%r); trying again", room.room_id, exc)
                self._holes.setdefault(room.job_id, room)
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
        first, last = keys[0], keys[-1]
        chunk = Chunk.of(texts, sizes)
        # Members in step whose outboxes hold nothing share one broadcast per
        # write window (outbox.Broadcast): one list append each here instead
        # of a put, a window wait and a drain. The open broadcast's members
        # take this read too (merged into its chunk); if it cannot take it,
        # it is written first, so nothing of this stream passes it.
        open_bc = room.broadcast
        if open_bc is not None and not open_bc.extend(chunk):
            open_bc.drain_now()
            open_bc = room.broadcast = None
        new_bc: Broadcast | None = None
        can_open = open_bc is None and chunk.size < BATCH_FRAME_BYTES
        for m in list(room.members.values()):
            if not m.live:
                continue
            after = m.after
            if after >= last:
                continue
            m.after = last
            if open_bc is not None and m.broadcast is open_bc:
                continue
            if after >= first:
                m.outbox.put_chunk(_after(keys, texts, sizes, after))
            elif can_open and m.outbox.in_step():
                if new_bc is None:
                    new_bc = Broadcast(chunk)
                new_bc.members.append(m)
                m.broadcast = new_bc
            else:
                m.outbox.put_chunk(chunk)
        if new_bc is not None:
            room.broadcast = new_bc
            window = new_bc.members[0].outbox.window
            if window is not None:  # always, for an outbox in step
                window.hold(new_bc)
            else:
                new_bc.drain_now()

    def _fan_out_presence(self, room: Room, entries: list[Any]) -> None:
        """Queue an answer's presence changes; fan them out now unless the room's window is open."""
        keys, texts, sizes = room.presence_pending
        for eid, flat in entries:
            fields = dict(zip(flat[::2], flat[1::2]))
            joined = [_member_dec.decode(fields[b"j"])] if b"j" in fields else []
            left = [_member_dec.decode(fields[b"l"])] if b"l" in fields else []
            raw = _enc.encode(PresenceMsg(roomId=room.room_id, joined=joined, left=left))
            keys.append(id_tuple(eid.decode()))
            texts.append(raw.decode())
            sizes.append(len(raw))
        room.presence_cursor = entries[-1][0].decode()
        if room.presence_timer is None:
            self._presence_window_ended(room)

    def _presence_window_ended(self, room: Room) -> None:
        """Fan the room's queued presence changes out (if any) and open its next window."""
        room.presence_timer = None
        keys, texts, sizes = room.presence_pending
        if not keys:
            return
        room.presence_pending = ([], [], [])
        # Like events: all the window's changes in one chunk, one put per member.
        first, last = keys[0], keys[-1]
        chunk = Chunk.of(texts, sizes)
        for m in list(room.members.values()):
            after = m.presence_after
            if after >= last:
                continue
            m.presence_after = last
            m.outbox.put_chunk(chunk if after < first else _after(keys, texts, sizes, after))
        room.presence_recent.extend(zip(keys, texts, sizes))
        window = min(PRESENCE_WINDOW_MAX, max(PRESENCE_WINDOW, len(room.members) / PRESENCE_FRAMES_PER_S))
        room.presence_timer = asyncio.get_running_loop().call_later(window, self._presence_window_ended, room)


def _end_presence_window(room: Room) -> None:
    """Drop a room's presence timer (the room is gone from this process, or the hub stopped)."""
    if room.presence_timer is not None:
        room.presence_timer.cancel()
        room.presence_timer = None


def _catch_up_presence(room: Room, member: Member) -> None:
    """Hand a registering member the changes that went out after its join read the log.

    Between a join's read (its ``presence_after``) and its registration here
    the hub may have fanned changes out to the room; they are not sent again
    by the hub, so the member gets them from the room's recent ones.
    """
    recent = room.presence_recent
    after = member.presence_after
    if not recent or after >= recent[-1][0]:
        return
    keys, texts, sizes = (list(column) for column in zip(*recent))
    member.presence_after = keys[-1]
    member.outbox.put_chunk(_after(keys, texts, sizes, after))
