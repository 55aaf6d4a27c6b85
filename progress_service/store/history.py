"""The event archive: every job event in the SQL store, the job's system of record.

Redis holds a job's stream while it is live (and ``PS_EVENTS_TTL`` after);
this table holds every event for ``PS_HISTORY_DAYS``, whatever happens to
Redis. A row is one stream entry of kind ``event``: its stream id (as two
integers, so that it sorts like the stream), kind, attempt and the entry body
exactly as it is in Redis (``StoredEvent`` JSON), so a replay from here sends
the same bytes as one from Redis. Inserts are idempotent on ``(job, id)``: a
batch written twice (a retry after a lost commit) stores each event once.

Comments are not copied here: the ``comments`` table is their record, and a
comment's ``event_id`` is its place in the same stream, so :func:`read_entries`
merges both into the room's order exactly as watchers saw it.

``job_history_pruned`` remembers which jobs lost their events to retention,
so a reader is told ``gap`` (events really gone) instead of an empty log.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from progress_service.events import StoredChat
from progress_service.ids import now_ms
from progress_service.store.audit import comment_check
from progress_service.store.audit import keys as audit_keys
from progress_service.store.schema import comments, jobs, metadata

#: Archived job events (see the module docstring).
job_events = sa.Table(
    "job_events",
    metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("ms", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("kind", sa.String(40), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
)

#: Jobs whose archived events were removed by retention (``PS_HISTORY_DAYS``).
job_history_pruned = sa.Table(
    "job_history_pruned",
    metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    #: The newest id removed: events up to it are gone.
    sa.Column("last_id", sa.String(41), nullable=True),
    sa.Column("pruned_at", sa.BigInteger, nullable=False),
)

#: One stream entry: ``(id, {b"t": kind, b"b": body})``, the shape ``XRANGE`` returns.
Entry = tuple[bytes, dict[bytes, bytes]]

_enc = msgspec.json.Encoder()


class ArchivedEvent(msgspec.Struct, frozen=True):
    """One event to archive: its stream id and its entry body (``StoredEvent`` JSON)."""

    id: str
    kind: str
    attempt: int
    body: bytes


def _split(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _insert(engine: AsyncEngine) -> sa.Insert:
    """``INSERT … ON CONFLICT DO NOTHING`` for the engine's dialect."""
    if engine.dialect.name == "postgresql":
        return postgresql.insert(job_events).on_conflict_do_nothing()
    return sqlite.insert(job_events).on_conflict_do_nothing()


async def archive(engine: AsyncEngine, job_id: str, events: Sequence[ArchivedEvent]) -> None:
    """Store ``events`` (one transaction); those already archived are left as they are."""
    if not events:
        return
    rows = []
    for ev in events:
        ms, seq = _split(ev.id)
        rows.append({"job_id": job_id, "ms": ms, "seq": seq, "kind": ev.kind, "attempt": ev.attempt, "body": ev.body})
    async with engine.begin() as conn:
        await conn.execute(_insert(engine), rows)


async def read_entries(
    engine: AsyncEngine, job_id: str, after: str | None, *, before: str | None = None, limit: int = 1000
) -> list[Entry]:
    """Archived events and stored comments with ``after < id < before``, in stream order, at most ``limit``."""
    lo = _split(after) if after else (-1, -1)
    hi = _split(before) if before else None
    key = sa.tuple_(job_events.c.ms, job_events.c.seq)
    query = sa.select(job_events.c.ms, job_events.c.seq, job_events.c.body).where(
        job_events.c.job_id == job_id, key > sa.tuple_(sa.literal(lo[0]), sa.literal(lo[1]))
    )
    if hi is not None:
        query = query.where(key < sa.tuple_(sa.literal(hi[0]), sa.literal(hi[1])))
    query = query.order_by(job_events.c.ms, job_events.c.seq).limit(limit)
    chat_query = sa.select(
        comments.c.id, comments.c.room_id, comments.c.event_id, comments.c.request_id, comments.c.user_id,
        comments.c.user_name, comments.c.text, comments.c.created_at,
    ).where(comments.c.job_id == job_id, comments.c.event_id.is_not(None))
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
        chats = (await conn.execute(chat_query)).all()
        # A comment edited in the store is replayed with its audited text, marked (docs/audit.md).
        tampered = await comment_check.tampered(conn, chats[0].room_id, chats, audit_keys.for_engine(engine)) if chats else {}
    merged: list[tuple[tuple[int, int], Entry]] = [
        ((r.ms, r.seq), (f"{r.ms}-{r.seq}".encode(), {b"t": b"event", b"b": bytes(r.body)})) for r in rows
    ]
    for c in chats:
        at = _split(c.event_id)
        if at <= lo or (hi is not None and at >= hi):
            continue
        # The same body the comments writer appended (Comment.stored_chat).
        original = tampered.get(c.id)
        body = _enc.encode(
            StoredChat(
                requestId=c.request_id, userId=c.user_id, userName=c.user_name,
                text=c.text if original is None else original, sentAt=c.created_at, tampered=original is not None,
            )
        )
        merged.append((at, (c.event_id.encode(), {b"t": b"chat", b"b": body})))
    merged.sort(key=lambda pair: pair[0])
    return [entry for _, entry in merged[:limit]]


def _newest_event(job_id: str) -> sa.Select[tuple[int, int]]:
    """The ``(ms, seq)`` of the job's newest archived event."""
    return (
        sa.select(job_events.c.ms, job_events.c.seq)
        .where(job_events.c.job_id == job_id)
        .order_by(job_events.c.ms.desc(), job_events.c.seq.desc())
        .limit(1)
    )


async def head(engine: AsyncEngine, job_id: str) -> str | None:
    """The newest archived id of the job (events and comments), None when there is none."""
    async with engine.connect() as conn:
        row = (await conn.execute(_newest_event(job_id))).first()
        chat_ids = (
            await conn.scalars(
                sa.select(comments.c.event_id).where(comments.c.job_id == job_id, comments.c.event_id.is_not(None))
            )
        ).all()
    best = (row.ms, row.seq) if row is not None else None
    for cid in chat_ids:
        at = _split(cid)
        if best is None or at > best:
            best = at
    return None if best is None else f"{best[0]}-{best[1]}"


async def pruned_upto(engine: AsyncEngine, job_id: str) -> str | None:
    """The newest event id retention removed from this job ("" when unknown), None when nothing was."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(sa.select(job_history_pruned.c.last_id).where(job_history_pruned.c.job_id == job_id))
        ).first()
    if row is None:
        return None
    return row.last_id or ""


async def prune(engine: AsyncEngine, finished_before: int, *, batch: int = 100) -> int:
    """Remove the archived events of jobs that finished before ``finished_before`` (ms).

    Whole jobs at a time, ``batch`` jobs per transaction; each is recorded in
    ``job_history_pruned``. Returns the number of jobs pruned.
    """
    total = 0
    while True:
        async with engine.begin() as conn:
            ended = (
                sa.select(jobs.c.id)
                .where(jobs.c.finished_at.is_not(None), jobs.c.finished_at < finished_before)
                .where(sa.exists().where(job_events.c.job_id == jobs.c.id))
                .limit(batch)
            )
            ids = list((await conn.scalars(ended)).all())
            if not ids:
                return total
            for job_id in ids:
                row = (await conn.execute(_newest_event(job_id))).first()
                last_id = f"{row.ms}-{row.seq}" if row is not None else None
                await conn.execute(sa.delete(job_events).where(job_events.c.job_id == job_id))
                await conn.execute(sa.delete(job_history_pruned).where(job_history_pruned.c.job_id == job_id))
                await conn.execute(
                    sa.insert(job_history_pruned).values(job_id=job_id, last_id=last_id, pruned_at=now_ms())
                )
            total += len(ids)
