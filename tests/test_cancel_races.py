"""Cancel is exactly once: every interleaving of cancel with worker stop, lease loss and re-enqueue.

Real worker code (``run_job`` in this process, the replay program), real
Redis and SQLite; the races are forced by doing the two things in each
order, or at the same moment.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import pytest

from progress_service.ids import now_ms
from progress_service.jobs import cancel_job
from progress_service.keys import cancel_key, run_key
from progress_service.queue import claim_run
from progress_service.store.db import create_engine
from progress_service.store.jobs import get_job, update_job
from progress_service.store.migrations import migrate
from progress_service.streams import read_state
# Shared helpers, and the fixtures that put these runs on a Redis database of their own.
from test_worker import arq_pool, events, new_job, redis, redis_url, wait_for, worker_ctx  # noqa: F401
from worker.jobs import run_job
from worker.recovery import sweep_once


@pytest.fixture
async def engine(store_url: str) -> AsyncIterator[Any]:
    """SQLite only: the races are decided in Redis; the store just records the outcome."""
    eng = create_engine(store_url)
    await migrate(eng)
    try:
        yield eng
    finally:
        await eng.dispose()


def _statuses(evs: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(e["data"]["status"], e.get("attempt", 1)) for e in evs if e["kind"] == "status"]


async def _running(redis: Any, job_id: str) -> bool:
    return any(e["kind"] == "step" for e in await events(redis, job_id))


async def test_cancel_and_worker_stop_at_once_end_cancelled(
    engine: Any, redis: Any, make_settings: Any, worker_ctx: Any
) -> None:
    settings = make_settings(replay_speed=2.0, replay_transcript="long", cancel_grace=1.0)
    job_id = await new_job(engine, redis, settings)
    task = asyncio.ensure_future(run_job(worker_ctx(settings), job_id))
    await wait_for(lambda: _running(redis, job_id))
    # The user cancels and, in the same instant, the worker is told to stop.
    await cancel_job(redis, engine, settings, job_id, by="alice")
    task.cancel()
    with anyio.fail_after(15):
        try:
            await task
        except asyncio.CancelledError:
            pass
    record = await get_job(engine, job_id)
    assert record is not None and record.status == "cancelled" and record.attempt == 1
    assert record.reason == "cancelled by alice"
    evs = await events(redis, job_id)
    assert _statuses(evs) == [("queued", 1), ("running", 1), ("cancelled", 1)]
    # The CLI's last lines were read before the job was marked cancelled.
    kinds = [e["kind"] for e in evs]
    assert "result" in kinds and kinds.index("result") < len(kinds) - 1
    assert record.cost_usd and record.cost_usd > 0
    assert not await redis.exists(f"arq:job:{job_id}:2")


async def test_cancel_after_hand_back_never_runs_the_next_attempt(
    engine: Any, redis: Any, make_settings: Any, worker_ctx: Any
) -> None:
    settings = make_settings(replay_speed=2.0, replay_transcript="long", cancel_grace=1.0, job_max_tries=1)
    job_id = await new_job(engine, redis, settings)
    task = asyncio.ensure_future(run_job(worker_ctx(settings), job_id))
    await wait_for(lambda: _running(redis, job_id))
    task.cancel()  # a graceful worker stop
    with anyio.fail_after(15):
        try:
            await task
        except asyncio.CancelledError:
            pass
    record = await get_job(engine, job_id)
    # Handed back: queued as attempt 2 though only one try is allowed (no try was spent).
    assert record is not None and record.status == "queued" and record.attempt == 2
    snap = await cancel_job(redis, engine, settings, job_id, by="bob")
    assert snap.status == "cancelled"
    assert await run_job(worker_ctx(settings), job_id, 2) == "refused: terminal"
    assert _statuses(await events(redis, job_id))[-1] == ("cancelled", 2)


async def test_lost_worker_with_cancel_flag_is_cancelled_not_retried(
    engine: Any, redis: Any, arq_pool: Any, make_settings: Any, worker_ctx: Any
) -> None:
    settings = make_settings(job_max_tries=3)
    job_id = await new_job(engine, redis, settings)
    assert (await claim_run(redis, job_id, 1, "ghost:1", 0.3))[0] == "ok"
    snap, _ = await read_state(redis, job_id)
    assert snap is not None
    await update_job(engine, job_id, snapshot=msgspec.structs.replace(snap, status="running", startedAt=now_ms()))
    # The user cancels; the worker dies before it sees the flag.
    await cancel_job(redis, engine, settings, job_id, by="carol")
    assert await redis.get(cancel_key(job_id)) == b"carol"  # running: only the flag is set

    async def swept() -> dict[str, str]:
        return await sweep_once(arq_pool, engine, settings)

    assert await wait_for(swept) == {job_id: "cancelled"}
    record = await get_job(engine, job_id)
    assert record is not None and record.status == "cancelled" and "carol" in (record.reason or "")
    assert (await run_job(worker_ctx(settings), job_id, 2)).startswith("refused")
    assert not await arq_pool.exists(f"arq:job:{job_id}:2")


async def test_cancel_racing_a_requeue_is_refused_at_the_claim(
    engine: Any, redis: Any, make_settings: Any, worker_ctx: Any
) -> None:
    settings = make_settings()
    job_id = await new_job(engine, redis, settings)
    # The sweeper has just re-queued attempt 2, and a cancel's flag lands
    # before the queued state is visible to the canceller (its script saw
    # "running" and only set the flag).
    await redis.hset(run_key(job_id), mapping={"state": "queued", "attempt": 2})
    await redis.set(cancel_key(job_id), "dave")
    assert await run_job(worker_ctx(settings), job_id, 2) == "refused: cancelled"
    record = await get_job(engine, job_id)
    assert record is not None and record.status == "cancelled" and "dave" in (record.reason or "")
    assert (await redis.hget(run_key(job_id), "state")) == b"cancelled"
    assert await run_job(worker_ctx(settings), job_id, 2) == "refused: terminal"
