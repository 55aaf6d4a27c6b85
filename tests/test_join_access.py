"""Joins that cannot probe rooms, and a reconnect storm that waits instead of failing.

- A join of another team's job and a join of a missing job run the same
  store query and nothing else (no Redis round trip), and take the same time
  (medians compared with a generous bound), even when this process has the
  other team's job cached.
- 1,000 clients reconnecting at once to a fresh gateway (cold caches, a
  short ``PS_STORE_TIMEOUT``) all get ``joined``: none is told
  ``unavailable`` while the store is healthy.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest
from sqlalchemy import event

from gateway_helpers import auth, connect, join, publish, recv_type, send, serve

pytestmark = pytest.mark.anyio


async def _refusal(ws: Any, room: str) -> float:
    start = time.perf_counter()
    await send(ws, type="join", roomId=room)
    msg = await recv_type(ws, "error")
    elapsed = time.perf_counter() - start
    assert (msg["code"], msg["roomId"]) == ("not_found", room), msg
    return elapsed


async def test_another_teams_room_and_a_missing_room_cost_the_same(make_settings: Callable[..., Any], store: Any) -> None:
    mine = await store.token(team="t1", user="probe")
    theirs = await store.token(team="t2", user="owner")
    their_job = await store.job(team="t2")
    settings = make_settings(ws_error_budget=10_000, ws_max_rooms=1000)
    async with serve(settings) as (base, app), connect(base, max_queue=64) as owner, connect(base, max_queue=64) as ws:
        await auth(owner, theirs)
        await join(owner, their_job)  # this process now knows the job's team (the old fast path)
        await auth(ws, mine)
        statements: list[str] = []

        def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            # Only the join's own reads: both refusals are audited alike, and the
            # audit and comments writers run in the background on their own
            # schedule (e.g. the comments' missing-id repair scan).
            if "audit" not in statement and "FROM comments" not in statement:
                statements.append(statement)

        engine = app.state.services.engine.sync_engine
        event.listen(engine, "before_cursor_execute", record)
        try:
            statements.clear()
            await _refusal(ws, f"job:{their_job}")
            other_sql = list(statements)
            statements.clear()
            await _refusal(ws, "job:nosuchjob000")
            missing_sql = list(statements)
        finally:
            event.remove(engine, "before_cursor_execute", record)
        # The same single indexed lookup, whatever the answer would have been.
        assert other_sql == missing_sql and len(other_sql) == 1, (other_sql, missing_sql)

        other, missing = [], []
        for i in range(40):  # interleaved, so machine load hits both alike
            other.append(await _refusal(ws, f"job:{their_job}"))
            missing.append(await _refusal(ws, f"job:missing{i:04d}"))
        m_other, m_missing = statistics.median(other), statistics.median(missing)
        print(f"join refusal medians: another team's room {m_other * 1000:.2f} ms, missing room {m_missing * 1000:.2f} ms")
    # Before: 0.8 ms (cached other team) vs 3.6 ms (missing), 4.5x. Generous:
    # both cores saturated by other runs gave 2.56 vs 5.99 ms (2.3x) with the
    # same single lookup, so the medians may differ by 1 ms or by up to 3.5x.
    low, high = sorted((m_other, m_missing))
    assert high - low < 0.001 or high / low < 3.5, (m_other, m_missing)


async def test_a_reconnect_storm_waits_for_the_store_instead_of_failing(
    make_settings: Callable[..., Any], store: Any, redis: Any
) -> None:
    clients, users, jobs_n = 1000, 50, 100
    tokens = [await store.token(team="t1", user=f"storm{i}") for i in range(users)]
    jobs = [await store.job(team="t1") for _ in range(jobs_n)]
    for job in jobs:  # running jobs: their events are in Redis
        await publish(redis, job, 2)
    # A short store timeout: queued in the pool, most reads would pass it.
    # Short, but not so short that one read on a saturated event loop (1,000
    # handshakes on a busy 2-core machine) passes it once it has its slot.
    settings = make_settings(store_timeout=3.0, ws_auth_timeout=60.0, presence_grace=0.2)
    answers: dict[str, int] = {}
    async with serve(settings) as (base, _app):
        async with AsyncExitStack() as stack:
            opened = 0

            async def client(i: int) -> None:
                nonlocal opened
                ws = await stack.enter_async_context(connect(base, max_queue=None, open_timeout=60))
                opened += 1
                await auth(ws, tokens[i % users])
                await send(ws, type="join", roomId=f"job:{jobs[i % jobs_n]}")
                with anyio.fail_after(60):
                    while True:
                        msg = json.loads(await ws.recv())
                        if msg.get("type") in ("joined", "error"):
                            key = msg["type"] if msg["type"] == "joined" else f'{msg["code"]}: {msg.get("message")}'
                            answers[key] = answers.get(key, 0) + 1
                            return

            start = time.monotonic()
            async with anyio.create_task_group() as tg:
                for i in range(clients):
                    tg.start_soon(client, i)
            elapsed = time.monotonic() - start
    assert answers == {"joined": clients}, answers
    assert elapsed < 60, elapsed
