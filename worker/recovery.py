"""Lost workers: re-enqueueing an attempt, recovering a job whose worker vanished, the sweeper.

A worker that dies mid-job stops refreshing its lease. A :class:`Sweeper`
runs in the app process (so recovery needs no live worker) and in every
worker; when a running job's lease has been missing for ``lease_grace``
seconds it calls :func:`recover_job`, which publishes ``worker lost`` and
re-enqueues the job as its next attempt, fails it once ``job_max_tries``
tries are spent (hand-backs cost none), or cancels it if its cancel flag is
set. See docs/jobs.md.
"""

from __future__ import annotations

import enum
import logging

import anyio
from arq.connections import ArqRedis
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from progress_service.events import TERMINAL_STATUSES
from progress_service.lifecycle import cancel_reason, record_ended, record_requeued
from progress_service.keys import lease_key, run_key
from progress_service.queue import ReapVerdict, cancel_requested, reap_run
from progress_service.settings import Settings
from progress_service.store.jobs import JobRecord, jobs_in_status, update_job
from progress_service.streams import read_state
from worker.mapping import Mapper
from worker.outage import DEPENDENCY_DOWN, Link, persist
from worker.publisher import Publisher

log = logging.getLogger("progress_service.worker")


async def requeue(
    redis: Redis,
    engine: AsyncEngine,
    settings: Settings,
    pub: Publisher[Mapper],
    next_attempt: int,
    reason: str,
    *,
    queue: Redis | None = None,
) -> None:
    """Publish ``queued`` for the next attempt and enqueue it (the run state already says queued).

    ``queue`` is the queue's Redis when it is not ``redis`` (``PS_QUEUE_REDIS_URL``). The
    rest, and a cancel that races it, is :func:`~progress_service.lifecycle.record_requeued`'s;
    the row write waits out a store outage.
    """
    job_id = pub.job_id
    mapper = pub.mapper
    await pub(mapper.status, "queued", reason=reason, phase="queued", attempt=next_attempt, startedAt=None)
    link = Link(f"store (job {job_id} re-queue)")
    await record_requeued(
        redis, engine, settings, job_id, mapper.snapshot, next_attempt,
        queue_redis=queue, store=lambda op: persist(op, link),
    )


class Recovery(enum.StrEnum):
    """What :func:`recover_job` did with a job whose row says running."""

    #: Its worker holds the lease after all: nothing to do.
    ALIVE = "alive"
    #: The row lags a newer attempt (queued, or another attempt runs): nothing to do.
    STALE = "stale"
    #: The job had ended; only its row was brought up to date.
    SYNCED = "synced"
    REQUEUE = "requeue"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def acted(self) -> bool:
        """Whether recovery changed the job (a sweep reports only those)."""
        return self not in (Recovery.ALIVE, Recovery.STALE)


async def recover_job(
    redis: Redis, engine: AsyncEngine, settings: Settings, record: JobRecord, *, why: str, queue: Redis | None = None
) -> Recovery:
    """Deal with a job whose row says running but whose lease is gone.

    Re-enqueues it as the next attempt while tries are left (attempts minus
    hand-backs < ``job_max_tries``), else fails it with ``why``; a job with
    its cancel flag set is cancelled, never re-run; a job whose worker died
    after publishing its end only has its row brought up to date. Atomic
    with respect to other sweepers and to the worker (the decision is one
    Lua script). Returns what was done.
    """
    job_id = record.id
    snapshot, _ = await read_state(redis, job_id)
    if snapshot is None:
        snapshot = record.to_snapshot()
    if snapshot.status in TERMINAL_STATUSES:
        if await redis.exists(lease_key(job_id)):
            return Recovery.ALIVE
        await update_job(engine, job_id, snapshot=snapshot)
        return Recovery.SYNCED
    attempt = record.attempt
    lost_worker = await redis.hget(run_key(job_id), "worker")
    verdict, spent = await reap_run(redis, job_id, attempt, settings.job_max_tries)
    if verdict in (ReapVerdict.ALIVE, ReapVerdict.STALE):
        return Recovery(verdict.value)
    mapper = Mapper(snapshot)
    pub = Publisher(redis, job_id, attempt, settings, mapper, engine=engine)
    worker_name = lost_worker.decode() if isinstance(lost_worker, bytes) else (lost_worker or "unknown")
    await pub(mapper.worker, "lost", worker_name)
    if verdict is ReapVerdict.REQUEUE:
        reason = f"{why}; retrying as attempt {attempt + 1} (try {spent + 1} of {settings.job_max_tries})"
        await requeue(redis, engine, settings, pub, attempt + 1, reason, queue=queue)
        log.warning("job %s: %s", job_id, reason)
        return Recovery.REQUEUE
    if verdict is ReapVerdict.CANCELLED:
        who = await cancel_requested(redis, job_id)
        await pub(mapper.status, "cancelled", reason=f"{cancel_reason(who)} ({why})")
        outcome = Recovery.CANCELLED
    else:  # "failed", or "ended" (run state says over but nobody published it)
        await pub(mapper.status, "failed", reason=why)
        outcome = Recovery.FAILED
    link = Link(f"store (job {job_id} recovery)")
    await record_ended(redis, engine, settings, job_id, mapper.snapshot, store=lambda op: persist(op, link))
    log.warning("job %s: %s, %s after %d tr%s", job_id, why, outcome, spent, "y" if spent == 1 else "ies")
    return outcome


class Sweeper:
    """Finds running jobs whose worker is gone and recovers them (:func:`recover_job`).

    A lease must be seen missing for ``lease_grace`` seconds (of this
    sweeper's own, Redis-reachable time) before its worker is declared
    lost: after Redis restarted empty, or came back from an outage longer
    than the lease, a live worker re-creates its lease within about a
    second, and must not see its job run a second time. Runs in the app
    process (so recovery happens with no worker alive) and in every worker.
    """

    def __init__(
        self, redis: Redis, engine: AsyncEngine, settings: Settings, *, grace: float | None = None, queue: Redis | None = None
    ) -> None:
        self.redis = redis
        #: The queue's Redis when it is another one than the job data's (re-enqueues go there).
        self.queue = queue
        self.engine = engine
        self.settings = settings
        self.grace = settings.lease_grace if grace is None else grace
        self.missing: dict[str, float] = {}  # job id -> when its lease was first seen missing
        self.link = Link("lost-worker sweeper: Redis or store")

    async def sweep(self) -> dict[str, Recovery]:
        """One pass over running jobs; returns {job id: what was done} for those acted on."""
        done: dict[str, Recovery] = {}
        running = await jobs_in_status(self.engine, ["running"])
        ids = {r.id for r in running}
        self.missing = {k: v for k, v in self.missing.items() if k in ids}
        for record in running:
            if await self.redis.exists(lease_key(record.id)):
                self.missing.pop(record.id, None)
                continue
            now = anyio.current_time()
            if now - self.missing.setdefault(record.id, now) < self.grace:
                continue
            outcome = await recover_job(self.redis, self.engine, self.settings, record, why="worker lost", queue=self.queue)
            self.missing.pop(record.id, None)
            if outcome.acted:
                done[record.id] = outcome
        return done

    async def run(self, *, interval: float | None = None) -> None:
        """Sweep until cancelled (every second, or ``lease_ttl / 3`` when shorter).

        An outage is waited out with one log line when it starts and one when
        it ends; leases seen missing before it are not trusted after it.
        """
        every = interval if interval is not None else max(0.2, min(1.0, self.settings.lease_ttl / 3))
        while True:
            try:
                await self.sweep()
            except DEPENDENCY_DOWN as exc:
                self.link.down(exc)
                self.missing.clear()
            except Exception:  # noqa: BLE001 - a bug in one pass must not end recovery for good
                log.exception("lost-worker sweep failed")
            else:
                self.link.up()
            await anyio.sleep(every)


async def sweep_once(arq_pool: ArqRedis, engine: AsyncEngine, settings: Settings) -> dict[str, Recovery]:
    """One pass without grace: recover every running job whose lease is missing now."""
    return await Sweeper(arq_pool, engine, settings, grace=0).sweep()


async def run_sweeper(
    arq_pool: ArqRedis, engine: AsyncEngine, settings: Settings, *, interval: float | None = None, queue: Redis | None = None
) -> None:
    """Sweep for lost workers until cancelled (see :class:`Sweeper`); ``queue``: see :func:`requeue`."""
    await Sweeper(arq_pool, engine, settings, queue=queue).run(interval=interval)
