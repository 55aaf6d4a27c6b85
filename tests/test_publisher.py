"""The publisher against real Redis servers and a real store: outages, lost replies, lost streams.

The shared Redis is only used for this test's own keys; outages use a
private redis-server (``PrivateRedis``).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import anyio
import msgspec
from redis.asyncio import Redis

from history_helpers import PrivateRedis
from progress_service import streams
from progress_service.events import JobSnapshot
from progress_service.ids import room_id
from progress_service.keys import events_key, snapshot_key
from progress_service.settings import load_settings
from progress_service.store import history as archive
from worker.mapping import Mapper
from worker.publisher import Publisher


def _publisher(redis: Any, engine: Any, job_id: str, **overrides: Any) -> Publisher:
    settings = load_settings(env={}, **overrides)
    mapper = Mapper(JobSnapshot(id=job_id, roomId=room_id(job_id)))
    return Publisher(redis, job_id, 1, settings, mapper, engine=engine)


async def _stream_ids(redis: Any, job_id: str) -> list[str]:
    return [eid.decode() for eid, _ in await redis.xrange(events_key(job_id))]


async def _archived(engine: Any, job_id: str) -> list[str]:
    return [eid.decode() for eid, _ in await archive.read_entries(engine, job_id, None, limit=100_000)]


async def _lines(pub: Publisher, start: int, n: int) -> None:
    for i in range(start, start + n):
        await pub(pub.mapper.log, "stderr", f"line {i}")


async def test_events_published_during_an_outage_arrive_once_in_order(tmp_path: Path, store: Any) -> None:
    engine = store.engine
    job_id = uuid.uuid4().hex[:12]
    with PrivateRedis(tmp_path / "redis") as rd:
        redis = Redis.from_url(rd.url, socket_timeout=2)
        try:
            pub = _publisher(redis, engine, job_id)
            async with anyio.create_task_group() as tg:
                await tg.start(pub.run)
                await _lines(pub, 0, 20)
                rd.kill()
                with anyio.fail_after(10):  # publish returns at once: events are kept, the job goes on
                    await _lines(pub, 20, 30)
                assert pub.waiting >= 29
                rd.start()
                await _lines(pub, 50, 10)
                await pub.close()
            got = await _stream_ids(redis, job_id)
            bodies = [f[b"b"] for _, f in await redis.xrange(events_key(job_id))]
        finally:
            await redis.aclose()
    assert len(got) == 60 and got == sorted(got, key=streams.id_tuple)
    assert [b'"line %d"' % i in body for i, body in enumerate(bodies)] == [True] * 60
    assert await _archived(engine, job_id) == got


async def test_a_retried_batch_after_a_lost_reply_is_appended_once(redis: Any, store: Any) -> None:
    """What the publisher sends again when an append's reply was lost: the same seqs, plus new ones."""
    job_id = uuid.uuid4().hex[:12]
    keys = [events_key(job_id), snapshot_key(job_id)]
    script = redis.register_script(streams.APPEND_EVENTS)
    bodies = [b'{"kind":"log","at":1,"data":{"n":%d}}' % i for i in range(7)]

    def args(first: int, batch: list[bytes], *, before: bool) -> list[Any]:
        out: list[Any] = [10_000, "tok", first, "", "", "1" if before else ""]
        for body in batch:
            out += (body, "")
        return out

    first_ids = await script(keys=keys, args=args(1, bodies[:5], before=False))  # its reply "lost"
    again = await script(keys=keys, args=args(1, bodies, before=False))
    assert again[:5] == first_ids
    assert len(await _stream_ids(redis, job_id)) == 7
    # ...and once more (that reply lost too): still nothing twice.
    assert await script(keys=keys, args=args(1, bodies, before=False)) == again
    assert len(await _stream_ids(redis, job_id)) == 7
    await redis.delete(*keys)


async def test_a_redis_that_lost_the_stream_gets_it_back_and_ids_never_go_backwards(redis: Any, store: Any) -> None:
    engine = store.engine
    job_id = uuid.uuid4().hex[:12]
    pub = _publisher(redis, engine, job_id)
    async with anyio.create_task_group() as tg:
        await tg.start(pub.run)
        await _lines(pub, 0, 10)
        before = await _stream_ids(redis, job_id)
        # The keys vanish (FLUSHALL, eviction, a restart without them).
        await redis.delete(events_key(job_id), snapshot_key(job_id))
        await _lines(pub, 10, 5)
        await pub.close()
    after = await _stream_ids(redis, job_id)
    assert after[:10] == before  # put back with their own ids
    assert len(after) == 15 and after == sorted(after, key=streams.id_tuple)
    assert await _archived(engine, job_id) == after
    await redis.delete(events_key(job_id), snapshot_key(job_id))


async def test_archive_store_on_sqlite_and_postgres(engine: Any) -> None:
    """Idempotent inserts, the room's order with comments merged in, retention with its record."""
    from progress_service.events import JobSpec
    from progress_service.ids import now_ms
    from progress_service.store import comments as comment_store
    from progress_service.store.identity import ensure_team, ensure_user
    from progress_service.store.jobs import create_job, update_job

    job_id = uuid.uuid4().hex[:12]
    team, user = await ensure_team(engine, "t1"), await ensure_user(engine, "u1")
    await create_job(engine, job_id=job_id, team_id=team, user_id=user, spec=JobSpec(prompt="p"), created_at=now_ms(), demo=True)
    events = [archive.ArchivedEvent(f"1000-{i}", "log", 1, b'{"kind":"log","at":1,"data":{}}') for i in (0, 1, 3)]
    await archive.archive(engine, job_id, events)
    await archive.archive(engine, job_id, events[1:])  # a batch written again stores nothing twice
    item = comment_store.NewComment(
        job_id=job_id, room_id=room_id(job_id), team_id=team, user_id=user, user_name="u1",
        request_id="r1", text="hi", created_at=5,
    )
    ((comment, _),) = await comment_store.store_batch(engine, [item])
    await comment_store.store_batch(engine, [], event_ids=[(comment.commentId, "1000-2")])
    entries = await archive.read_entries(engine, job_id, None)
    assert [(e.decode(), f[b"t"]) for e, f in entries] == [
        ("1000-0", b"event"), ("1000-1", b"event"), ("1000-2", b"chat"), ("1000-3", b"event"),
    ]
    assert b'"text":"hi"' in entries[2][1][b"b"]
    assert [e for e, _ in await archive.read_entries(engine, job_id, "1000-1", before="1000-3")] == [b"1000-2"]
    assert await archive.head(engine, job_id) == "1000-3"
    assert await archive.pruned_upto(engine, job_id) is None
    await update_job(engine, job_id, finished_at=100)
    assert await archive.prune(engine, finished_before=101) == 1
    assert await archive.pruned_upto(engine, job_id) == "1000-3"
    assert [e for e, _ in await archive.read_entries(engine, job_id, None)] == [b"1000-2"]  # comments stay


async def test_redis_keeps_what_the_archive_lacks_and_trims_what_it_holds(redis: Any, store: Any) -> None:
    """Trimming follows the archive: PS_EVENTS_MAXLEN archived entries stay, nothing unarchived goes.

    Events an earlier attempt left only in Redis (its publisher gave up on a
    store outage) are archived before the first trim, not dropped.
    """
    from progress_service.events import StoredEvent  # noqa: PLC0415

    engine = store.engine
    job_id = uuid.uuid4().hex[:12]
    left = [
        await streams.append_event(redis, job_id, StoredEvent(kind="log", at=1, data={"n": i}, attempt=1))
        for i in range(3)
    ]
    pub = _publisher(redis, engine, job_id, events_maxlen=4, events_keep_seconds=0)
    pub.attempt = 2
    async with anyio.create_task_group() as tg:
        await tg.start(pub.run)
        await _lines(pub, 0, 20)
        await pub.close()
    archived = await _archived(engine, job_id)
    assert archived[:3] == left and len(archived) == 23
    assert await _stream_ids(redis, job_id) == archived[-4:]
    # Nothing archived, nothing trimmed: the script alone never drops an entry above the id it is given.
    assert await streams.trim_archived(redis, job_id, archived[-4], keep=1) == 0
    # Young entries stay whatever the count (a lagging live reader still finds them).
    assert await streams.trim_archived(redis, job_id, archived[-1], keep=1, keep_ms=60_000) == 0
    assert await streams.trim_archived(redis, job_id, archived[-1], keep=1) == 3
    assert await _stream_ids(redis, job_id) == archived[-1:]
    await redis.delete(events_key(job_id), snapshot_key(job_id))


async def test_trim_removes_exactly_what_the_rule_says_wherever_the_archive_is(redis: Any) -> None:
    """The trim script against the rule it states, for streams with and without an unarchived tail.

    The script reads only what it removes and the tail above the archived id
    (not the ``keep`` entries it keeps), so each count is checked against the
    rule computed here from the whole stream.
    """
    import random  # noqa: PLC0415

    rng = random.Random(12)
    job_id = uuid.uuid4().hex[:12]
    key = events_key(job_id)
    for _ in range(40):
        await redis.delete(key)
        n = rng.randint(1, 60)
        ids = [await redis.xadd(key, {"t": b"event", "b": b"{}"}, id=f"{1000 + i}-0") for i in range(n)]
        ids = [i.decode() for i in ids]
        archived = rng.randrange(n)
        keep = rng.randint(1, 70)
        at_or_below = ids[: archived + 1]
        expected = at_or_below[: max(0, len(at_or_below) - keep)]
        removed = await streams.trim_archived(redis, job_id, ids[archived], keep=keep)
        assert removed == len(expected), (n, archived, keep)
        assert await _stream_ids(redis, job_id) == ids[len(expected):]
    await redis.delete(key)


async def test_a_page_whose_start_was_trimmed_reads_the_archive_then_redis(redis: Any, store: Any) -> None:
    """``history.read_page`` after a position Redis trimmed meanwhile: archive first, then Redis, a full page."""
    from progress_service import history  # noqa: PLC0415
    from progress_service.events import StoredEvent  # noqa: PLC0415

    engine = store.engine
    job_id = uuid.uuid4().hex[:12]
    got = []
    for i in range(12):
        event = StoredEvent(kind="log", at=1, data={"n": i})
        got.append(await history.append_archived(redis, engine, job_id, event))
    # What a replay that read up to got[1] finds after Redis trimmed to the last 4.
    assert await streams.trim_archived(redis, job_id, got[-1], keep=4) == 8
    page = await history.read_page(redis, engine, job_id, got[1], count=8)
    assert [e.decode() for e, _ in page] == got[2:10]
    page = await history.read_page(redis, engine, job_id, got[9], count=8)
    assert [e.decode() for e, _ in page] == got[10:]
    await redis.delete(events_key(job_id), snapshot_key(job_id))


async def test_with_redis_holding_nothing_the_archive_answers_only_for_entries_older_than_the_read(
    redis: Any, store: Any
) -> None:
    """The two-node miss of issue 9: a replay read Redis while it held none of the stream; meanwhile an
    event went to Redis (its worker archives later) and a comment after it to Redis and the store (at once).
    The store's answer must not jump to the comment over the event: the page stops at the read's clock,
    and the next page, from Redis, has both in order."""
    from progress_service import history  # noqa: PLC0415
    from progress_service.events import StoredChat, StoredEvent  # noqa: PLC0415

    engine = store.engine
    job_id = uuid.uuid4().hex[:12]
    (secs, micros) = await redis.time()
    soon = int(secs) * 1000 + int(micros) // 1000 + 60_000  # appended "after" the read below
    event_id, chat_id = f"{soon}-0", f"{soon + 5}-0"
    chat = StoredChat(requestId="c1", userId="u", userName="U", text="hi", sentAt=soon + 5)
    chat_body = msgspec.json.encode(chat)
    # The comment is stored already; Redis holds nothing yet (the event is not archived at all).
    await archive.archive(engine, job_id, [archive.ArchivedEvent(chat_id, "chat", 1, chat_body)])
    assert await history.read_page(redis, engine, job_id, None, count=10) == []
    # Both reach Redis, in order: the next page has the event, then the comment.
    key = events_key(job_id)
    await redis.xadd(key, {"t": b"event", "b": streams.encode_event(StoredEvent(kind="log", at=soon, data={})), "p": b""}, id=event_id)
    await redis.xadd(key, {"t": b"chat", "b": chat_body, "p": event_id.encode()}, id=chat_id)
    page = await history.read_page(redis, engine, job_id, None, count=10)
    assert [e.decode() for e, _ in page] == [event_id, chat_id]
    await redis.delete(key, snapshot_key(job_id))
