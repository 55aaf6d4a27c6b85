"""Comments: stored with their audit record in one transaction, once per request id.

A comment row and its ``comment.create`` audit record are written in the same
transaction, so there is never one without the other. ``(room, user,
requestId)`` is unique: a retry (or the same request sent at once on two
connections of one user) finds the row that is already there and gets it
back instead of storing a second comment.

The race between two connections is settled by the database, the same way
on both backends: the insert is ``INSERT … ON CONFLICT DO NOTHING``. On
PostgreSQL the second insert waits for the first transaction on the unique
index, then inserts nothing once it commits (and the second one reads the
committed row); on SQLite the second writer waits for the single write lock,
then finds the row. Should the driver still report a unique violation, the
row is read back after the rollback.

``event_id`` is the comment's stream entry id, set after the XADD; it stays
NULL while the comment is stored but not yet appended to the job's stream.

Comments are written in groups (``store_batch``): the comments that arrived
while the previous transaction ran share one transaction, one write-lock
acquisition (SQLite) or one commit (PostgreSQL), and one lock of each team's
audit chain; each gets its own audit record, in comment-id order. The event
ids of the previous group ride along in the same transaction. Comments are
inserted in key order, so two nodes' overlapping groups take PostgreSQL's
unique-index locks in the same order and cannot deadlock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from progress_service.errors import Abandoned
from progress_service.events import StoredChat
from progress_service.ids import now_ms
from progress_service.store import audit
from progress_service.store.audit import comment_check
from progress_service.store.audit import keys as audit_keys
from progress_service.store.db import dialect_insert
from progress_service.store.schema import comments

COMMENT_ACTION = "comment.create"


class Comment(msgspec.Struct, kw_only=True):
    """A stored comment (the HTTP API's shape; ``id`` is its event id)."""

    roomId: str
    #: The stream entry id (the protocol's event id); None until appended.
    id: str | None
    requestId: str
    userId: str
    userName: str
    text: str
    sentAt: int
    #: The row's id: position in the room's comment order.
    commentId: int
    jobId: str
    teamId: str
    #: True when the stored comment does not match its audit record (edited
    #: in the store): ``text`` is then the audited original, or "" when
    #: there is no valid record (see docs/audit.md).
    tampered: bool = False

    def stored_chat(self) -> StoredChat:
        """The body of the comment's stream entry (the same on every retry)."""
        return StoredChat(
            requestId=self.requestId, userId=self.userId, userName=self.userName, text=self.text, sentAt=self.sentAt
        )


def _comment(row: Any, original: str | None = None) -> Comment:
    """A row as a Comment; ``original``: the audited text of a tampered row."""
    return Comment(
        roomId=row.room_id,
        id=row.event_id,
        requestId=row.request_id,
        userId=row.user_id,
        userName=row.user_name,
        text=row.text if original is None else original,
        tampered=original is not None,
        sentAt=row.created_at,
        commentId=row.id,
        jobId=row.job_id,
        teamId=row.team_id,
    )


def _key(room_id: str, user_id: str, request_id: str) -> Any:
    return sa.and_(comments.c.room_id == room_id, comments.c.user_id == user_id, comments.c.request_id == request_id)


# Statements are built once and executed with bound parameters (see
# store/audit.py for why).

#: Per dialect: the idempotent multi-row insert.
_INSERT: dict[str, Any] = {}
_SELECT_KEY = sa.select(comments).where(
    comments.c.room_id == sa.bindparam("b_room"),
    comments.c.user_id == sa.bindparam("b_user"),
    comments.c.request_id == sa.bindparam("b_request"),
)
_SET_EVENT_ID = (
    sa.update(comments)
    .where(comments.c.id == sa.bindparam("b_id"), comments.c.event_id.is_(None))
    .values(event_id=sa.bindparam("b_event_id"))
)


def _insert_statement(conn: AsyncConnection) -> Any:
    stmt = _INSERT.get(conn.dialect.name)
    if stmt is None:
        stmt = _INSERT[conn.dialect.name] = (
            dialect_insert(conn, comments)
            .on_conflict_do_nothing(index_elements=["room_id", "user_id", "request_id"])
            .returning(comments.c.id, comments.c.room_id, comments.c.user_id, comments.c.request_id)
        )
    return stmt


class NewComment(msgspec.Struct, kw_only=True):
    """A comment to store (validated and normalized by the caller)."""

    job_id: str
    room_id: str
    team_id: str
    user_id: str
    user_name: str
    request_id: str
    text: str
    created_at: int

    @property
    def key(self) -> tuple[str, str, str]:
        """The idempotency key: ``(room, user, requestId)``."""
        return (self.room_id, self.user_id, self.request_id)


async def get_comment(engine: AsyncEngine, room_id: str, user_id: str, request_id: str) -> Comment | None:
    """The comment stored under ``(room, user, requestId)``, if any."""
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(comments).where(_key(room_id, user_id, request_id)))).first()
    return _comment(row) if row else None


def _audit_entry(item: NewComment, comment_id: int) -> audit.Entry:
    return audit.Entry(
        action=COMMENT_ACTION,
        team_id=item.team_id,
        actor=item.user_name,
        room_id=item.room_id,
        created_at=item.created_at,
        detail={
            "commentId": comment_id,
            "jobId": item.job_id,
            "userId": item.user_id,
            "requestId": item.request_id,
            "text": item.text,
            "textSha256": hashlib.sha256(item.text.encode()).hexdigest(),
        },
    )


async def _write_batch(
    conn: AsyncConnection, items: Sequence[NewComment], event_ids: Sequence[tuple[int, str]]
) -> list[tuple[Comment, bool]]:
    """The statements of :func:`store_batch`, inside the caller's transaction."""
    # Each key once, in key order: the same request twice in one batch is one
    # comment, and two nodes inserting overlapping batches take the unique
    # index's row locks (PostgreSQL) in the same order, so they cannot deadlock.
    unique = sorted({item.key: item for item in reversed(items)}.values(), key=lambda item: item.key)
    by_key: dict[tuple[str, str, str], tuple[Comment, bool]] = {}
    if unique:
        # The insert comes first: on SQLite it takes the write lock before
        # anything is read, so the rest of the transaction reads fresh data.
        rows = [
            {
                "job_id": it.job_id,
                "room_id": it.room_id,
                "team_id": it.team_id,
                "user_id": it.user_id,
                "user_name": it.user_name,
                "request_id": it.request_id,
                "text": it.text,
                "event_id": None,
                "created_at": it.created_at,
            }
            for it in unique
        ]
        stmt = _insert_statement(conn)
        if len(rows) == 1:
            returned = (await conn.execute(stmt, rows[0])).all()
        else:
            returned = (await conn.execute(stmt, rows)).all()
        new_ids = {(r.room_id, r.user_id, r.request_id): int(r.id) for r in returned}
        created: list[tuple[int, NewComment]] = []
        for it in unique:
            new_id = new_ids.get(it.key)
            if new_id is None:  # stored before: the earlier comment wins, nothing is written
                row = (
                    await conn.execute(_SELECT_KEY, {"b_room": it.room_id, "b_user": it.user_id, "b_request": it.request_id})
                ).one()
                by_key[it.key] = (_comment(row), False)
            else:
                created.append((new_id, it))
        created.sort(key=lambda pair: pair[0])  # chain order = comment order
        if created:
            await audit.append(conn, [_audit_entry(it, new_id) for new_id, it in created])
        for new_id, it in created:
            by_key[it.key] = (
                Comment(
                    roomId=it.room_id,
                    id=None,
                    requestId=it.request_id,
                    userId=it.user_id,
                    userName=it.user_name,
                    text=it.text,
                    sentAt=it.created_at,
                    commentId=new_id,
                    jobId=it.job_id,
                    teamId=it.team_id,
                ),
                True,
            )
    if event_ids:
        params = [{"b_id": cid, "b_event_id": eid} for cid, eid in event_ids]
        await conn.execute(_SET_EVENT_ID, params if len(params) > 1 else params[0])
    # A key sent twice in the batch: the first copy stores it, the others find it.
    out: list[tuple[Comment, bool]] = []
    seen: set[tuple[str, str, str]] = set()
    for it in items:
        comment, was_created = by_key[it.key]
        out.append((comment, was_created and it.key not in seen))
        seen.add(it.key)
    return out


async def store_batch(
    engine: AsyncEngine,
    items: Sequence[NewComment],
    *,
    event_ids: Sequence[tuple[int, str]] = (),
    abandoned: Callable[[], bool] | None = None,
) -> list[tuple[Comment, bool]]:
    """Store comments and their audit records in ONE transaction (group commit).

    Returns ``(comment, created)`` per item, in the order of ``items``.
    ``created`` is False for a ``(room, user, requestId)`` stored before (or
    earlier in the same batch): that comment is returned unchanged. The new
    comments get consecutive audit records of their team's chain, in
    comment-id order. ``event_ids`` (``(comment id, stream entry id)``) are
    recorded in the same transaction, first writer wins.

    ``abandoned()`` is asked just before the commit: when it answers True the
    transaction is rolled back and :class:`Abandoned` raised (nothing of the
    batch is written; the caller retries without the abandoned items).
    """
    try:
        async with engine.begin() as conn:
            out = await _write_batch(conn, items, event_ids)
            if abandoned is not None and abandoned():
                raise Abandoned
    except IntegrityError:
        # A unique violation the ON CONFLICT clause did not absorb (e.g. a
        # driver that reports it anyway): the other writer's row is committed.
        if len(items) != 1:
            # Settle the batch one comment (one transaction) at a time.
            if event_ids:
                await set_event_ids(engine, event_ids)
            return [(await store_batch(engine, [it], abandoned=abandoned))[0] for it in items]
        existing = await get_comment(engine, items[0].room_id, items[0].user_id, items[0].request_id)
        if existing is None:
            raise
        return [(existing, False)]
    return out


async def store_comment(
    engine: AsyncEngine,
    *,
    job_id: str,
    room_id: str,
    team_id: str,
    user_id: str,
    user_name: str,
    request_id: str,
    text: str,
    created_at: int | None = None,
    abandoned: Callable[[], bool] | None = None,
) -> tuple[Comment, bool]:
    """Store a comment and its audit record; ``(comment, created)``.

    ``created`` is False when ``(room, user, requestId)`` was stored before:
    the earlier comment is returned unchanged (its text wins) and nothing is
    written. ``abandoned()`` is asked just before the commit: when it answers
    True the transaction is rolled back and :class:`Abandoned` raised.
    """
    item = NewComment(
        job_id=job_id,
        room_id=room_id,
        team_id=team_id,
        user_id=user_id,
        user_name=user_name,
        request_id=request_id,
        text=text,
        created_at=created_at or now_ms(),
    )
    return (await store_batch(engine, [item], abandoned=abandoned))[0]


async def set_event_ids(engine: AsyncEngine, event_ids: Sequence[tuple[int, str]]) -> None:
    """Record the stream entry ids of comments (first writer wins)."""
    if not event_ids:
        return
    params = [{"b_id": cid, "b_event_id": eid} for cid, eid in event_ids]
    async with engine.begin() as conn:
        await conn.execute(_SET_EVENT_ID, params if len(params) > 1 else params[0])


async def list_comments(
    engine: AsyncEngine, room_id: str, *, after: int | None = None, limit: int = 50
) -> list[Comment]:
    """The room's comments, oldest first, after row id ``after`` (a cursor).

    Each is compared with its ``comment.create`` audit record: one that
    differs is returned with ``tampered`` set and the record's text.
    """
    query = sa.select(comments).where(comments.c.room_id == room_id)
    if after is not None:
        query = query.where(comments.c.id > after)
    async with engine.connect() as conn:
        rows = (await conn.execute(query.order_by(comments.c.id).limit(limit))).all()
        bad = await comment_check.tampered(conn, room_id, rows, audit_keys.for_engine(engine))
    return [_comment(r, bad.get(r.id)) for r in rows]
