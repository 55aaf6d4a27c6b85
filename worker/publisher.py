"""The publisher: a job attempt's events into Redis (live) and the SQL archive (record).

Events are appended in the order they are published, each exactly once:

* Every event gets a sequence number of this publisher (a random token plus
  a counter); the append is one Lua script (``streams.APPEND_EVENTS``) that
  skips the seqs already appended and returns their ids, so retrying a batch
  whose reply was lost (Redis died after the XADD) adds nothing twice.
* Ids never go backwards: the script gives ids above both the stream's last
  id and the last id this publisher got, even from a Redis that lost the
  stream, so watchers (which take only ids above the last one they saw) miss
  nothing after a restart.
* While Redis is down, :meth:`Publisher.publish` keeps the events (in
  order) and returns; :meth:`Publisher.run`, the pump, appends them once
  Redis is back, with backoff, logging one line per state change. Memory is
  bounded: at most ``PS_PUBLISH_BUFFER`` events wait for Redis and as many
  for the store; past that ``publish`` waits (the CLI's output then waits in
  its pipe), so nothing is dropped.
* A Redis that comes back without this publisher's entries (restarted
  without them, flushed, evicted) gets back the recent ones it lost, with
  their own ids, before anything new.

What was appended is archived (``store/history.py``) in batches: every
``ARCHIVE_EVERY`` seconds or ``ARCHIVE_BATCH`` events, and completely by
:meth:`Publisher.close`. A store outage keeps the batch and retries; the
insert is idempotent.

Redis never drops what the archive lacks: appends do not trim; after each
archive commit the publisher trims the stream below what it archived,
keeping ``PS_EVENTS_MAXLEN`` archived entries and those younger than
``PS_EVENTS_KEEP_SECONDS`` (``streams.trim_archived``).
So every entry is in Redis or in the store at every instant, and a reader
(``history.read_page``) never meets a hole. While the store is down nothing
is trimmed: the stream grows by the events waiting for the archive, at most
``PS_PUBLISH_BUFFER`` (past that ``publish`` waits, see above).

Without the pump running (the sweeper's one-off publishers) ``publish``
appends and archives at once and raises on failure, keeping nothing: the
caller retries with the same events, which reuse their seqs, so a retry after
a lost reply appends nothing twice.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import Any, Generic, Protocol, TypeVar

import anyio
import anyio.abc
import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine

from progress_service import streams
from progress_service.events import TERMINAL_STATUSES, JobSnapshot, StoredEvent
from progress_service.keys import events_key, snapshot_key
from progress_service.settings import Settings
from progress_service.store import history as archive
from worker.mapping import Mapped

log = logging.getLogger("progress_service.worker.publisher")

#: Events per append script call.
APPEND_BATCH = 200
#: Archive at least this often while a job runs (seconds) ...
ARCHIVE_EVERY = 1.0
#: ... or as soon as this many events wait.
ARCHIVE_BATCH = 200
#: Confirmed events kept to put back into a Redis that lost them.
RECENT = 2000
#: How long :meth:`Publisher.close` waits for Redis and the store (seconds).
DRAIN_TIMEOUT = 30.0
_BACKOFF_MAX = 5.0
#: Longest one append script call may take (seconds).
CALL_TIMEOUT = 10.0

_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)


class _Head(msgspec.Struct):
    """The archive's columns of a stored event body (``StoredEvent`` JSON), for :meth:`Publisher._adopt`."""

    kind: str
    attempt: int = 1


_head_dec = msgspec.json.Decoder(_Head)


def _ends(ev: Mapped) -> bool:
    """A terminal status event."""
    return ev.kind == "status" and getattr(ev.data, "status", None) in TERMINAL_STATUSES


@dataclass(slots=True, eq=False)
class _Item:
    """One published event until Redis confirmed it: its seq, encoded body and snapshot."""

    seq: int
    kind: str
    attempt: int
    body: bytes
    snapshot: bytes
    #: The snapshot object whose lastEventId follows the appends.
    target: Any


class SnapshotSource(Protocol):
    """The publisher's mapper: the CLI's (:class:`worker.mapping.Mapper`) or the hooks' (``HookMapper``)."""

    @property
    def snapshot(self) -> JobSnapshot:
        """The snapshot the events mapped so far lead to."""
        ...


#: The publisher's mapper type (kept for its callers: the worker's recovery uses a Mapper's methods).
M = TypeVar("M", bound=SnapshotSource)


class Publisher(Generic[M]):
    """Appends mapped events in order; one lock so concurrent tasks never interleave."""

    def __init__(
        self, redis: Redis, job_id: str, attempt: int, settings: Settings, mapper: M, *, engine: AsyncEngine
    ) -> None:
        self.redis = redis
        self.engine = engine
        self.job_id = job_id
        self.attempt = attempt
        self.settings = settings
        self.mapper = mapper
        self.lock = anyio.Lock()
        #: Events published (appended or waiting to be).
        self.count = 0
        self._token = uuid.uuid4().hex[:16]
        self._restores = 0
        self._seq = 0
        self._keys = [events_key(job_id), snapshot_key(job_id)]
        self._script = redis.register_script(streams.APPEND_EVENTS)
        self._pending: deque[_Item] = deque()  # not yet confirmed by Redis
        self._unarchived: list[archive.ArchivedEvent] = []
        self._recent: deque[archive.ArchivedEvent] = deque(maxlen=RECENT)
        self._last_id: str | None = None
        #: This attempt's first entry, and whether the events before it are archived (see _adopt).
        self._first_id: str | None = None
        self._adopted = False
        self._io = anyio.Lock()
        self._pumping = False
        self._closing = False
        self._redis_down = False
        self._store_down = False
        self._changed = anyio.Event()
        self._scope = anyio.CancelScope()
        self._limit = max(1, settings.publish_buffer)

    # ----------------------------------------------------------- publishing

    async def publish(self, events: list[Mapped]) -> None:
        """Append events, each with the snapshot it leads to (buffered while Redis is down)."""
        for ev in events:
            while self._pumping and (len(self._pending) >= self._limit or len(self._unarchived) >= self._limit):
                await self._wait_change()  # bounded memory: the pump frees room
            stored = StoredEvent(kind=ev.kind, at=ev.at, data=msgspec.to_builtins(ev.data), attempt=self.attempt)
            self._seq += 1
            self._pending.append(
                _Item(self._seq, ev.kind, self.attempt, streams.encode_event(stored), streams.encode_snapshot(ev.snapshot), ev.snapshot)
            )
            self.count += 1
        if self._pumping and self._redis_down:
            self._wake()  # the pump delivers once Redis is back
            return
        if not self._pumping:
            try:
                await self._push()
            except BaseException:
                # Not kept: the caller retries publish() with the same events.
                # They get the same seqs again, so an append whose reply was
                # lost is not made twice (the script skips those seqs).
                self._forget_unconfirmed()
                raise
        else:
            await self._push()
        if not self._pumping or any(_ends(ev) for ev in events):
            # The end of the job is archived before the caller goes on to
            # mark the job's row finished: a finished row means a whole archive.
            await self._archive()

    async def __call__(self, make: Any, *args: Any, **kwargs: Any) -> None:
        """Run a mapper method and append what it returns, under the lock."""
        async with self.lock:
            await self.publish(make(*args, **kwargs))

    @property
    def waiting(self) -> int:
        """Events not yet appended to Redis."""
        return len(self._pending)

    # ----------------------------------------------------------- lifetime

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The pump: deliver buffered events and archive in batches, until :meth:`close`.

        Start it with ``await tg.start(pub.run)`` in the task group that spans
        the job attempt, and :meth:`close` it before that group ends.
        """
        self._pumping = True
        task_status.started()
        backoff = 0.2
        last_archive = anyio.current_time()
        try:
            with self._scope:
                await self._pump(backoff, last_archive)
        finally:
            self._pumping = False
            self._wake()

    async def _pump(self, backoff: float, last_archive: float) -> None:
        while True:
            ok = True
            if self._pending:
                ok = await self._push()
            now = anyio.current_time()
            due = len(self._unarchived) >= ARCHIVE_BATCH or now - last_archive >= ARCHIVE_EVERY or self._closing
            if self._unarchived and due:  # also while Redis is down: what was appended is kept
                ok = await self._archive() and ok
                last_archive = now
            if self._closing and not self._pending and not self._unarchived:
                return
            if not ok:
                await anyio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            backoff = 0.2
            with anyio.move_on_after(ARCHIVE_EVERY):
                await self._wait_change()

    async def close(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """Deliver and archive everything (at most ``timeout`` s), then end the pump.

        Shielded: it also runs when the attempt is being cancelled.
        """
        self._closing = True
        self._wake()
        with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
            if not self._pumping:
                await self._push()
                await self._archive()
                return
            while self._pumping:
                await self._wait_change()
        self._scope.cancel()  # gave up waiting: the pump ends with what is left
        if self._pending or self._unarchived:
            log.error(
                "job %s: %d event(s) not appended and %d not archived after %.0fs",
                self.job_id, len(self._pending), len(self._unarchived), timeout,
            )

    # ----------------------------------------------------------- internals

    def _forget_unconfirmed(self) -> None:
        dropped = len(self._pending)
        self._pending.clear()
        self._seq -= dropped
        self.count -= dropped

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _wait_change(self) -> None:
        await self._changed.wait()

    async def _push(self) -> bool:
        """Append what waits, batch by batch; False when Redis failed (pump running) ."""
        async with self._io:
            while self._pending:
                batch = list(islice(self._pending, APPEND_BATCH))
                try:
                    reply = await self._append(self._token, batch[0].seq, batch, floor=self._last_id, before=self._last_id is not None)
                    if reply and reply[0] in (b"lost", "lost"):
                        await self._put_back()
                        reply = await self._append(self._token, batch[0].seq, batch, floor=self._last_id, before=False)
                except _ERRORS as exc:
                    if not self._pumping:
                        raise
                    if not self._redis_down:
                        log.warning("job %s: Redis unavailable (%r); keeping events until it is back", self.job_id, exc)
                    self._redis_down = True
                    self._wake()
                    return False
                if self._redis_down:
                    log.warning("job %s: Redis is back; delivering %d kept event(s)", self.job_id, len(self._pending))
                    self._redis_down = False
                for item, raw in zip(batch, reply, strict=True):
                    self._pending.popleft()
                    entry_id = raw.decode() if isinstance(raw, bytes) else raw
                    if not entry_id:  # not possible for a first append; be loud, not silent
                        log.error("job %s: event seq %d has no id after a retry", self.job_id, item.seq)
                        continue
                    item.target.lastEventId = entry_id
                    self._last_id = entry_id
                    self._first_id = self._first_id or entry_id
                    done = archive.ArchivedEvent(entry_id, item.kind, item.attempt, item.body)
                    self._unarchived.append(done)
                    self._recent.append(done)
                self._wake()
        return True

    async def _append(self, token: str, first: int, batch: list[Any], *, floor: str | None, before: bool) -> list[Any]:
        args: list[Any] = ["", token, first, floor or "", "", "1" if before else ""]
        if batch and isinstance(batch[0], _Item):
            args[4] = batch[-1].snapshot
            for item in batch:
                args += (item.body, "")
        else:
            for ev in batch:
                args += (ev.body, ev.id)
        # A Redis that hangs (rather than refusing) must not stall the job.
        with anyio.fail_after(CALL_TIMEOUT):
            ids: list[Any] = await self._script(keys=self._keys, args=args)
            return ids

    async def _put_back(self) -> None:
        """Redis forgot this publisher's appends: append the recent ones again, with their ids."""
        recent = list(self._recent)
        if not recent:
            return
        self._restores += 1
        token = f"{self._token}:r{self._restores}"
        for i in range(0, len(recent), APPEND_BATCH):
            chunk = recent[i : i + APPEND_BATCH]
            await self._append(token, i + 1, chunk, floor=None, before=i > 0)
        log.warning("job %s: Redis lost this attempt's events; put %d recent one(s) back", self.job_id, len(recent))

    async def _archive(self) -> bool:
        """Write what was appended to the store; False when the store failed (kept for the next try)."""
        while self._unarchived:
            batch = self._unarchived[:ARCHIVE_BATCH * 5]
            try:
                await archive.archive(self.engine, self.job_id, batch)
            except Exception as exc:  # noqa: BLE001 - any store failure: keep the batch, retry
                # (Not raised without the pump either: the events are in
                # Redis, a retried publish() would append them again; the
                # next publish or close() archives them.)
                if not self._store_down:
                    log.warning("job %s: store unavailable (%r); archiving later", self.job_id, exc)
                self._store_down = True
                return False
            if self._store_down:
                log.warning("job %s: store is back; archived %d event(s)", self.job_id, len(batch))
                self._store_down = False
            del self._unarchived[: len(batch)]
            self._wake()
            await self._trim(batch[-1].id)
        return True

    async def _trim(self, archived_upto: str) -> None:
        """Let Redis drop what the archive now holds (all but ``PS_EVENTS_MAXLEN`` of it)."""
        try:
            with anyio.fail_after(CALL_TIMEOUT):
                if not self._adopted:
                    await self._adopt(self._first_id or archived_upto)
                await streams.trim_archived(
                    self.redis, self.job_id, archived_upto,
                    keep=self.settings.events_maxlen, keep_ms=int(self.settings.events_keep_seconds * 1000),
                )
        except _ERRORS as exc:
            # Only memory is at stake: the next commit trims (and adopts) again.
            log.debug("job %s: trim after archive failed (%r)", self.job_id, exc)
        except Exception as exc:  # noqa: BLE001 - the store failed while adopting: trim nothing yet
            log.debug("job %s: archiving earlier events failed (%r); not trimming", self.job_id, exc)

    async def _adopt(self, upto: str) -> None:
        """Archive the events older than this attempt's that are still in the stream, before the first trim.

        An earlier attempt whose publisher gave up on a store outage (or the
        submit, if its archive write failed) left events only in Redis: the
        trim would otherwise drop them. Inserts are idempotent; comments are
        in the comments table already.
        """
        after: str | None = None
        while True:
            entries = await streams.replay(self.redis, self.job_id, after, count=ARCHIVE_BATCH * 5)
            older = [(eid.decode(), f) for eid, f in entries if streams.id_lt(eid.decode(), upto)]
            heads = [(eid, f[b"b"], _head_dec.decode(f[b"b"])) for eid, f in older if f.get(b"t") == b"event"]
            events = [archive.ArchivedEvent(eid, head.kind, head.attempt, body) for eid, body, head in heads]
            await archive.archive(self.engine, self.job_id, events)
            if len(older) < len(entries) or len(entries) < ARCHIVE_BATCH * 5:
                break
            after = older[-1][0]
        self._adopted = True
