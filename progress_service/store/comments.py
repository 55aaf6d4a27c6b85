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
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from progress_service.events import StoredChat, now_ms
from progress_service.store import audit
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

    def stored_chat(self) -> StoredChat:
        """The body of the comment's stream entry (the same on every retry)."""
        return StoredChat(
            requestId=self.requestId, userId=self.userId, userName=self.userName, text=self.text, sentAt=self.sentAt
        )


class Abandoned(Exception):
    """The caller gave up waiting; the transaction was rolled back."""


class _Row(msgspec.Struct, kw_only=True):
    """A row as just inserted (same attribute names as a result row)."""

    id: int
    job_id: str
    room_id: str
    team_id: str
    user_id: str
    user_name: str
    request_id: str
    text: str
    event_id: str | None
    created_at: int


def _comment(row: Any) -> Comment:
    return Comment(
        roomId=row.room_id,
        id=row.event_id,
        requestId=row.request_id,
        userId=row.user_id,
        userName=row.user_name,
        text=row.text,
        sentAt=row.created_at,
        commentId=row.id,
        jobId=row.job_id,
        teamId=row.team_id,
    )


def _dialect_insert(conn: AsyncConnection) -> Any:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert  # noqa: PLC0415
    else:
        from sqlalchemy.dialects.sqlite import insert  # noqa: PLC0415
    return insert(comments)


def _key(room_id: str, user_id: str, request_id: str) -> Any:
    return sa.and_(comments.c.room_id == room_id, comments.c.user_id == user_id, comments.c.request_id == request_id)


async def get_comment(engine: AsyncEngine, room_id: str, user_id: str, request_id: str) -> Comment | None:
    """The comment stored under ``(room, user, requestId)``, if any."""
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(comments).where(_key(room_id, user_id, request_id)))).first()
    return _comment(row) if row else None


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
    created_at = created_at or now_ms()
    values = {
        "job_id": job_id,
        "room_id": room_id,
        "team_id": team_id,
        "user_id": user_id,
        "user_name": user_name,
        "request_id": request_id,
        "text": text,
        "event_id": None,
        "created_at": created_at,
    }
    try:
        async with engine.begin() as conn:
            # The insert comes first: on SQLite it takes the write lock before
            # anything is read, so the rest of the transaction reads fresh data.
            insert = (
                _dialect_insert(conn)
                .values(**values)
                .on_conflict_do_nothing(index_elements=["room_id", "user_id", "request_id"])
                .returning(comments.c.id)
            )
            new_id = await conn.scalar(insert)
            if new_id is None:
                row = (await conn.execute(sa.select(comments).where(_key(room_id, user_id, request_id)))).one()
                return _comment(row), False
            await audit.append(
                conn,
                [
                    audit.Entry(
                        action=COMMENT_ACTION,
                        team_id=team_id,
                        actor=user_name,
                        room_id=room_id,
                        created_at=created_at,
                        detail={
                            "commentId": int(new_id),
                            "jobId": job_id,
                            "userId": user_id,
                            "requestId": request_id,
                            "text": text,
                            "textSha256": hashlib.sha256(text.encode()).hexdigest(),
                        },
                    )
                ],
            )
            if abandoned is not None and abandoned():
                raise Abandoned
    except IntegrityError:
        # A unique violation the ON CONFLICT clause did not absorb (e.g. a
        # driver that reports it anyway): the other writer's row is committed.
        existing = await get_comment(engine, room_id, user_id, request_id)
        if existing is None:
            raise
        return existing, False
    return _comment(_Row(id=int(new_id), **values)), True


async def set_event_id(engine: AsyncEngine, comment_id: int, event_id: str) -> None:
    """Record the stream entry id of a comment (first writer wins)."""
    async with engine.begin() as conn:
        await conn.execute(
            sa.update(comments).where(comments.c.id == comment_id, comments.c.event_id.is_(None)).values(event_id=event_id)
        )


async def list_comments(
    engine: AsyncEngine, room_id: str, *, after: int | None = None, limit: int = 50
) -> list[Comment]:
    """The room's comments, oldest first, after row id ``after`` (a cursor)."""
    query = sa.select(comments).where(comments.c.room_id == room_id)
    if after is not None:
        query = query.where(comments.c.id > after)
    async with engine.connect() as conn:
        rows = (await conn.execute(query.order_by(comments.c.id).limit(limit))).all()
    return [_comment(r) for r in rows]


async def count_comments(engine: AsyncEngine, room_id: str) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(sa.select(sa.func.count()).select_from(comments).where(comments.c.room_id == room_id)) or 0)
