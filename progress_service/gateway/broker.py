"""The broker seam: how the hub learns of new entries in its rooms' streams.

The hub (``hub.py``) keeps the local registry of rooms and members and fans
entries out; a :class:`Broker` subscribes and unsubscribes rooms and feeds
the hub what their streams gained. The streams stay the source of truth
(history, resume by id); live delivery is "rooms with news":

- every write to a room's event stream or presence log also does
  ``SPUBLISH ps:{job:<id>}:news ''`` in the same MULTI or script (sharded
  pub/sub, Redis 7: the channel hashes like the job's keys, so on a
  cluster it lives on the shard that holds the room);
- each shard (the one Redis, or each master of a cluster) has one
  :class:`Shard`: a pub/sub connection ``SSUBSCRIBE``\\ d to the news
  channel of each local room on that shard, and a reader connection that
  XREADs, without BLOCK, only the rooms whose channel spoke since the last
  read, from the hub's cursors.

So a read costs what changed, not how many rooms are open (the old single
``XREAD BLOCK`` named two keys per local room on every read and was rebuilt
on every join). A subscription is one command at join and one at leave.
Nothing is lost to pub/sub's fire-and-forget: a room is read from its
cursor once its subscription is confirmed, after every reconnect of its
shard (all its rooms), and whenever a read returned a full page, so a
missed notification only delays an entry until the next one, never skips it.

Cluster: a room's shard is the master of its slot. On MOVED (resharding)
the broker refreshes the slot map and moves the rooms that changed master.
A failed shard retries with backoff; the other shards do not notice.
See docs/cluster.md for the measurements behind this choice.

Why one module of ~420 lines: the seam, the per-shard reader (:class:`Shard`)
and the router that hands rooms to shards (:class:`StreamBroker`) are one
mechanism; a shard's cursors, news and reconnect rules are the rules above,
and the hub on the seam's other side lives apart.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any, Protocol

import anyio
from anyio.abc import TaskGroup
from redis.asyncio import Connection, ConnectionPool, Redis
from redis.exceptions import RedisError, ResponseError

from progress_service import metrics
from progress_service.keys import news_channel
from progress_service.redis_client import NO_SLOT, ClusterClient, is_cluster, slot_of

log = logging.getLogger("progress_service.gateway.broker")

#: Entries per stream per XREAD; also the page size of a replay.
READ_COUNT = 500
#: Rooms one XREAD round names at most (the rest wait for the next round).
ROOMS_PER_READ = 2000
#: Seconds between PINGs on an idle pub/sub connection; silence for 3x this is a dead link.
PING_EVERY = 5.0
#: Socket timeout of the reader connection (its reads never block server-side).
READ_TIMEOUT = 10.0


def _job_of_channel(channel: bytes) -> str:
    # ps:{job:<id>}:news
    return channel[8 : channel.rindex(b"}")].decode()


def _pack(*args: bytes) -> bytes:
    """One RESP command."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class RoomStreams(Protocol):
    """What a broker needs of a room: its keys and the hub's cursors."""

    job_id: str
    events_key: str
    presence_key: str
    cursor: str
    presence_cursor: str


#: Called with each XREAD answer (RESP2, raw): ``[[key, [[id, [field, value, ...]], ...]], ...]``.
Sink = Callable[[list[Any]], int]


class Broker(Protocol):
    """Subscribe rooms; deliver what their streams gain to the hub's sink."""

    redis: Redis

    def subscribe(self, room: RoomStreams) -> None:
        """Start delivering the room (its first read follows the confirmed subscription)."""

    def unsubscribe(self, room: RoomStreams) -> None:
        """Stop delivering the room."""

    async def run(self, sink: Sink) -> None:
        """Read and deliver until cancelled."""

    def stats(self) -> ReadStats:
        """Reads so far and the Redis time they took."""


class ReadStats:
    """Counters of the shards' XREAD rounds (benchmarks, tests)."""

    __slots__ = ("entries", "reads", "rooms_read", "seconds")

    def __init__(self) -> None:
        self.reads = 0
        self.seconds = 0.0
        self.rooms_read = 0
        self.entries = 0

    def add(self, other: ReadStats) -> None:
        """Sum ``other`` into this."""
        self.reads += other.reads
        self.seconds += other.seconds
        self.rooms_read += other.rooms_read
        self.entries += other.entries


class Shard:
    """One Redis node's rooms: a pub/sub connection for news and a reader for their streams."""

    def __init__(self, broker: StreamBroker, name: str, make_connection: Callable[[float | None], Connection]) -> None:
        self.broker = broker
        self.name = name
        self._make = make_connection
        self.rooms: dict[str, RoomStreams] = {}
        self._channels: dict[bytes, str] = {}
        #: Pending (un)subscriptions, in order: (subscribe?, channel).
        self._ops: list[tuple[bool, bytes]] = []
        self._ops_ready = anyio.Event()
        #: Rooms to read (insertion-ordered), and the event the reader waits on.
        self._dirty: dict[str, None] = {}
        self._news = anyio.Event()
        self._last_seen = 0.0
        self.stats = ReadStats()
        self.reconnects = 0
        self.healthy = False
        self._sharded = True
        #: Channels the pub/sub connection is subscribed to, as the server last said.
        self.subscribed = 0
        #: A read is waiting for its answers.
        self.reading = False

    # -------------------------------------------------------------- rooms

    def add(self, room: RoomStreams) -> None:
        """Subscribe ``room``'s news channel."""
        channel = news_channel(room.job_id).encode()
        self.rooms[room.job_id] = room
        self._channels[channel] = room.job_id
        self._ops.append((True, channel))
        self._ops_ready.set()

    def drop(self, room: RoomStreams) -> None:
        """Unsubscribe ``room``'s news channel."""
        if self.rooms.get(room.job_id) is not room:
            return
        del self.rooms[room.job_id]
        channel = news_channel(room.job_id).encode()
        self._channels.pop(channel, None)
        self._dirty.pop(room.job_id, None)
        self._ops.append((False, channel))
        self._ops_ready.set()

    def mark(self, job_id: str) -> None:
        """Read this room at the next round."""
        if job_id in self.rooms:
            self._dirty[job_id] = None
            self._news.set()

    # -------------------------------------------------------------- tasks

    async def run(self, sink: Sink) -> None:
        """Subscribe, listen and read until cancelled; reconnect with backoff on errors."""
        backoff = 0.1
        while True:
            started = anyio.current_time()
            try:
                await self._session(sink)
            except* (RedisError, OSError) as group:
                exc = group.exceptions[0]
                self.healthy = False
                self.reconnects += 1
                if isinstance(exc, ResponseError) and str(exc).startswith(("MOVED", "ASK")):
                    await self.broker.rehome()
                if anyio.current_time() - started > 10:
                    backoff = 0.1
                delay = backoff * (0.5 + random.random())
                log.warning("broker: shard %s failed (%s); retrying in %.2fs from the same ids", self.name, exc, delay)
                await anyio.sleep(delay)
                backoff = min(backoff * 2, 2.0)

    async def _session(self, sink: Sink) -> None:
        pubsub = self._make(None)
        reader = self._make(READ_TIMEOUT)
        try:
            await pubsub.connect()
            await reader.connect()
            # Sharded pub/sub where the server has it (Redis 7); Redis 6.2's
            # writers fall back to PUBLISH (streams.NOTIFY_LUA), so SUBSCRIBE.
            await reader.send_packed_command(_pack(b"COMMAND", b"INFO", b"SPUBLISH"), check_health=False)
            info = await reader.read_response()
            self._sharded = bool(info and info[0])
            # Every room again: each is read once its subscription is confirmed.
            self._ops = [(True, ch) for ch in self._channels]
            self._ops_ready.set()
            self._last_seen = anyio.current_time()
            self.healthy = True
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._listen, pubsub)
                tg.start_soon(self._write, pubsub)
                tg.start_soon(self._read, reader, sink)
        finally:
            with anyio.CancelScope(shield=True):
                await pubsub.disconnect()
                await reader.disconnect()

    async def _listen(self, conn: Connection) -> None:
        while True:
            msg = await conn.read_response()
            self._last_seen = anyio.current_time()
            kind = msg[0]
            if kind in (b"ssubscribe", b"subscribe", b"sunsubscribe", b"unsubscribe"):
                self.subscribed = int(msg[2])
            if kind in (b"smessage", b"ssubscribe", b"message", b"subscribe"):
                # news, or a confirmed subscription: read from the cursor
                # (what was added before it took effect had no notification).
                job_id = self._channels.get(msg[1])
                if job_id is not None:
                    self._dirty[job_id] = None
                    self._news.set()

    async def _write(self, conn: Connection) -> None:
        while True:
            if not self._ops:
                self._ops_ready = anyio.Event()
                with anyio.move_on_after(PING_EVERY):
                    await self._ops_ready.wait()
                if not self._ops:
                    if anyio.current_time() - self._last_seen > 3 * PING_EVERY:
                        raise ConnectionError(f"no answer from {self.name} for {3 * PING_EVERY:.0f}s")
                    await conn.send_packed_command(_pack(b"PING"), check_health=False)
                    continue
            batch, self._ops = self._ops[:1000], self._ops[1000:]
            on, off = (b"SSUBSCRIBE", b"SUNSUBSCRIBE") if self._sharded else (b"SUBSCRIBE", b"UNSUBSCRIBE")
            await conn.send_packed_command(b"".join(_pack(on if sub else off, ch) for sub, ch in batch), check_health=False)

    async def _read(self, conn: Connection, sink: Sink) -> None:
        broker = self.broker
        while True:
            if not self._dirty:
                self._news = anyio.Event()
                await self._news.wait()
                continue
            jobs = list(self._dirty)[:ROOMS_PER_READ]
            for job_id in jobs:
                del self._dirty[job_id]
            rooms = [self.rooms[j] for j in jobs if j in self.rooms]
            if not rooms:
                continue
            # One XREAD per slot (a cluster refuses keys of several slots in
            # one command; one Redis takes them all in one), all in one write.
            groups: dict[int, list[RoomStreams]] = {}
            for room in rooms:
                groups.setdefault(broker.slot(room.events_key), []).append(room)
            commands = []
            for group in groups.values():
                keys = [k for r in group for k in (r.events_key.encode(), r.presence_key.encode())]
                ids = [i for r in group for i in (r.cursor.encode(), r.presence_cursor.encode())]
                commands.append(_pack(b"XREAD", b"COUNT", b"%d" % READ_COUNT, b"STREAMS", *keys, *ids))
            t0 = time.perf_counter()
            self.reading = True
            await conn.send_packed_command(b"".join(commands), check_health=False)
            answers = [await conn.read_response() for _ in commands]
            self.reading = False
            self.stats.seconds += time.perf_counter() - t0
            self.stats.reads += 1
            self.stats.rooms_read += len(rooms)
            metrics.hub_reads.inc()
            for answer in answers:
                if not answer:
                    continue
                self.stats.entries += sink(answer)
                for key, entries in answer:
                    if len(entries) >= READ_COUNT:  # a full page: more is waiting
                        full = broker.job_of_key(key)
                        if full is not None:
                            self.mark(full)
            if self._dirty and len(self.rooms) >= 64:
                await anyio.sleep(0)  # let pending notifications land so they share the next round


class StreamBroker:
    """Shards of "rooms with news" readers (see the module docstring); one Redis or a cluster."""

    def __init__(self, redis: Redis, url: str) -> None:
        self.redis = redis
        self.url = url
        self._cluster = is_cluster(redis)
        self.shards: dict[str, Shard] = {}
        self._room_shard: dict[str, Shard] = {}
        self._rooms: dict[str, RoomStreams] = {}
        self._tg: TaskGroup | None = None
        self._sink: Sink | None = None
        pool = ConnectionPool.from_url(url)
        self._conn_kwargs: dict[str, Any] = dict(pool.connection_kwargs)
        self._conn_class: Any = pool.connection_class

    # ----------------------------------------------------------- routing

    def slot(self, key: str) -> int:
        """The key's slot (:data:`NO_SLOT` on one Redis)."""
        return slot_of(self.redis, key) if self._cluster else NO_SLOT

    def job_of_key(self, key: bytes) -> str | None:
        """The job of an events or presence-log key."""
        if not key.startswith(b"ps:{job:"):
            return None
        return key[8 : key.index(b"}")].decode()

    def _connection(self, host: str | None, port: int | None) -> Callable[[float | None], Connection]:
        kwargs = dict(self._conn_kwargs)
        if host is not None:
            kwargs.update(host=host, port=port)

        def make(timeout: float | None) -> Connection:
            conn: Connection = self._conn_class(
                **{**kwargs, "socket_timeout": timeout, "socket_connect_timeout": 2, "socket_keepalive": True}
            )
            return conn

        return make

    def _shard_named(self, name: str, host: str | None, port: int | None) -> Shard:
        shard = self.shards.get(name)
        if shard is None:
            shard = self.shards[name] = Shard(self, name, self._connection(host, port))
            if self._tg is not None and self._sink is not None:
                self._tg.start_soon(shard.run, self._sink)
        return shard

    def _shard_of(self, room: RoomStreams) -> Shard:
        if not self._cluster:
            return self._shard_named("redis", None, None)
        cluster: ClusterClient = self.redis
        node = cluster.nodes_manager.get_node_from_slot(slot_of(cluster, room.events_key))
        return self._shard_named(node.name, node.host, int(node.port))

    # ------------------------------------------------------------ rooms

    def subscribe(self, room: RoomStreams) -> None:
        """See :class:`Broker`."""
        shard = self._shard_of(room)
        self._rooms[room.job_id] = room
        self._room_shard[room.job_id] = shard
        shard.add(room)

    def unsubscribe(self, room: RoomStreams) -> None:
        """See :class:`Broker`."""
        if self._rooms.get(room.job_id) is not room:
            return
        del self._rooms[room.job_id]
        shard = self._room_shard.pop(room.job_id)
        shard.drop(room)

    async def rehome(self) -> None:
        """After MOVED: refresh the slot map and move rooms whose master changed."""
        if not self._cluster:
            return
        cluster: ClusterClient = self.redis
        try:
            await cluster.refresh_slots()
        except (RedisError, OSError) as exc:
            log.warning("broker: cannot refresh the cluster's slot map (%s)", exc)
            return
        for room in list(self._rooms.values()):
            old = self._room_shard[room.job_id]
            new = self._shard_of(room)
            if new is not old:
                old.drop(room)
                self._room_shard[room.job_id] = new
                new.add(room)

    # ------------------------------------------------------------- run

    async def run(self, sink: Sink) -> None:
        """See :class:`Broker`."""
        if self._cluster:
            cluster: ClusterClient = self.redis
            while True:
                try:
                    await cluster.initialize()
                    break
                except (RedisError, OSError) as exc:
                    log.warning("broker: cluster not reachable (%s); retrying", exc)
                    await anyio.sleep(1.0)
        async with anyio.create_task_group() as tg:
            self._tg, self._sink = tg, sink
            for shard in self.shards.values():
                tg.start_soon(shard.run, sink)
            try:
                await anyio.sleep_forever()
            finally:
                self._tg = None

    def stats(self) -> ReadStats:
        """See :class:`Broker`."""
        total = ReadStats()
        for shard in self.shards.values():
            total.add(shard.stats)
        return total

    @property
    def reconnects(self) -> int:
        """Reconnects of every shard so far."""
        return sum(s.reconnects for s in self.shards.values())
