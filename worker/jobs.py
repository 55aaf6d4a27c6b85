"""The arq job function: one attempt of a Claude Code job, start to end.

``run_job`` claims the attempt (refusing a cancelled, finished, running or
superseded one), marks the job running, runs the CLI in the job's working
directory and appends every mapped event with the snapshot it leads to. One
task group holds the output pumps, the reader, and the supervisors: the
cancel-flag poller (which also refreshes the lease), the deadline, the
hand-back request of a stopping worker, and the reaper of what the CLI
leaves behind. Any supervisor stops the CLI (SIGINT first) and the reader
goes on to EOF, so the CLI's last lines (its ``result`` with the cost) are
recorded before the job ends. The outcome is decided once, at the end, from
why the run stopped and from the final ``result`` line's ``is_error``.

Cancel is exactly once: the cancel flag in Redis is the only channel (no
arq abort), and every path that could start another attempt (the claim, a
hand-back, the sweeper's re-enqueue) checks the flag in the same Lua script
that changes the run state.

A worker that stops gracefully (SIGTERM, rolling restart) hands its jobs
back as their next attempt without spending a try; a worker that dies stops
refreshing its lease and a :class:`~worker.recovery.Sweeper` (in the app
process and in every worker) notices, publishes ``worker lost`` and re-enqueues the job, or
fails it once ``job_max_tries`` tries were spent. Redis and store outages
are waited out (:mod:`worker.outage`): a running CLI is never abandoned
because a dependency blinked.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from progress_service.errors import WorkdirError
from progress_service.events import TERMINAL_STATUSES, EventData, EventKind, JobSnapshot
from progress_service.ids import now_ms, room_id
from progress_service.lifecycle import cancel_reason, cancel_unstarted, record_ended, record_running
from progress_service.queue import (
    ClaimVerdict,
    HandBackVerdict,
    cancel_requested,
    claim_run,
    hand_back_run,
    refresh_lease,
)
from progress_service.settings import Settings
from progress_service.workspace import resolve_workdir
from progress_service.store.jobs import JobRecord, get_job
from progress_service.streams import read_state
from worker.claude import (
    ClaudeProcess, Line, Output, build_command, child_env, run_to_completion, start_claude, stdout_copy_path,
)
from worker.mapping import Mapper
from worker.outage import REDIS_DOWN, Link, persist
from worker.publisher import Publisher
from worker.recovery import requeue
from worker.steering import Steering

log = logging.getLogger("progress_service.worker")
T = TypeVar("T")

#: How often the cancel flag is polled (seconds).
CANCEL_POLL = 0.25
#: Longest time between two lease refreshes (seconds; also at most lease_ttl / 3).
LEASE_REFRESH = 1.0
#: How often a running job says its worker is alive (seconds).
ALIVE_EVERY = 30.0
#: How long a stopping worker waits for Redis and the store to hand a job
#: back, after the CLI's stop escalation (seconds).
HAND_BACK_WAIT = 15.0



def new_worker_id() -> str:
    """A worker id that names the host and process (shown in ``worker`` events)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class StopReason(enum.Enum):
    """Why an attempt stopped its CLI before the CLI ended by itself."""

    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    #: Another attempt (or a cancel) owns the job now.
    SUPERSEDED = "superseded"
    #: This worker is stopping: the job goes back on the queue.
    HAND_BACK = "handback"


class JobRun:
    """One attempt of one job on this worker."""

    def __init__(self, ctx: dict[str, Any], record: JobRecord, attempt: int, snapshot: JobSnapshot) -> None:
        self.settings: Settings = ctx["settings"]
        self.engine: AsyncEngine = ctx["engine"]
        self.redis: Redis = ctx["redis"]
        #: The queue's Redis when it is another one (PS_QUEUE_REDIS_URL): re-enqueues go there.
        self.queue: Redis | None = ctx.get("queue_redis")
        self.worker_id: str = ctx["worker_id"]
        self.record = record
        self.job_id = record.id
        self.attempt = attempt
        self.mapper = Mapper(snapshot, stdout_copy=stdout_copy_path(self.settings, record.id, attempt))
        self.pub = Publisher(self.redis, self.job_id, attempt, self.settings, self.mapper, engine=self.engine)
        self.stop_reason: StopReason | None = None
        self.cancelled_by: str | None = None
        spec_timeout = record.spec.timeoutSeconds or self.settings.job_timeout
        self.timeout = min(spec_timeout, self.settings.job_timeout_max)
        self.redis_link = Link(f"Redis (job {self.job_id})")
        self.store_link = Link(f"store (job {self.job_id})")
        #: Set when this worker stops: the attempt is handed back, not failed.
        self.hand_back_requested = asyncio.Event()

    # -- the run --------------------------------------------------------------

    async def execute(self) -> str:
        """Run the attempt to its end; returns the final status (for arq's log).

        The attempt runs in a task of its own. Cancelling this call (arq's
        shutdown, a rolling restart) does not cancel the attempt: it asks it
        to stop and hand the job back, waits for that, then re-raises the
        cancellation. The wait is bounded (the stop escalation plus
        ``HAND_BACK_WAIT``): a worker stopping while Redis or the store is
        down gives up handing back, and the sweeper recovers the job later.
        """
        attempt = asyncio.ensure_future(self._execute())
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            self.hand_back_requested.set()
            await run_to_completion(self._wait_handed_back(attempt))
            raise

    async def _wait_handed_back(self, attempt: asyncio.Future[str]) -> None:
        limit = 3 * self.settings.cancel_grace + 5 + HAND_BACK_WAIT
        done, _ = await asyncio.wait({attempt}, timeout=limit)
        if not done:
            log.warning("job %s: could not hand the job back within %.0f s; the sweeper will recover it", self.job_id, limit)
            attempt.cancel()  # the CLI is stopped by start_claude's shielded exit all the same
            await asyncio.wait({attempt})
        if not attempt.cancelled() and attempt.exception() is not None:
            log.error("job %s: the stopping attempt failed", self.job_id, exc_info=attempt.exception())

    async def _execute(self) -> str:
        try:
            root = self.settings.workspace_path
            root.mkdir(parents=True, exist_ok=True)
            workdir = resolve_workdir(root, self.record.spec.workdir)
        except (WorkdirError, OSError) as exc:
            return await self._end("failed", str(exc))
        command = build_command(self.settings, self.record.spec, str(uuid.uuid4()))
        started = now_ms()
        demo = command.demo  # decided here, where the job runs
        await self._publish(self.mapper.status, "running", startedAt=started, demo=demo, attempt=self.attempt)
        await self._publish(self.mapper.worker, "alive", self.worker_id)
        await record_running(self.engine, self.job_id, self.mapper.snapshot, demo=demo, step=self._store)
        running = False
        try:
            async with start_claude(
                command.argv, cwd=workdir, env=child_env(self.settings, self.record.spec), grace=self.settings.cancel_grace
            ) as proc:
                running = True
                steering = Steering(
                    self.redis, self.job_id, proc, self._publish_event,
                    timeout=self.settings.permission_timeout, ttl=self.settings.events_ttl,
                )
                async with anyio.create_task_group() as tg:
                    lines = proc.start_output(tg)
                    await steering.start(self.record.spec.prompt)
                    tg.start_soon(steering.run)
                    tg.start_soon(self._supervise, proc)
                    tg.start_soon(self._deadline, proc)
                    tg.start_soon(self._on_hand_back, proc)
                    # The CLI is gone: what it left running goes too (and
                    # that closes the pipes an escaped child kept open).
                    tg.start_soon(proc.reap_group)
                    await self._read(proc, lines, steering)
                    await steering.close("the CLI exited before it took it")
                    tg.cancel_scope.cancel()
                returncode = proc.returncode
        except OSError as exc:
            if running:
                raise
            # The binary could not be started (missing, not executable).
            return await self._end("failed", f"could not start {command.argv[0]}: {exc}")
        return await self._conclude(returncode)

    async def _read(self, proc: ClaudeProcess, lines: MemoryObjectReceiveStream[Output], steering: Steering) -> None:
        async with lines:
            async for item in lines:
                if isinstance(item, Line):
                    if item.stream == "stdout":
                        await self._publish(self.mapper.feed, item.data)
                        await steering.on_stdout(item.data)
                    else:
                        await self._publish(self.mapper.log, "stderr", item.data.decode("utf-8", "replace"))
                else:
                    note = f"[line of {item.size} bytes truncated] " + item.head[:500].decode("utf-8", "replace")
                    await self._publish(self.mapper.log, item.stream, note)
        await proc.wait()

    async def _publish(self, make: Any, *args: Any, **kwargs: Any) -> None:
        """Map and publish; during a Redis outage the Publisher keeps the events (its pump delivers them)."""
        await self.pub(make, *args, **kwargs)

    async def _publish_event(self, kind: EventKind, data: EventData) -> str | None:
        """Publish one event the worker makes; its id once Redis has it (None while Redis is down)."""
        async with self.pub.lock:
            events = self.mapper.event(kind, data)
            await self.pub.publish(events)
        return events[-1].snapshot.lastEventId

    async def _store(self, op: Callable[[], Awaitable[T]]) -> T:
        return await persist(op, self.store_link)

    async def _redis_step(self, op: Callable[[], Awaitable[T]]) -> T:
        return await persist(op, self.redis_link)

    async def _stop(self, proc: ClaudeProcess, reason: StopReason) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        await proc.stop()

    async def _supervise(self, proc: ClaudeProcess) -> None:
        """Poll the cancel flag, refresh the lease, say the worker is alive.

        Redis errors are waited out: the CLI keeps running through an outage,
        and the first refresh after it re-creates a lease that expired or
        vanished meanwhile (the sweeper's grace covers that gap).
        """
        lease_every = max(min(self.settings.lease_ttl / 3, LEASE_REFRESH), CANCEL_POLL)
        last_lease = last_alive = anyio.current_time()
        while True:
            await anyio.sleep(CANCEL_POLL)
            try:
                who = await cancel_requested(self.redis, self.job_id)
                if who is not None:
                    self.cancelled_by = who
                    await self._stop(proc, StopReason.CANCELLED)
                    return
                now = anyio.current_time()
                if now - last_lease >= lease_every or not self.redis_link.is_up:
                    owned = await refresh_lease(
                        self.redis, self.job_id, self.attempt, self.worker_id, self.settings.lease_ttl
                    )
                    last_lease = now
                    if not owned:
                        # The sweeper gave this attempt up: another attempt
                        # (or a cancel) owns the job now.
                        await self._stop(proc, StopReason.SUPERSEDED)
                        return
                    if owned == 2:
                        log.warning("job %s: Redis had lost the run state; re-created the lease", self.job_id)
            except REDIS_DOWN as exc:
                self.redis_link.down(exc)
                continue
            self.redis_link.up()
            if now - last_alive >= ALIVE_EVERY:
                last_alive = now
                await self._publish(self.mapper.worker, "alive", self.worker_id)

    async def _deadline(self, proc: ClaudeProcess) -> None:
        await anyio.sleep(self.timeout)
        await self._stop(proc, StopReason.TIMEOUT)

    async def _on_hand_back(self, proc: ClaudeProcess) -> None:
        await self.hand_back_requested.wait()
        await self._stop(proc, StopReason.HAND_BACK)

    # -- endings --------------------------------------------------------------

    async def _conclude(self, returncode: int | None) -> str:
        if self.stop_reason is StopReason.SUPERSEDED:
            return "superseded"
        if self.stop_reason is StopReason.HAND_BACK:
            return await self._hand_back()
        if self.stop_reason is StopReason.CANCELLED:
            return await self._end("cancelled", cancel_reason(self.cancelled_by))
        if self.stop_reason is StopReason.TIMEOUT:
            return await self._end("failed", f"timed out after {self.timeout}s")
        result = self.mapper.result
        if result is not None:
            # is_error decides, not the subtype (the CLI reports some
            # failures with subtype "success").
            if self.mapper.result_is_error:
                return await self._end("failed", result.error or "the agent reported an error")
            return await self._end("succeeded", None)
        return await self._end("failed", self.mapper.no_result_reason(returncode))

    async def _hand_back(self) -> str:
        """This worker is stopping: queue the job as its next attempt, spending no try."""
        verdict = await persist(
            lambda: hand_back_run(self.redis, self.job_id, self.attempt, self.worker_id), self.redis_link
        )
        if verdict is HandBackVerdict.CANCELLED:
            who = await persist(lambda: cancel_requested(self.redis, self.job_id), self.redis_link)
            return await self._end("cancelled", cancel_reason(who))
        if verdict is not HandBackVerdict.OK:
            return "superseded"
        reason = f"worker stopped; handed back as attempt {self.attempt + 1} (no try spent)"
        await requeue(self.redis, self.engine, self.settings, self.pub, self.attempt + 1, reason, queue=self.queue)
        log.warning("job %s: %s", self.job_id, reason)
        return "handed back"

    async def _end(self, status: str, reason: str | None) -> str:
        """Publish the final status, unless this attempt lost the job meanwhile."""
        owned = await persist(
            lambda: refresh_lease(self.redis, self.job_id, self.attempt, self.worker_id, self.settings.lease_ttl),
            self.redis_link,
        )
        if not owned:
            log.warning("job %s attempt %d: lost ownership, not publishing %s", self.job_id, self.attempt, status)
            return "superseded"
        await self._publish(self.mapper.status, status, reason=reason)
        await record_ended(
            self.redis, self.engine, self.settings, self.job_id, self.mapper.snapshot,
            run=(self.attempt, self.worker_id), store=self._store, step=self._redis_step,
        )
        return status


async def run_job(ctx: dict[str, Any], job_id: str, attempt: int = 1) -> str:
    """arq job: run attempt ``attempt`` of job ``job_id``.

    Returns a short outcome for arq's log: the final status, ``handed back``,
    or why the attempt was refused (``refused: terminal|busy|superseded|cancelled``).
    """
    settings: Settings = ctx["settings"]
    engine: AsyncEngine = ctx["engine"]
    redis: Redis = ctx["redis"]
    worker_id: str = ctx.setdefault("worker_id", new_worker_id())
    # An outage at the start is waited out too: failing here would leave
    # the job queued in the store with no arq job left to run it.
    link = Link(f"Redis or store (job {job_id} start)")
    record = await persist(lambda: get_job(engine, job_id), link)
    if record is None:
        return "refused: unknown job"
    if record.status in TERMINAL_STATUSES:
        return "refused: terminal"
    if record.attempt > attempt:
        return "refused: superseded"
    verdict, current = await persist(
        lambda: claim_run(redis, job_id, attempt, worker_id, settings.lease_ttl, settings.events_ttl), link
    )
    if verdict is ClaimVerdict.CANCELLED:
        # Cancelled while queued (a cancel that raced a re-enqueue): say so.
        snapshot, _ = await read_state(redis, job_id)
        await cancel_unstarted(redis, engine, settings, job_id, snapshot or record.to_snapshot(), current)
        return "refused: cancelled"
    if verdict is not ClaimVerdict.OK:
        return f"refused: {verdict}"
    snapshot, _ = await persist(lambda: read_state(redis, job_id), link)
    if snapshot is None:
        snapshot = record.to_snapshot()
    snapshot = msgspec.structs.replace(
        snapshot,
        id=job_id,
        roomId=room_id(job_id),
        prompt=record.spec.prompt,
        model=record.spec.model,
        workdir=record.spec.workdir or "",
        step=None,
        result=None,
        reason=None,
        finishedAt=None,
    )
    run = JobRun(ctx, record, attempt, snapshot)
    async with anyio.create_task_group() as tg:
        # The publisher's pump: delivers events kept during a Redis outage and
        # archives to the store; closing it drains both (shielded, bounded).
        await tg.start(run.pub.run)
        try:
            outcome = await run.execute()
        finally:
            await run.pub.close()
    return outcome
