"""Comments below the gateway: the store transaction, idempotency, publishing, failures.

Real SQLite and PostgreSQL (``engine``/``db_url``), real Redis. The
end-to-end behaviour over WebSockets on two nodes is in test_comments_e2e.py.
"""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa

from progress_service import streams
from progress_service.comments import Comments, normalize_text
from progress_service.errors import CommentForbidden, CommentsUnavailable, InvalidComment
from progress_service.events import JobSpec
from progress_service.ids import now_ms, room_id
from progress_service.keys import events_key, published_key
from progress_service.settings import load_settings
from progress_service.store import audit
from progress_service.store import comments as comment_store
from progress_service.store.db import create_engine
from progress_service.store.identity import Principal, ensure_team, ensure_user, set_membership
from progress_service.store.jobs import create_job
from progress_service.store.migrations import migrate
from progress_service.store.schema import audit_log, comments


async def make_job(engine: Any, team: str = "t1") -> tuple[str, str]:
    team_id = await ensure_team(engine, team)
    user_id = await ensure_user(engine, "submitter")
    job_id = uuid.uuid4().hex[:12]
    await create_job(engine, job_id=job_id, team_id=team_id, user_id=user_id, spec=JobSpec(prompt="p"), created_at=now_ms(), demo=True)
    return job_id, team_id


async def principal(engine: Any, team_id: str, role: str = "reviewer", name: str | None = None) -> Principal:
    name = name or f"{role}-{uuid.uuid4().hex[:6]}"
    uid = await ensure_user(engine, name)
    await set_membership(engine, uid, team_id, role)
    return Principal(user_id=uid, user_name=name, team_id=team_id, team_name="t1", role=role, token_id="tok")


async def stream_chats(redis: Any, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    entries = await redis.xrange(events_key(job_id))
    out = []
    for eid, fields in entries:
        if fields.get(b"t") == b"chat":
            out.append((eid.decode(), streams.entry_dict(room_id(job_id), eid, fields)))
    return out


async def count(engine: Any, table: sa.Table, *where: Any) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(sa.select(sa.func.count()).select_from(table).where(*where)))


def settings(**kw: Any) -> Any:
    return load_settings(env={}, **kw)


# --------------------------------------------------------------------------
# Text rules
# --------------------------------------------------------------------------


def test_normalize_text() -> None:
    assert normalize_text("  hello\n\tworld  ", 100) == "hello\n\tworld"
    for bad in ["", "   ", "a\x00b", "bell\x07", "c\rr", "del\x7f", "c1\x85x"]:
        with pytest.raises(InvalidComment):
            normalize_text(bad, 100)
    assert normalize_text("x" * 10, 10) == "x" * 10
    with pytest.raises(InvalidComment):
        normalize_text("x" * 11, 10)


# --------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------


async def test_store_comment_writes_comment_and_audit_record_once(engine: Any) -> None:
    job_id, team_id = await make_job(engine)
    kw = dict(job_id=job_id, room_id=f"job:{job_id}", team_id=team_id, user_id="u1", user_name="ana", request_id="r1", text="hi")
    first, created = await comment_store.store_comment(engine, **kw)
    again, created_again = await comment_store.store_comment(engine, **{**kw, "text": "different"})
    assert created and not created_again
    assert again.commentId == first.commentId and again.text == "hi"
    assert await count(engine, comments) == 1
    recs = await audit.list_records(engine, team_id=team_id)
    assert [r.action for r in recs] == ["comment.create"]
    assert recs[0].detail["commentId"] == first.commentId and recs[0].detail["text"] == "hi"
    assert recs[0].actor == "ana" and recs[0].roomId == f"job:{job_id}"
    assert (await audit.verify(engine)).ok


async def test_same_request_id_from_two_connections_at_once_stores_one(db_url: str) -> None:
    """The unique-violation race between two store connections (two nodes)."""
    engines = [create_engine(db_url) for _ in range(2)]
    try:
        await migrate(engines[0])
        job_id, team_id = await make_job(engines[0])
        results: list[tuple[Any, bool]] = []
        for _ in range(5):  # several rounds of the race
            results.clear()
            rid = uuid.uuid4().hex
            async with anyio.create_task_group() as tg:
                for i in range(6):
                    tg.start_soon(_attempt, engines[i % 2], rid, job_id, team_id, results)
            assert sorted(c for _, c in results) == [False] * 5 + [True]
            assert len({c.commentId for c, _ in results}) == 1
        assert await count(engines[0], comments) == 5
        assert await count(engines[0], audit_log) == 5
        assert (await audit.verify(engines[0])).ok
    finally:
        for eng in engines:
            await eng.dispose()


async def _attempt(eng: Any, rid: str, job_id: str, team_id: str, results: list) -> None:
    results.append(
        await comment_store.store_comment(
            eng, job_id=job_id, room_id=f"job:{job_id}", team_id=team_id, user_id="u1", user_name="ana", request_id=rid, text="once"
        )
    )


async def test_list_comments_is_paginated_oldest_first(engine: Any) -> None:
    job_id, team_id = await make_job(engine)
    for i in range(7):
        await comment_store.store_comment(
            engine, job_id=job_id, room_id=f"job:{job_id}", team_id=team_id, user_id="u", user_name="u", request_id=f"r{i}", text=f"c{i}"
        )
    page1 = await comment_store.list_comments(engine, f"job:{job_id}", limit=4)
    page2 = await comment_store.list_comments(engine, f"job:{job_id}", after=page1[-1].commentId, limit=4)
    assert [c.text for c in page1 + page2] == [f"c{i}" for i in range(7)]
    assert await comment_store.list_comments(engine, "job:other") == []


# --------------------------------------------------------------------------
# The hook: store, publish once, ack
# --------------------------------------------------------------------------


async def test_post_stores_publishes_once_and_returns_the_same_id(engine: Any, redis: Any) -> None:
    job_id, team_id = await make_job(engine)
    async with Comments(engine, redis, settings()) as svc:
        who = await principal(engine, team_id)
        ids = [await svc.post(who, f"job:{job_id}", job_id, "r1", "  looks good  ") for _ in range(3)]
        assert len(set(ids)) == 1
        chats = await stream_chats(redis, job_id)
        assert [eid for eid, _ in chats] == ids[:1]
        assert chats[0][1]["text"] == "looks good" and chats[0][1]["userName"] == who.user_name
        stored = await comment_store.get_comment(engine, f"job:{job_id}", who.user_id, "r1")
        assert stored is not None and stored.id == ids[0]


async def test_concurrent_retries_on_two_nodes_broadcast_once(db_url: str, redis: Any) -> None:
    engines = [create_engine(db_url) for _ in range(2)]
    try:
        await migrate(engines[0])
        job_id, team_id = await make_job(engines[0])
        who = await principal(engines[0], team_id)
        acks: list[str] = []

        async def send(node: Comments) -> None:
            acks.append(await node.post(who, f"job:{job_id}", job_id, "dup", "hello"))

        async with Comments(engines[0], redis, settings()) as a, Comments(engines[1], redis, settings()) as b:
            nodes = [a, b]
            async with anyio.create_task_group() as tg:
                for i in range(3):
                    tg.start_soon(send, nodes[i % 2])
        assert len(acks) == 3 and len(set(acks)) == 1
        assert [eid for eid, _ in await stream_chats(redis, job_id)] == acks[:1]
        assert await count(engines[0], comments) == 1
    finally:
        for eng in engines:
            await eng.dispose()


async def test_viewer_is_forbidden_and_nothing_is_stored(engine: Any, redis: Any) -> None:
    job_id, team_id = await make_job(engine)
    async with Comments(engine, redis, settings()) as svc:
        viewer = await principal(engine, team_id, role="viewer")
        with pytest.raises(CommentForbidden):
            await svc.post(viewer, f"job:{job_id}", job_id, "r1", "hi")
        assert await count(engine, comments) == 0 and await count(engine, audit_log) == 0
        assert await stream_chats(redis, job_id) == []


async def test_redis_failure_after_commit_is_healed_by_the_retry(engine: Any, redis: Any) -> None:
    """Stored but not broadcast (Redis down): unavailable; the retry does the XADD, once."""
    from progress_service.app import make_redis  # noqa: PLC0415

    job_id, team_id = await make_job(engine)
    who = await principal(engine, team_id)
    dead = make_redis("redis://127.0.0.1:1/0")  # nothing listens on port 1
    try:
        # The default store timeout: the commit must land before the append fails,
        # even on a loaded machine (1 s was not always enough for PostgreSQL).
        async with Comments(engine, dead, settings()) as broken:
            with pytest.raises(CommentsUnavailable):
                await broken.post(who, f"job:{job_id}", job_id, "r1", "hi")
    finally:
        await dead.aclose()
    stored = await comment_store.get_comment(engine, f"job:{job_id}", who.user_id, "r1")
    assert stored is not None and stored.id is None
    assert await stream_chats(redis, job_id) == []

    async with Comments(engine, redis, settings()) as healthy:
        eid = await healthy.post(who, f"job:{job_id}", job_id, "r1", "hi")
        assert await healthy.post(who, f"job:{job_id}", job_id, "r1", "hi") == eid
        assert [e for e, _ in await stream_chats(redis, job_id)] == [eid]
        assert await redis.hget(published_key(job_id), str(stored.commentId)) == eid.encode()


async def test_locked_sqlite_store_answers_unavailable_and_leaves_nothing(tmp_path: Path, redis: Any) -> None:
    db = tmp_path / "locked.db"
    engine = create_engine(f"sqlite+aiosqlite:///{db}")
    await migrate(engine)
    try:
        job_id, team_id = await make_job(engine)
        who = await principal(engine, team_id)
        async with Comments(engine, redis, settings(store_timeout=1.0)) as svc:
            blocker = sqlite3.connect(db, timeout=1)
            blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            try:
                with anyio.fail_after(3):
                    with pytest.raises(CommentsUnavailable):
                        await svc.post(who, f"job:{job_id}", job_id, "r1", "hi")
            finally:
                blocker.rollback()
                blocker.close()
            await anyio.sleep(0.5)  # the abandoned write gets the lock, sees it was abandoned, rolls back
            assert await count(engine, comments) == 0 and await count(engine, audit_log) == 0
            assert await stream_chats(redis, job_id) == []
            eid = await svc.post(who, f"job:{job_id}", job_id, "r1", "hi")
            assert [e for e, _ in await stream_chats(redis, job_id)] == [eid]
            assert await count(engine, comments) == 1 and await count(engine, audit_log) == 1
    finally:
        await engine.dispose()


@pytest.mark.postgres
async def test_unreachable_postgres_answers_unavailable_then_recovers(postgres_url: str, postgres_admin_url: str, redis: Any) -> None:
    import asyncpg  # noqa: PLC0415

    engine = create_engine(postgres_url)
    await migrate(engine)
    dbname = postgres_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(postgres_admin_url)
    try:
        job_id, team_id = await make_job(engine)
        who = await principal(engine, team_id)
        async with Comments(engine, redis, settings(store_timeout=2.0)) as svc:
            await admin.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS false')
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", dbname)
            with pytest.raises(CommentsUnavailable):
                await svc.post(who, f"job:{job_id}", job_id, "r1", "hi")
            assert await stream_chats(redis, job_id) == []
            await admin.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS true')
            eid = await svc.post(who, f"job:{job_id}", job_id, "r1", "hi")
            assert [e for e, _ in await stream_chats(redis, job_id)] == [eid]
            assert await count(engine, comments) == 1 and await count(engine, audit_log) == 1
    finally:
        await admin.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS true')
        await admin.close()
        await engine.dispose()


async def test_thousand_comments_from_ten_reviewers_all_stored_chain_verifies(engine: Any, redis: Any) -> None:
    job_id, team_id = await make_job(engine)
    async with Comments(engine, redis, settings()) as svc:
        reviewers = [await principal(engine, team_id, name=f"rev{i}") for i in range(10)]
        acks: dict[tuple[int, int], str] = {}

        async def reviewer(i: int) -> None:
            for n in range(100):
                acks[(i, n)] = await svc.post(reviewers[i], f"job:{job_id}", job_id, f"r{n}", f"comment {n} from {i}")

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for i in range(10):
                    tg.start_soon(reviewer, i)
        assert len(set(acks.values())) == 1000
        assert await count(engine, comments) == 1000
        assert len(await stream_chats(redis, job_id)) == 1000
        result = await audit.verify(engine)
        assert result.ok and result.verified == 1000
