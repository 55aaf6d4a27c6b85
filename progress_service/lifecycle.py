"""Job status transitions: which status follows which, and how each one is recorded.

::

    queued ──claim──▶ running ──▶ succeeded | failed | cancelled
      │  ▲               │
      │  └───────────────┘  hand-back (worker stopping) or worker lost (sweeper): next attempt
      └──▶ cancelled (cancel before it ran) | failed (not queued at submit)

Who wins a race (a worker and a canceller, two sweepers, a stale attempt)
is decided in Redis by the run-state scripts of :mod:`progress_service.queue`
before anything here runs. This module is the one home of what follows a
verdict: the job row's update, the run state's end and the stream's expiry,
and, for the transitions the app and the sweeper make without a worker's
mapper, the status event itself. The worker announces its own transitions
through its publisher (``worker.mapping.Mapper.status``) and records them
here. Callers: :class:`progress_service.jobs.Jobs` (submit, cancel),
``worker.jobs`` (an attempt) and ``worker.recovery`` (hand-back, lost workers).

A ``step`` argument is how the caller runs one store or Redis call: at once
(the default), or waiting out an outage (the worker's ``persist``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine

from progress_service import queue, streams
from progress_service.events import JobSnapshot, StatusData, StoredEvent
from progress_service.history import append_archived
from progress_service.ids import now_ms, room_id
from progress_service.settings import Settings
from progress_service.store.jobs import update_job

#: Runs one store or Redis call for a transition (see the module docstring).
Step = Callable[[Callable[[], Awaitable[object]]], Awaitable[object]]


async def at_once(op: Callable[[], Awaitable[object]]) -> object:
    """The default :data:`Step`: run the call once; its error is the caller's."""
    return await op()


def cancel_reason(who: str | None, *, before_start: bool = False) -> str:
    """The ``reason`` of a ``cancelled`` status: who asked (``user`` when unknown), and whether the job never ran."""
    reason = f"cancelled by {who or 'user'}"
    return reason + " before it started" if before_start else reason


# -- the worker's transitions (announced by its publisher) -------------------


async def record_running(engine: AsyncEngine, job_id: str, snapshot: JobSnapshot, *, demo: bool, step: Step = at_once) -> None:
    """An attempt was claimed and announced ``running``: the row says so (and whether the replay program runs it)."""
    await step(lambda: update_job(engine, job_id, snapshot=snapshot, demo=demo))


async def record_ended(
    redis: Redis,
    engine: AsyncEngine,
    settings: Settings,
    job_id: str,
    snapshot: JobSnapshot,
    *,
    run: tuple[int, str] | None = None,
    store: Step = at_once,
    step: Step = at_once,
) -> None:
    """A terminal status was announced: the row takes ``snapshot``, the run state ends, the stream expires.

    ``run`` is ``(attempt, worker id)`` when a worker ends its own attempt:
    its run state is then closed (``cancelled`` or ``done``) by that owner.
    ``store`` runs the row write, ``step`` the Redis calls.
    """
    await store(lambda: update_job(engine, job_id, snapshot=snapshot))
    if run is not None:
        attempt, worker_id = run
        final: queue.RunState = "cancelled" if snapshot.status == "cancelled" else "done"
        await step(lambda: queue.finish_run(redis, job_id, attempt, worker_id, final, settings.events_ttl))
    await step(lambda: streams.expire_job(redis, job_id, settings.events_ttl))


async def record_requeued(
    redis: Redis,
    engine: AsyncEngine,
    settings: Settings,
    job_id: str,
    snapshot: JobSnapshot,
    next_attempt: int,
    *,
    queue_redis: Redis | None = None,
    store: Step = at_once,
) -> None:
    """``queued`` for ``next_attempt`` was announced (the run state already says queued): enqueue it, write the row.

    ``queue_redis`` is the queue's Redis when it is not ``redis``
    (``PS_QUEUE_REDIS_URL``). Enqueued before the row is written, and the
    row write is ``store``'s (the worker waits out a store outage): the run
    state already says queued, so a failure here must not leave the job
    with no arq job to run it.

    A cancel that lands between the run-state change and the announcement
    finds the run queued and cancels it, but its ``cancelled`` event may
    come before our ``queued``: then the cancellation is published again,
    so the last word is always ``cancelled`` (and the claim refuses the
    attempt either way).
    """
    await queue.enqueue_job(queue_redis or redis, job_id, attempt=next_attempt, queue_name=settings.queue_name)
    await store(lambda: update_job(engine, job_id, snapshot=snapshot))
    if await queue.run_state(redis, job_id) == "cancelled":
        latest, _ = await streams.read_state(redis, job_id)
        if latest is None or latest.status != "cancelled":
            await cancel_unstarted(redis, engine, settings, job_id, latest or snapshot, next_attempt)


# -- transitions of a job no worker runs (announced here) --------------------


async def cancel_unstarted(
    redis: Redis, engine: AsyncEngine, settings: Settings, job_id: str, snapshot: JobSnapshot, attempt: int
) -> JobSnapshot:
    """The cancel flag won over an attempt that never ran: publish ``cancelled`` naming who set the flag."""
    who = await queue.cancel_requested(redis, job_id)
    return await publish_cancelled(redis, engine, settings, job_id, snapshot, attempt, cancel_reason(who, before_start=True))


async def publish_cancelled(
    redis: Redis, engine: AsyncEngine, settings: Settings, job_id: str, snapshot: JobSnapshot, attempt: int, reason: str
) -> JobSnapshot:
    """Record that a job which is not running was cancelled: status event, snapshot, job row."""
    at = now_ms()
    snapshot = msgspec.structs.replace(
        snapshot, status="cancelled", reason=reason, finishedAt=at, step=None, roomId=room_id(job_id)
    )
    data = StatusData(status="cancelled", phase=snapshot.phase, reason=reason)
    event = StoredEvent(kind="status", at=at, data=msgspec.to_builtins(data), attempt=attempt)
    snapshot.lastEventId = await append_archived(redis, engine, job_id, event, snapshot=snapshot)
    await record_ended(redis, engine, settings, job_id, snapshot)
    return snapshot


async def fail_unqueued(
    redis: Redis, engine: AsyncEngine, settings: Settings, job_id: str, snapshot: JobSnapshot, reason: str
) -> JobSnapshot | None:
    """A job whose enqueue failed: mark it failed instead of leaving it ``queued`` for good.

    The run hash is closed first (:func:`~progress_service.queue.give_up_unqueued`:
    an arq job that did land after all is refused at its claim, as is any
    whose worker reads the failed row), then the row is failed and, if Redis
    takes it, a ``failed`` status event is published. Returns the failed
    snapshot, or None when a worker had already claimed the job (the enqueue
    went through: nothing to fail). A store error while failing the row is
    raised (the caller answers 503).
    """
    if not await queue.give_up_unqueued(redis, job_id, settings.events_ttl):
        return None
    at = now_ms()
    failed = msgspec.structs.replace(snapshot, status="failed", reason=reason, finishedAt=at, step=None)
    # The row first: it is the record while Redis (which just failed the enqueue) may be down.
    await update_job(engine, job_id, snapshot=failed)
    data = StatusData(status="failed", phase=snapshot.phase, reason=reason)
    event = StoredEvent(kind="status", at=at, data=msgspec.to_builtins(data))
    try:
        failed.lastEventId = await append_archived(redis, engine, job_id, event, snapshot=failed)
        await streams.expire_job(redis, job_id, settings.events_ttl)
    except (RedisError, OSError):
        pass  # the row is the record; readers fall back to it while Redis lacks the snapshot
    return failed
