"""The publisher process: appends job events to Redis the way the worker does.

It uses :func:`progress_service.streams.append_event` (XADD + counter in one
MULTI), stamping each event's data with ``ts`` (``time.time_ns()``) and a
per-job ``seq`` (1, 2, …) so subscribers can time it and detect loss.

Two modes:

- closed loop (hot room): at most ``window`` events in flight, where an event
  is in flight until the slowest subscriber has seen it (``Control.progress``);
- open loop (many rooms, storms): every job publishes ``rate`` events per
  second on a fixed schedule whether or not anyone keeps up; ``ts`` is the
  scheduled time, so a publisher that falls behind shows up as latency
  (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import os
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import msgspec

from redis.asyncio import Redis

from bench.control import MEASURE, STOP, WARMUP, Control
from bench.tuning import run
from progress_service.events import StoredEvent
from progress_service.ids import now_ms
from progress_service.streams import append_event

#: A log line of realistic size (the web page shows stderr lines like this).
LINE = "PASSED tests/test_gateway.py::test_resume_after_restart_keeps_order[sqlite] in 0.42s"


@dataclass
class PublisherConfig:
    redis_url: str
    jobs: list[str]
    mode: str  # "closed" | "open"
    window: int = 64
    rate: float = 10.0
    maxlen: int = 10_000
    #: Concurrent publishing tasks in open loop (each owns a slice of the jobs; order per job holds).
    lanes: int = 8
    #: CPUs this process is pinned to (None: wherever the scheduler puts it).
    cpus: tuple[int, ...] | None = None
    #: Closed loop through the worker's own :class:`worker.publisher.Publisher`
    #: (its append script, ordering, SQL archive in this store) instead of
    #: ``streams.append_event``; the store's URL.
    worker_database_url: str | None = None


def _event(seq: int, ts: int) -> StoredEvent:
    return StoredEvent(kind="log", at=now_ms(), data={"stream": "stderr", "line": LINE, "seq": seq, "ts": ts})


async def _closed(cfg: PublisherConfig, ctl: Control, redis: Redis, workers: int,
                  append: Callable[[int], Awaitable[None]] | None = None) -> dict:
    job = cfg.jobs[0]
    seq = 0
    published = 0
    ctl.pub_ready.value = 1
    while ctl.phase.value < WARMUP:
        await asyncio.sleep(0.01)
    while ctl.phase.value < STOP and not ctl.pub_stop.value:
        floor = min(ctl.progress[i] for i in range(workers))
        if seq - floor >= cfg.window:
            # Polling, not busy-waiting: a tighter poll cost half a core of the 2 the server needs.
            await asyncio.sleep(0.002)
            continue
        seq += 1
        if append is None:
            await append_event(redis, job, _event(seq, time.time_ns()), maxlen=cfg.maxlen)
        else:
            await append(seq)
        published += 1
    ctl.target[0] = seq
    return {"published": published, "last_seq": seq}


class _LogLine(msgspec.Struct):
    """The data of a bench ``log`` event, as the worker's mapper would give it."""

    stream: str
    line: str
    seq: int
    ts: int


async def _closed_via_worker(cfg: PublisherConfig, ctl: Control, redis: Redis, workers: int) -> dict:
    """The closed loop, each event published by the worker's Publisher (the job's real path)."""
    from progress_service.events import JobSnapshot  # noqa: PLC0415 - only this mode needs the worker
    from progress_service.settings import Settings  # noqa: PLC0415
    from progress_service.store.db import create_engine  # noqa: PLC0415
    from progress_service.ids import room_id
    from worker.mapping import Mapped, Mapper  # noqa: PLC0415
    from worker.publisher import Publisher  # noqa: PLC0415

    job = cfg.jobs[0]
    engine = create_engine(cfg.worker_database_url or "")
    settings = Settings(redis_url=cfg.redis_url, database_url=cfg.worker_database_url, events_maxlen=cfg.maxlen)
    snapshot = JobSnapshot(id=job, roomId=room_id(job), status="running", phase="testing", prompt="benchmark job",
                           demo=True)
    pub = Publisher(redis, job, 1, settings, Mapper(snapshot), engine=engine)

    async def append(seq: int) -> None:
        data = _LogLine(stream="stderr", line=LINE, seq=seq, ts=time.time_ns())
        await pub.publish([Mapped(kind="log", at=now_ms(), data=data, snapshot=snapshot)])

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(pub.run)
            try:
                out = await _closed(cfg, ctl, redis, workers, append)
            finally:
                await pub.close()
    finally:
        await engine.dispose()
    out["path"] = "worker.publisher.Publisher"
    return out


async def _open(cfg: PublisherConfig, ctl: Control, redis: Redis) -> dict:
    period = 1.0 / cfg.rate
    n = len(cfg.jobs)
    seqs = [0] * n
    behind = [0.0]
    published = [0]
    measured = [0]

    ctl.pub_ready.value = 1
    while ctl.phase.value < WARMUP:
        await asyncio.sleep(0.01)
    start = time.time()

    async def lane(k: int) -> None:
        mine = list(range(k, n, cfg.lanes))
        # Spread jobs evenly over the period so load is smooth, not a burst every 100 ms.
        offsets = {j: period * j / n for j in mine}
        while ctl.phase.value < STOP and not ctl.pub_stop.value:
            now = time.time()
            next_due = now + period
            for j in mine:
                due = start + offsets[j] + seqs[j] * period
                if due <= now:
                    seqs[j] += 1
                    await append_event(redis, cfg.jobs[j], _event(seqs[j], int(due * 1e9)), maxlen=cfg.maxlen)
                    published[0] += 1
                    if ctl.phase.value == MEASURE:
                        measured[0] += 1
                    behind[0] = max(behind[0], time.time() - due)
                    due += period
                next_due = min(next_due, due)
            await asyncio.sleep(max(0.0, next_due - time.time()))

    async with asyncio.TaskGroup() as tg:
        for k in range(min(cfg.lanes, n)):
            tg.create_task(lane(k))
    for j in range(n):
        ctl.target[j] = seqs[j]
    return {
        "published": published[0],
        "published_measured": measured[0],
        "max_behind_ms": round(behind[0] * 1000, 1),
        "last_seq_total": sum(seqs),
    }


async def _main(cfg: PublisherConfig, ctl: Control, workers: int) -> dict:
    redis = Redis.from_url(cfg.redis_url, max_connections=64)
    try:
        await redis.ping()  # connected before it reports ready (``Control.pub_ready``)
        if cfg.mode == "closed" and cfg.worker_database_url:
            out = await _closed_via_worker(cfg, ctl, redis, workers)
        elif cfg.mode == "closed":
            out = await _closed(cfg, ctl, redis, workers)
        else:
            out = await _open(cfg, ctl, redis)
        out["cpu_s"] = round(time.process_time(), 2)
        return out
    finally:
        await redis.aclose()


def publisher_main(cfg: PublisherConfig, ctl: Control, workers: int) -> None:
    """Entry point of the publisher process."""
    if cfg.cpus is not None:
        os.sched_setaffinity(0, cfg.cpus)
    try:
        result = run(_main(cfg, ctl, workers))
    except BaseException as exc:  # noqa: BLE001 - reported to the orchestrator instead of dying silently
        result = {"crash": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
    ctl.results.put(("publisher", result))
