"""Reviewer comments end to end: the hook the gateway and the HTTP API call.

One :class:`Comments` per process (``Services.comments``); the gateway calls
``post(principal, room_id, job_id, request_id, text)`` for a ``chat`` message
(see ``gateway/chat.py``'s ``CommentsHook``) and acks with the event id it
returns; ``POST /api/jobs/{id}/comments`` calls :meth:`Comments.submit`.

The order is the durability contract of docs/protocol.md:

1. role check (reviewer and above, else :class:`CommentForbidden`) and text
   normalization (trimmed; no control characters but newline and tab;
   1..``ws_max_text_chars`` characters, else :class:`InvalidComment`);
2. one transaction stores the comment and its audit record, unique on
   ``(room, user, requestId)``. It must finish within ``store_timeout``;
   past that, or when the store fails, the caller gets
   :class:`CommentsUnavailable`: the transaction is rolled back (it runs in
   its own task, shielded from the caller's cancellation, and checks just
   before its commit whether the caller gave up), so nothing is half-written
   and nothing is broadcast;
3. the comment is appended to the job's Redis stream — the hub of every node
   reads it from there, in order with the job's events, and replay finds it;
4. its event id is stored on the row and returned (the ack).

Step 3 is idempotent per comment. It is ``streams.append_chat`` (same
entry, same snapshot counter) made atomic with a per-job map from comment id
to entry id in one Lua script, so a retry — or the same request id arriving
at once on two connections, or on two nodes — that finds the comment stored
but its XADD not yet recorded gets the id of the one entry instead of adding
a second. A retry after Redis failed between commit and XADD does the XADD.

Why one module of ~460 lines: the group writer is the write path; the
batching decides the transaction and the stream append above, so the steps
of the contract and the code that keeps them read together.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import msgspec
from redis.exceptions import NoScriptError, RedisError

from progress_service import ids, outage, streams
from progress_service.errors import Abandoned, CommentForbidden, CommentsUnavailable, InvalidComment
from progress_service.events import ROLE_RANK
from progress_service.ids import now_ms
from progress_service.keys import events_key, published_key, snapshot_key
from progress_service.store import comments as comment_store

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from sqlalchemy.ext.asyncio import AsyncEngine
    from progress_service.settings import Settings
    from progress_service.store.identity import Principal

log = logging.getLogger("progress_service.comments")

__all__ = ["CommentForbidden", "Comments", "CommentsUnavailable", "InvalidComment", "normalize_text"]

#: Role needed to comment.
COMMENT_ROLE = "reviewer"
#: Control characters (C0, DEL, C1) other than tab and newline.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
#: Share of ``store_timeout`` this module spends, so it answers before the
#: gateway's own ``fail_after(store_timeout)`` around ``post`` fires.
_BUDGET = 0.9

_enc = msgspec.json.Encoder()
#: Most comments one transaction takes (the rest wait for the next one).
MAX_BATCH = 500

# Appends a batch of one job's comments, each at most once.
# KEYS: events stream, snapshot hash, comment-id -> entry-id hash
# ARGV: '' (unused: the publisher trims the stream, below what the archive and
#       the comments table hold), ttl of the map, then (comment id, entry body) pairs
# Returns the entry id of each comment, in ARGV order.
_APPEND_ONCE = """
local ids = {}
local added = 0
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local prev = ''
if last[1] then prev = last[1][1] end
for i = 3, #ARGV, 2 do
  local id = redis.call('HGET', KEYS[3], ARGV[i])
  if not id then
    -- 'p': the entry before this one (streams.py), for readers' hole checks
    id = redis.call('XADD', KEYS[1], '*', 't', 'chat', 'b', ARGV[i + 1], 'p', prev)
    prev = id
    redis.call('HSET', KEYS[3], ARGV[i], id)
    added = added + 1
  end
  ids[#ids + 1] = id
end
if added > 0 then
  redis.call('HINCRBY', KEYS[2], 'n', added)
  redis.call('EXPIRE', KEYS[3], ARGV[2])
  """ + streams.NOTIFY_LUA + """
end
return ids
"""


def normalize_text(text: str, max_chars: int) -> str:
    """The comment as stored: trimmed; refused when empty, too long or holding control characters."""
    text = text.strip()
    if not text:
        raise InvalidComment("text: must not be empty after trimming")
    if len(text) > max_chars:
        raise InvalidComment(f"text: at most {max_chars} characters after trimming")
    if _CONTROL.search(text):
        raise InvalidComment("text: control characters other than newline and tab are not allowed")
    return text


def _all_gone(batch: list[_Waiter]) -> bool:
    """Whether the callers of any of ``batch`` stopped waiting (the transaction is then abandoned)."""
    return any(w.gone for w in batch)


def _comment_id(waiter: _Waiter) -> int:
    """Sort key of a waiter whose comment is stored."""
    assert waiter.comment is not None
    return waiter.comment.commentId


class _Waiter:
    """One ``submit`` waiting for the writer: the request and how far it got."""

    __slots__ = ("comment", "created", "deadline", "event_id", "future", "item")

    def __init__(self, item: comment_store.NewComment, future: asyncio.Future[tuple[comment_store.Comment, bool]], deadline: float) -> None:
        self.item = item
        #: Resolved by the writer; cancelled by the waiter when it gives up.
        self.future = future
        self.deadline = deadline
        #: Set once committed (``comment.id`` is None until published).
        self.comment: comment_store.Comment | None = None
        self.created = False
        #: Set once appended to the job's stream.
        self.event_id: str | None = None

    @property
    def gone(self) -> bool:
        """The waiter got its answer or gave up (its future is cancelled)."""
        return self.future.done()

    def resolve(self) -> None:
        if not self.future.done() and self.comment is not None:
            comment = self.comment if self.event_id is None else msgspec.structs.replace(self.comment, id=self.event_id)
            self.future.set_result((comment, self.created))

    def fail(self, reason: str) -> None:
        if not self.future.done():
            self.future.set_exception(CommentsUnavailable(reason))


class Comments:
    """Store, publish and ack comments (``Services.comments``, the gateway's chat hook).

    Group commit: ``submit`` queues its comment and waits; one writer task
    (:meth:`run`) takes every queued comment, stores them with their audit
    records in one transaction, appends them to their jobs' streams in one
    Redis round trip, and records their event ids in its next transaction,
    which also stores the comments that queued meanwhile. A comment is
    answered once its event id is committed. The writer runs in the app's
    lifespan task group (or ``async with Comments(...)``); without it a
    comment is refused as unavailable.
    """

    def __init__(self, engine: AsyncEngine, redis: Redis, settings: Settings) -> None:
        self.engine = engine
        self.redis = redis
        self.settings = settings
        self._append_once = redis.register_script(_APPEND_ONCE)
        self._queue: list[_Waiter] = []
        #: Set while :meth:`run` waits for work; None when no writer runs.
        self._wake: asyncio.Event | None = None
        #: :meth:`run`'s scope (cancelled by :meth:`aclose`) and its end.
        self._scope: anyio.CancelScope | None = None
        self._stopped: anyio.Event | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        #: Event ids (comment id -> entry id) of acked comments whose recording
        #: on the row failed (store down): retried with the next transaction;
        #: :meth:`with_ids` repairs the rows on read should this process stop first.
        self._unrecorded: dict[int, str] = {}

    async def post(self, principal: Principal, room_id: str, job_id: str, request_id: str, text: str) -> str:
        """The gateway's hook: store, publish, return the event id (the ack).

        The gateway has checked that the connection joined ``room_id``.
        """
        comment, _created = await self.submit(principal, job_id, request_id, text, room_id=room_id)
        assert comment.id is not None
        return comment.id

    async def submit(
        self, principal: Principal, job_id: str, request_id: str, text: str, *, room_id: str | None = None
    ) -> tuple[comment_store.Comment, bool]:
        """Store and publish a comment; ``(comment, created)``.

        ``created`` is False for a retry of a stored request id (its comment
        is returned, published once). Raises :class:`CommentForbidden`,
        :class:`InvalidComment` or :class:`CommentsUnavailable`.
        """
        if ROLE_RANK.get(principal.role, -1) < ROLE_RANK[COMMENT_ROLE]:
            raise CommentForbidden(f"role '{principal.role}' may not comment")
        text = normalize_text(text, self.settings.ws_max_text_chars)
        room_id = room_id or ids.room_id(job_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.store_timeout * _BUDGET
        item = comment_store.NewComment(
            job_id=job_id,
            room_id=room_id,
            team_id=principal.team_id,
            user_id=principal.user_id,
            user_name=principal.user_name,
            request_id=request_id,
            text=text,
            created_at=now_ms(),
        )
        if self._wake is None:
            raise CommentsUnavailable("the comment writer is not running")
        waiter = _Waiter(item, loop.create_future(), deadline)
        self._queue.append(waiter)
        self._wake.set()
        try:
            # Cancelling this wait (timeout, or the caller's cancellation)
            # cancels the future: the writer then leaves the comment out of its
            # transaction, or rolls the transaction back if it is under way.
            # (asyncio's own timeout: anyio's costs a backend lookup per call.)
            async with asyncio.timeout_at(deadline):
                return await waiter.future
        except TimeoutError:
            if waiter.future.done() and not waiter.future.cancelled():
                return waiter.future.result()  # answered as the timeout fired
            if waiter.event_id is not None and waiter.comment is not None:
                # Broadcast already; only recording its id on the row was slow.
                # The Redis map keeps the id: a retry still gets the same ack.
                log.warning("comments: recording event id %s is slow; acked anyway", waiter.event_id)
                return msgspec.structs.replace(waiter.comment, id=waiter.event_id), waiter.created
            log.warning("comments: store slower than %.1fs; answered unavailable", self.settings.store_timeout)
            if waiter.comment is None:
                raise CommentsUnavailable("the comment store did not answer in time") from None
            raise CommentsUnavailable("the event stream is unavailable") from None

    async def with_ids(self, job_id: str, items: list[comment_store.Comment]) -> list[comment_store.Comment]:
        """``items`` with every event id filled in: the repair on read.

        A row can lack its id when the store failed after the comment was
        appended to the stream (the ack had the id; recording it did not
        commit), or when the append itself failed. The append script answers
        the entry id of a comment appended before (its per-job map) and
        appends the others now, so each comment is in the stream once; the
        ids are then recorded on the rows. Redis down: the items are
        returned as they are (``id`` null: not yet published).
        """
        missing = [c for c in items if c.id is None]
        if not missing:
            return items
        try:
            async with asyncio.timeout(self.settings.store_timeout):
                known = dict(zip((c.commentId for c in missing), await self.publish_stored(job_id, missing), strict=True))
        except (TimeoutError, RedisError, OSError) as exc:
            outage.warn(outage.classify(exc) or "redis", "publishing stored comments", exc)
            return items
        try:
            await comment_store.set_event_ids(self.engine, [(c.commentId, known[c.commentId]) for c in missing])
        except Exception as exc:  # the read still answers with the ids; the next read records them
            log.warning("comments: recording %d event id(s) failed: %r", len(missing), exc)
        else:
            for c in missing:
                self._unrecorded.pop(c.commentId, None)
        return [c if c.id is not None else msgspec.structs.replace(c, id=known[c.commentId]) for c in items]

    async def publish_stored(self, job_id: str, items: list[comment_store.Comment]) -> list[str]:
        """Append stored comments of one job to its stream, each at most once; their entry ids.

        A comment appended before gets the id of that entry (the script's map).
        """
        args: list[Any] = ["", self.settings.events_ttl]
        for c in items:
            args += (str(c.commentId), _enc.encode(c.stored_chat()))
        keys = [events_key(job_id), snapshot_key(job_id), published_key(job_id)]
        raw = await self._append_once(keys=keys, args=args)
        return [r.decode() if isinstance(r, bytes) else str(r) for r in raw]

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The writer: write whatever is queued until :meth:`aclose` or cancellation.

        Comments it has not answered when it stops get ``unavailable``.
        """
        if self._wake is not None:
            raise RuntimeError("the comment writer is already running")
        wake = self._wake = asyncio.Event()
        stopped = self._stopped = anyio.Event()
        try:
            with anyio.CancelScope() as self._scope:
                task_status.started()
                while True:
                    await wake.wait()
                    wake.clear()
                    await self._write()
        finally:
            self._wake = self._scope = None
            for waiter in self._queue:
                waiter.fail("the comment writer stopped")
            self._queue.clear()
            stopped.set()

    async def aclose(self) -> None:
        """Stop the writer (the comments it has not answered get ``unavailable``); new ones are refused."""
        if self._scope is not None and self._stopped is not None:
            self._scope.cancel()
            await self._stopped.wait()

    async def __aenter__(self) -> Comments:
        """Run the writer for the ``async with`` block (outside an app, e.g. tests and tools)."""
        tg = self._task_group = anyio.create_task_group()
        await tg.__aenter__()
        await tg.start(self.run)
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop the writer started by :meth:`__aenter__`."""
        await self.aclose()
        tg, self._task_group = self._task_group, None
        if tg is not None:
            await tg.__aexit__(None, None, None)

    # ----------------------------------------------------------- the writer

    async def _write(self) -> None:
        """Write until nothing is queued or waiting for its event id."""
        carry: list[_Waiter] = []  # published; their event ids go into the next transaction
        batch: list[_Waiter] = []
        try:
            while self._queue or carry:
                batch = [w for w in self._queue[:MAX_BATCH] if not w.gone]
                del self._queue[:MAX_BATCH]
                committed = await self._commit(batch, carry)
                for waiter in carry:  # their event ids are committed (or the store failed: see submit)
                    waiter.resolve()
                carry = []
                if committed:
                    carry = await self._publish(committed)
                batch = []
        except BaseException as exc:
            # Cancelled (aclose) or a bug: nobody is left waiting forever. A
            # bug is logged here and the writer goes on with the next comment.
            for waiter in (*self._queue, *batch, *carry):
                waiter.fail("the comment writer stopped")
            self._queue.clear()
            if not isinstance(exc, Exception):
                raise
            log.exception("comments: the writer failed")

    async def _commit(self, batch: list[_Waiter], carry: list[_Waiter]) -> list[_Waiter]:
        """One transaction: ``batch``'s comments and audit records, ``carry``'s event ids.

        Returns the waiters whose comment must be appended to its stream.
        """
        pending = dict(self._unrecorded)
        pending.update({w.comment.commentId: w.event_id for w in carry if w.comment and w.event_id})
        event_ids = list(pending.items())
        self._unrecorded.clear()
        while batch or event_ids:
            try:
                results = await comment_store.store_batch(
                    self.engine,
                    [w.item for w in batch],
                    event_ids=event_ids,
                    abandoned=functools.partial(_all_gone, batch),
                )
            except Abandoned:
                # Somebody gave up while the transaction ran: nothing was
                # written; write the others (and the event ids) again.
                batch = [w for w in batch if not w.gone]
                continue
            except Exception as exc:  # any failure to store durably is "unavailable"
                dependency = outage.classify(exc)
                if dependency is None:
                    log.warning("comments: store failed: %r", exc)
                else:  # one line per outage, not one per batch
                    outage.warn(dependency, "the comment writer", exc)
                for waiter in batch:
                    waiter.fail("the comment store is unavailable")
                # The carried comments are acked (their entries are in the
                # stream); their ids go into the next transaction instead.
                self._unrecorded.update(event_ids)
                return []
            publish: list[_Waiter] = []
            for waiter, (comment, created) in zip(batch, results, strict=True):
                waiter.comment, waiter.created = comment, created
                if comment.id is not None:
                    waiter.resolve()  # published before: same id, no second broadcast
                elif not waiter.gone:  # (gave up during the commit: a retry publishes it)
                    publish.append(waiter)
            return publish
        return []

    async def _publish(self, waiters: list[_Waiter]) -> list[_Waiter]:
        """Append the comments to their jobs' streams: one script call per job, one round trip.

        Returns the waiters that got an event id. Within a job, comments are
        appended in comment-id order.
        """
        by_job: dict[str, list[_Waiter]] = {}
        for waiter in sorted((w for w in waiters if not w.gone), key=_comment_id):
            by_job.setdefault(waiter.item.job_id, []).append(waiter)
        if not by_job:
            return []
        deadline = min(w.deadline for group in by_job.values() for w in group)
        try:
            async with asyncio.timeout_at(deadline):
                replies = await self._append(by_job)
        except (TimeoutError, RedisError, OSError) as exc:
            # Stored but not broadcast: the client retries with the same
            # request id and that retry does the XADD.
            outage.warn(outage.classify(exc) or "redis", "the comment writer (stream append)", exc)
            for group in by_job.values():
                for waiter in group:
                    waiter.fail("the event stream is unavailable")
            return []
        published: list[_Waiter] = []
        for group, ids in zip(by_job.values(), replies, strict=True):
            for waiter, raw in zip(group, ids, strict=True):
                waiter.event_id = raw.decode() if isinstance(raw, bytes) else str(raw)
                published.append(waiter)
        return published

    async def _append(self, by_job: dict[str, list[_Waiter]]) -> list[list[Any]]:
        """Run the append script once per job; the replies in ``by_job``'s order."""
        calls = []
        for job_id, group in by_job.items():
            args: list[Any] = ["", self.settings.events_ttl]
            for waiter in group:
                assert waiter.comment is not None
                args += (str(waiter.comment.commentId), _enc.encode(waiter.comment.stored_chat()))
            calls.append(([events_key(job_id), snapshot_key(job_id), published_key(job_id)], args))
        if len(calls) == 1:  # the usual case: one room; EVALSHA (loads the script if Redis lost it)
            keys, args = calls[0]
            return [await self._append_once(keys=keys, args=args)]
        # Several jobs: one round trip. EVALSHA directly rather than through
        # the pipeline's script support, which costs a SCRIPT EXISTS round
        # trip every time; a job whose call finds no script (Redis restarted)
        # did not run and is run again on its own, which loads the script.
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(self._append_once.sha, len(keys), *keys, *args)
            replies = await pipe.execute(raise_on_error=False)
        out: list[list[Any]] = []
        for (keys, args), reply in zip(calls, replies, strict=True):
            if isinstance(reply, NoScriptError):
                reply = await self._append_once(keys=keys, args=args)
            elif isinstance(reply, Exception):
                raise reply
            out.append(reply)
        return out
