"""Where a job's history is read from: Redis while it holds it, else the store.

Redis keeps a job's stream for live delivery; the SQL archive
(``store/history.py``) keeps every event for ``PS_HISTORY_DAYS``. A reader
first learns what Redis holds (:func:`streams.coverage`, one MULTI, or the
gateway's shared join MULTI). When Redis holds the whole stream nothing else
is read, so the hot path costs no store query. When it does not (restarted
empty, expired, evicted, trimmed), entries older than what Redis holds come
from the store, newer ones from Redis, in one order: each page is read after
the previous page's last id, so nothing is sent twice or skipped.

``gap`` is true only when events are really gone: retention removed the
job's archive, or Redis trimmed entries that the archive never got (a job
from before the archive existed). Redis trims only what the archive holds
(``streams.trim_archived``), so :func:`read_page` never meets a silent hole.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio
import msgspec

from progress_service import streams
from progress_service.ids import now_ms
from progress_service.store import history as store
from progress_service.streams import Coverage, id_lt

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from sqlalchemy.ext.asyncio import AsyncEngine

    from progress_service.events import JobSnapshot, StoredEvent
    from progress_service.settings import Settings

log = logging.getLogger("progress_service.history")

#: How often retention runs (seconds); the first pass runs at start-up.
RETENTION_EVERY = 3600.0

Entry = store.Entry


class Position(msgspec.Struct, frozen=True):
    """Where a replay after ``since`` stands: the log's head, the gap, and what Redis holds."""

    head: str | None
    gap: bool
    #: The oldest entry still kept (for the ``gap`` message), when known.
    oldest: str | None


async def position(engine: AsyncEngine, job_id: str, since: str | None, cov: Coverage) -> Position:
    """Head and gap for a replay after ``since``; reads the store only when Redis lacks entries."""
    if cov.holds_from is None:
        return Position(head=cov.head, gap=False, oldest=None)
    archived = await store.head(engine, job_id)
    head = cov.head
    if archived is not None and (head is None or id_lt(head, archived)):
        head = archived
    gap = False
    first = await store.read_entries(engine, job_id, None, limit=1)
    oldest = first[0][0].decode() if first else (cov.holds_from or None)
    pruned = await store.pruned_upto(engine, job_id)
    if pruned is not None and (since is None or pruned == "" or id_lt(since, pruned)):
        gap = True  # retention removed the archive
    elif cov.trimmed and cov.holds_from and (since is None or id_lt(since, cov.holds_from)):
        # Redis trimmed entries; the archive has them unless it never got any.
        gap = not first or not id_lt(first[0][0].decode(), cov.holds_from)
    return Position(head=head, gap=gap, oldest=oldest if gap else None)


async def read_page(redis: Redis, engine: AsyncEngine, job_id: str, after: str | None, *, count: int) -> list[Entry]:
    """The next entries after ``after`` (exclusive), oldest first, at most ``count``; never a silent hole.

    Redis is read first, with what it holds at that instant
    (``streams.replay_covered``, one MULTI). Its answer follows ``after``
    directly when Redis holds the whole stream or an entry at or before
    ``after``. Otherwise the entries between ``after`` and Redis's oldest were
    trimmed before that read, and Redis trims only what the archive holds
    (``streams.trim_archived``), so the store, read next, has them: they come
    first, then Redis's answer (a full page either way). This also holds when
    Redis trimmed further while a replay was under way. When Redis holds the
    whole stream, or ``after`` is within what it holds (the hot path), a page
    costs no store query.
    """
    entries, cov, read_at = await streams.replay_covered(redis, job_id, after, count=count)
    if cov.holds_from is None:
        return entries  # Redis holds the whole stream: nothing is anywhere else
    oldest = cov.holds_from or None  # None: Redis holds nothing of it
    if after is not None and oldest is not None and not id_lt(after, oldest):
        return entries  # Redis holds `after` or older: its answer is contiguous
    # The store answers for what Redis had lost or trimmed at that read, and
    # only for that: with Redis holding nothing, an entry appended since may
    # be in the store already (a comment is stored at once) while one before
    # it is not yet (a worker archives its events in batches). Both are at or
    # above the read's clock, so they wait for the next page, read from Redis.
    before = oldest if oldest is not None else f"{read_at}-0"
    rows = await store.read_entries(engine, job_id, after, before=before, limit=count)
    # Fewer rows than asked: the store gave all of (after, before), Redis goes on from oldest.
    return (rows + entries)[:count]


async def append_archived(redis: Redis, engine: AsyncEngine, job_id: str, event: StoredEvent, *, snapshot: JobSnapshot | None = None) -> str:
    """Append one event outside a worker's publisher (submit, cancel of a queued job) and archive it.

    No trim here: a publisher of the job may hold entries the archive lacks yet.
    """
    entry_id = await streams.append_event(redis, job_id, event, snapshot=snapshot)
    body = streams.encode_event(event)
    await store.archive(engine, job_id, [store.ArchivedEvent(entry_id, event.kind, event.attempt, body)])
    return entry_id


async def prune_once(engine: AsyncEngine, settings: Settings) -> int:
    """Remove the archived events of jobs that finished over ``PS_HISTORY_DAYS`` ago; jobs pruned."""
    if settings.history_days <= 0:
        return 0
    return await store.prune(engine, now_ms() - settings.history_days * 86_400_000)


async def run_retention(engine: AsyncEngine, settings: Settings, *, every: float = RETENTION_EVERY) -> None:
    """Prune the archive now and every ``every`` seconds, until cancelled (the app's lifetime).

    A failed pass (store down) is logged and tried again at the next one.
    """
    if settings.history_days <= 0:
        return  # kept forever
    while True:
        try:
            pruned = await prune_once(engine, settings)
            if pruned:
                log.info("history: removed the archived events of %d job(s) older than %d days", pruned, settings.history_days)
        except Exception as exc:  # noqa: BLE001 - retention must not end the app
            log.warning("history: retention pass failed (%r); next try in %.0fs", exc, every)
        await anyio.sleep(every)
