"""Appending hook events to session jobs, off the request path.

The route answers the CLI as soon as a hook is authenticated, decoded and
queued; :class:`Ingest` (one task per app process, started and ended by the
app's lifespan) drains the bounded queue. Each round takes what is queued
(up to ``BATCH``), groups it by session in arrival order, and for each
session, under a short Redis lock (so two app processes never interleave one
session's hooks): reads the snapshot and the mapper's state, maps every hook,
appends the events with the worker's :class:`~worker.publisher.Publisher`
(events and snapshot in one script call, then the SQL archive), and writes
the state back. The SQL row is written
when a session appears and whenever its status changes.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from progress_service import outage, streams
from progress_service.events import JobSnapshot, JobSpec, SessionInfo, clip
from progress_service.hooks.body import HookInput
from progress_service.hooks.mapping import HookMapper, SessionState
from progress_service.ids import room_id
from progress_service.keys import events_key, hook_lock_key, hook_owner_key, hook_state_key, snapshot_key
from progress_service.store import jobs as job_store
from worker.mapping import Mapped
from worker.publisher import Publisher

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from sqlalchemy.ext.asyncio import AsyncEngine

    from progress_service.settings import Settings
    from progress_service.store.audit import Audit

log = logging.getLogger("progress_service.hooks")

#: Hooks taken from the queue in one round.
BATCH = 256
#: How long a session's lock lives if its holder dies (ms), and how long to wait for it (s).
LOCK_TTL_MS = 10_000
LOCK_WAIT = 10.0
#: A session's prompt until its first prompt arrives (the job list's title).
UNTITLED = "Claude Code session"

_state_enc = msgspec.json.Encoder()
_state_dec = msgspec.json.Decoder(SessionState)

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def session_job_id(session_id: str) -> str:
    """The job id of a Claude Code session: stable, opaque, valid in a room id."""
    return "cc-" + uuid.uuid5(uuid.NAMESPACE_URL, "claude-code-session:" + session_id).hex


@dataclass(frozen=True, slots=True)
class HookItem:
    """One accepted hook, waiting for the ingest task."""

    job_id: str
    team_id: str
    user_id: str
    user_name: str
    host: str | None
    hook: HookInput
    raw_hash: str
    at: int


class Ingest:
    """The per-process ingest task and its bounded queue."""

    def __init__(self, engine: AsyncEngine, redis: Redis, settings: Settings, *, audit: Audit | None) -> None:
        self.engine = engine
        self.redis = redis
        self.settings = settings
        #: Records ``session.report`` when a session first appears.
        self.audit = audit
        self._send: MemoryObjectSendStream[HookItem]
        self._recv: MemoryObjectReceiveStream[HookItem]
        self._send, self._recv = anyio.create_memory_object_stream[HookItem](self.settings.hook_queue)
        self._stopped = anyio.Event()
        self.processed = 0
        self.dropped = 0
        self._busy = False

    def offer(self, item: HookItem) -> bool:
        """Queue a hook without waiting; False when the queue is full (the route answers 503)."""
        try:
            self._send.send_nowait(item)
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            return False
        return True

    @property
    def queued(self) -> int:
        """Hooks waiting in the queue."""
        return self._send.statistics().current_buffer_used

    @property
    def idle(self) -> bool:
        """Nothing queued and no round under way: every accepted hook has been applied."""
        return not self._busy and self.queued == 0

    async def run(self) -> None:
        """Drain the queue until :meth:`aclose`; every queued hook is applied before it returns."""
        try:
            async with self._recv:
                while True:
                    try:
                        first = await self._recv.receive()
                    except anyio.EndOfStream:
                        return
                    self._busy = True
                    batch = [first]
                    while len(batch) < BATCH:
                        try:
                            batch.append(self._recv.receive_nowait())
                        except (anyio.WouldBlock, anyio.EndOfStream):
                            break
                    groups: dict[str, list[HookItem]] = {}
                    for item in batch:
                        groups.setdefault(item.job_id, []).append(item)
                    # One session after the other: concurrent SQLite writers
                    # would wait on each other's locks, and a round is short.
                    for items in groups.values():
                        await self._apply_safely(items)
                    self._busy = False
        finally:
            self._stopped.set()

    async def aclose(self, timeout: float = 5.0) -> None:
        """Stop taking hooks and wait (at most ``timeout`` s) for the queued ones to be applied."""
        self._send.close()
        with anyio.move_on_after(timeout):
            await self._stopped.wait()

    async def _apply_safely(self, items: list[HookItem]) -> None:
        try:
            await self.apply(items)
        except Exception as exc:  # noqa: BLE001 - one session's failure must not end the ingest task
            self.dropped += len(items)
            dependency = outage.classify(exc)
            if dependency is not None:  # one throttled line, no traceback: the dependency is down
                outage.warn(dependency, f"hook ingest ({len(items)} hook(s) of job {items[0].job_id} dropped)", exc)
            else:
                log.exception("hooks: %d hook(s) of job %s could not be applied", len(items), items[0].job_id)

    # -- one session -------------------------------------------------------------

    async def apply(self, items: list[HookItem]) -> None:
        """Apply hooks of one session, in order, under its lock.

        Few round trips, as a burst fills the event loop and each one waits:
        lock and read in one MULTI, one append script (and archive insert),
        state, expiries and unlock in one pipeline; SQL only when the
        session appears or its status changes.
        """
        job_id = items[0].job_id
        redis = self.redis
        token = uuid.uuid4().hex
        with anyio.fail_after(LOCK_WAIT):
            while True:
                async with redis.pipeline(transaction=True) as pipe:
                    pipe.set(hook_lock_key(job_id), token, nx=True, px=LOCK_TTL_MS)
                    pipe.hget(snapshot_key(job_id), "s")
                    pipe.get(hook_state_key(job_id))
                    locked, raw_snap, raw_state = await pipe.execute()
                if locked:
                    break
                await anyio.sleep(0.005)
        unlocked = False
        try:
            unlocked = await self._apply_locked(job_id, items, raw_snap, raw_state, token)
        finally:
            if not unlocked:
                with anyio.CancelScope(shield=True):
                    await redis.eval(_RELEASE, 1, hook_lock_key(job_id), token)

    async def _apply_locked(
        self, job_id: str, items: list[HookItem], raw_snap: bytes | None, raw_state: bytes | None, token: str
    ) -> bool:
        """Map and append; True when the lock was released on the way out."""
        settings = self.settings
        redis = self.redis
        engine = self.engine
        first = items[0]
        snapshot = streams.decode_snapshot(raw_snap) if raw_snap else None
        created = False
        if snapshot is None:
            record = await job_store.get_job(engine, job_id)
            if record is not None and record.team_id != first.team_id:
                # The owner key expired and another team claimed the id: never write into it.
                self.dropped += len(items)
                log.warning("hooks: job %s belongs to another team; %d hook(s) dropped", job_id, len(items))
                return False
            created = record is None
            snapshot = record.to_snapshot() if record is not None else self._first_snapshot(first)
        state = _state_dec.decode(raw_state) if raw_state else SessionState()
        mapper = HookMapper(snapshot, state)
        status_before = snapshot.status
        mapped: list[Mapped] = []
        for item in items:
            if state.posts >= settings.hook_max_events_per_session:
                if state.posts == settings.hook_max_events_per_session:
                    state.posts += 1
                    line = f"more than {settings.hook_max_events_per_session} hooks: this session's later hooks are ignored"
                    mapped += mapper.note(item.at, line)
                self.dropped += 1
                continue
            mapped += mapper.apply(item.hook, item.raw_hash, item.at)
            self.processed += 1
        if created:
            # The row first: a watcher's join checks the job's team there.
            await self._create(first, mapper.snapshot)
        if mapped:
            # The worker's publisher: one append script per batch of events
            # (event and snapshot together), then the SQL archive.
            pub = Publisher(redis, job_id, 1, settings, mapper, engine=engine)
            await pub.publish(mapped)
        if not created and mapper.snapshot.status != status_before:
            await job_store.update_job(engine, job_id, snapshot=mapper.snapshot)
        ttl = settings.events_ttl
        async with redis.pipeline(transaction=False) as pipe:
            pipe.set(hook_state_key(job_id), _state_enc.encode(state), ex=ttl)
            # A session that never says goodbye (a closed laptop) expires
            # like a finished job, counted from its last hook.
            for key in (events_key(job_id), snapshot_key(job_id), hook_owner_key(job_id)):
                pipe.expire(key, ttl)
            pipe.eval(_RELEASE, 1, hook_lock_key(job_id), token)
            await pipe.execute()
        return True

    def _first_snapshot(self, item: HookItem) -> JobSnapshot:
        """The snapshot of a session seen for the first time (before its first event)."""
        hook = item.hook
        info = SessionInfo(
            sessionId=hook.session_id,
            host=item.host,
            cwd=clip(hook.cwd, 1000) if hook.cwd else None,
            branch=clip(hook.git_branch, 200) if hook.git_branch else None,
        )
        return JobSnapshot(
            id=item.job_id,
            roomId=room_id(item.job_id),
            workdir=info.cwd or "",
            createdAt=item.at,
            submittedBy=item.user_name,
            kind="session",
            session=info,
        )

    async def _create(self, item: HookItem, snapshot: JobSnapshot) -> None:
        """The job row of a new session (with the snapshot its first hooks lead to), and its audit record."""
        engine = self.engine
        await job_store.create_job(
            engine,
            job_id=item.job_id,
            team_id=item.team_id,
            user_id=item.user_id,
            spec=JobSpec(prompt=UNTITLED),
            created_at=item.at,
            demo=False,
            kind="session",
            source="hook",
            host=item.host,
            status=snapshot.status,
            phase=snapshot.phase,
            snapshot=snapshot,
        )
        audit = self.audit
        if audit is not None:
            audit.record_nowait(
                action="session.report",
                team_id=item.team_id,
                actor=item.user_name,
                room_id=room_id(item.job_id),
                detail={"sessionId": item.hook.session_id, "host": item.host, "source": "hook"},
            )
