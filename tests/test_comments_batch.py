"""Group commit below the gateway: many comments in one transaction, on SQLite and PostgreSQL.

What test_comments.py checks for one comment must hold for a group too:
each comment with its own audit record, all or nothing; a comment whose
sender gave up while the group's transaction ran is neither stored nor
broadcast, while the rest of the group is; several jobs and teams in one
group; a script Redis lost is loaded again.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import anyio
import sqlalchemy as sa
from test_comments import count, make_job, principal, settings, stream_chats

from progress_service.comments import Comments
from progress_service.store import audit
from progress_service.store import comments as comment_store
from progress_service.store.db import create_engine
from progress_service.store.migrations import migrate
from progress_service.store.schema import audit_log, comments


async def test_a_group_spanning_jobs_and_teams_keeps_order_and_chains(engine: Any, redis: Any) -> None:
    (job_a, team_a), (job_b, team_b) = await make_job(engine, "ta"), await make_job(engine, "tb")
    async with Comments(engine, redis, settings()) as svc:
        who = {team_a: [await principal(engine, team_a) for _ in range(4)], team_b: [await principal(engine, team_b) for _ in range(4)]}
        acks: dict[tuple[str, str], str] = {}

        async def reviewer(job: str, team: str, i: int) -> None:
            for n in range(10):
                acks[(job, f"{i}-{n}")] = await svc.post(who[team][i], f"job:{job}", job, f"r{n}", f"{job} {i} {n}")

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for job, team in ((job_a, team_a), (job_b, team_b)):
                    for i in range(4):
                        tg.start_soon(reviewer, job, team, i)
        for job in (job_a, job_b):
            rows = await comment_store.list_comments(engine, f"job:{job}", limit=100)
            assert len(rows) == 40
            # Acked ⇒ stored with that id; the stream holds them in comment order.
            assert {r.id for r in rows} == {eid for (j, _), eid in acks.items() if j == job}
            assert [eid for eid, _ in await stream_chats(redis, job)] == [r.id for r in rows]
        for team in (team_a, team_b):
            recs = await audit.list_records(engine, team_id=team, limit=100)
            assert len(recs) == 40 and all(r.action == "comment.create" for r in recs)
            ids = [r.detail["commentId"] for r in recs]
            assert ids == sorted(ids)  # the chain follows comment order
        result = await audit.verify(engine)
        assert result.ok and result.verified == 80


async def test_a_sender_that_gives_up_mid_transaction_leaves_nothing_the_rest_is_stored(tmp_path: Path, redis: Any) -> None:
    db = tmp_path / "group.db"
    engine = create_engine(f"sqlite+aiosqlite:///{db}")
    await migrate(engine)
    try:
        job_id, team_id = await make_job(engine)
        quitter, stayer = await principal(engine, team_id), await principal(engine, team_id)
        async with Comments(engine, redis, settings(store_timeout=10.0)) as svc:
            blocker = sqlite3.connect(db, timeout=1)
            blocker.execute("BEGIN IMMEDIATE")  # the group's transaction waits for the write lock
            acked: list[str] = []

            async def stay() -> None:
                acked.append(await svc.post(stayer, f"job:{job_id}", job_id, "keep", "kept"))

            try:
                async with anyio.create_task_group() as tg:
                    with anyio.move_on_after(0.5) as gave_up:  # the quitter's connection goes away
                        tg.start_soon(stay)
                        await svc.post(quitter, f"job:{job_id}", job_id, "quit", "dropped")
                    assert gave_up.cancelled_caught
                    blocker.rollback()  # the transaction (holding both) gets the lock now
            finally:
                blocker.close()
            rows = await comment_store.list_comments(engine, f"job:{job_id}")
            assert [(r.text, r.id) for r in rows] == [("kept", acked[0])]
            assert await count(engine, audit_log) == 1
            assert [eid for eid, _ in await stream_chats(redis, job_id)] == acked
            assert (await audit.verify(engine)).ok
    finally:
        await engine.dispose()


async def test_same_request_twice_in_one_group_is_one_comment(engine: Any, redis: Any) -> None:
    job_id, team_id = await make_job(engine)
    who = await principal(engine, team_id)
    async with Comments(engine, redis, settings()) as svc:
        results: list[tuple[Any, bool]] = []

        async def send() -> None:
            results.append(await svc.submit(who, job_id, "same", "hello"))

        async with anyio.create_task_group() as tg:  # queued together: one group
            for _ in range(3):
                tg.start_soon(send)
        assert sorted(created for _, created in results) == [False, False, True]
        assert len({c.id for c, _ in results}) == 1
        assert await count(engine, comments) == 1 and await count(engine, audit_log) == 1
        assert [eid for eid, _ in await stream_chats(redis, job_id)] == [results[0][0].id]


async def test_jobs_of_one_group_are_appended_when_redis_lost_the_script(engine: Any, redis: Any) -> None:
    (job_a, team_id), (job_b, _) = await make_job(engine), await make_job(engine)
    who = await principal(engine, team_id)
    async with Comments(engine, redis, settings()) as svc:
        svc._append_once.sha = "0" * 40  # as if Redis restarted without the script
        acks: dict[str, str] = {}

        async def send(job: str) -> None:
            acks[job] = await svc.post(who, f"job:{job}", job, "r1", f"on {job}")

        async with anyio.create_task_group() as tg:
            tg.start_soon(send, job_a)
            tg.start_soon(send, job_b)
        for job in (job_a, job_b):
            assert [eid for eid, _ in await stream_chats(redis, job)] == [acks[job]]
        async with engine.connect() as conn:
            assert set((await conn.execute(sa.select(comments.c.event_id))).scalars()) == set(acks.values())
