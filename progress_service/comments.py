"""Reviewer comments end to end: the hook the gateway and the HTTP API call.

``services.extras["comments"]`` is a :class:`Comments`; the gateway calls
``post(principal, room_id, job_id, request_id, text)`` for a ``chat`` message
(see ``gateway/session.py``'s ``CommentsHook``) and acks with the event id it
returns; ``POST /api/jobs/{id}/comments`` calls :meth:`Comments.submit`.

The order is the durability contract of PROTOCOL.md:

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
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from redis.exceptions import RedisError

from progress_service import streams
from progress_service.events import ROLE_RANK
from progress_service.gateway.session import CommentForbidden, CommentsUnavailable
from progress_service.store import comments as comment_store

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from sqlalchemy.ext.asyncio import AsyncEngine

    from progress_service.services import Services
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

# KEYS: events stream, snapshot hash, comment-id -> entry-id hash
# ARGV: comment id, entry body, maxlen, ttl of the map
_APPEND_ONCE = """
local done = redis.call('HGET', KEYS[3], ARGV[1])
if done then return done end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 't', 'chat', 'b', ARGV[2])
redis.call('HINCRBY', KEYS[2], 'n', 1)
redis.call('HSET', KEYS[3], ARGV[1], id)
redis.call('EXPIRE', KEYS[3], ARGV[4])
return id
"""


class InvalidComment(ValueError):
    """The text breaks the rules (empty, too long, control characters)."""


def published_key(job_id: str) -> str:
    """Comment row id -> stream entry id of the job's comments (same hash slot as the stream)."""
    return f"ps:{{job:{job_id}}}:chats"


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


def _consume(task: asyncio.Task[Any]) -> None:
    # An abandoned write's outcome is not awaited by anyone: read it so
    # asyncio does not log "exception was never retrieved".
    if not task.cancelled() and task.exception() is not None:
        log.info("comments: abandoned write ended with %r", task.exception())


class Comments:
    """``services.extras["comments"]``: store, publish and ack comments."""

    def __init__(self, engine: AsyncEngine, redis: Redis, settings: Settings) -> None:
        self.engine = engine
        self.redis = redis
        self.settings = settings
        self._append_once = redis.register_script(_APPEND_ONCE)

    @classmethod
    def from_services(cls, services: Services) -> Comments:
        return cls(services.engine, services.redis, services.settings)

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
        room_id = room_id or streams.room_id(job_id)
        deadline = anyio.current_time() + self.settings.store_timeout * _BUDGET

        comment, created = await self._store(principal, job_id, room_id, request_id, text, deadline)
        if comment.id is not None:
            return comment, created  # published before: same id, no second broadcast

        try:
            with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                event_id = await self._publish(comment)
        except (TimeoutError, RedisError, OSError) as exc:
            # Stored but not broadcast: the client retries with the same
            # request id and that retry does the XADD.
            log.warning("comments: stream append failed for %s: %r", room_id, exc)
            raise CommentsUnavailable("the event stream is unavailable") from None
        comment = msgspec.structs.replace(comment, id=event_id)
        await self._remember(comment.commentId, event_id, deadline)
        return comment, created

    async def _store(
        self, principal: Principal, job_id: str, room_id: str, request_id: str, text: str, deadline: float
    ) -> tuple[comment_store.Comment, bool]:
        abandoned = False

        def is_abandoned() -> bool:
            return abandoned

        task = asyncio.ensure_future(
            comment_store.store_comment(
                self.engine,
                job_id=job_id,
                room_id=room_id,
                team_id=principal.team_id,
                user_id=principal.user_id,
                user_name=principal.user_name,
                request_id=request_id,
                text=text,
                abandoned=is_abandoned,
            )
        )
        try:
            with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                return await asyncio.shield(task)
        except TimeoutError:
            abandoned = True
            task.add_done_callback(_consume)
            log.warning("comments: store slower than %.1fs; answered unavailable", self.settings.store_timeout)
            raise CommentsUnavailable("the comment store did not answer in time") from None
        except Exception as exc:  # any failure to store durably is "unavailable"
            log.warning("comments: store failed: %r", exc)
            raise CommentsUnavailable("the comment store is unavailable") from None
        except BaseException:
            # The caller was cancelled (gateway timeout, disconnect): the
            # write rolls back unless it is already committing.
            abandoned = True
            task.add_done_callback(_consume)
            raise

    async def _publish(self, comment: comment_store.Comment) -> str:
        job_id = comment.jobId
        raw = await self._append_once(
            keys=[streams.events_key(job_id), streams.snapshot_key(job_id), published_key(job_id)],
            args=[
                str(comment.commentId),
                _enc.encode(comment.stored_chat()),
                self.settings.events_maxlen,
                self.settings.events_ttl,
            ],
        )
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def _remember(self, comment_id: int, event_id: str, deadline: float) -> None:
        """Store the event id on the row; the broadcast is out, so a slow store only delays this."""
        task = asyncio.ensure_future(comment_store.set_event_id(self.engine, comment_id, event_id))
        task.add_done_callback(_consume)
        with anyio.move_on_after(max(0.05, deadline - anyio.current_time())):
            try:
                await asyncio.shield(task)
            except Exception as exc:
                # The Redis map keeps the id: a retry still gets the same ack.
                log.warning("comments: could not record event id %s: %r", event_id, exc)
