"""The arq job function: one attempt of a Claude Code job, start to end.

``run_job`` claims the attempt (refusing a cancelled, finished, running or
superseded one), marks the job running, runs the CLI in the job's working
directory and appends every mapped event with the snapshot it leads to. Three
supervisors run beside the output reader in one task group: the cancel-flag
poller (which also refreshes the lease), the deadline, and nothing else; any
of them stops the process group and the reader drains what is left. The
outcome is decided once, at the end, from why the run stopped and from the
final ``result`` line's ``is_error``.

A worker that dies mid-job stops refreshing its lease; :func:`run_sweeper`
(running in every worker process, and in ``progress-service dev``) notices,
publishes ``worker lost`` and re-enqueues the job as the next attempt, or
fails it once ``job_max_tries`` attempts were made.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from typing import Any

import anyio
import msgspec
from arq.connections import ArqRedis
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from progress_service.events import TERMINAL_STATUSES, JobSnapshot, now_ms
from progress_service.queue import (
    cancel_requested,
    claim_run,
    enqueue_job,
    finish_run,
    lease_key,
    reap_run,
    refresh_lease,
    run_key,
)
from progress_service.settings import Settings
from progress_service.workspace import WorkdirError, resolve_workdir
from progress_service.store.jobs import JobRecord, get_job, jobs_in_status, update_job
from progress_service.streams import expire_job, read_state, room_id
from worker.claude import ClaudeProcess, Line, build_command, child_env, run_to_completion, start_claude
from worker.mapping import Mapper
from worker.publisher import Publisher

log = logging.getLogger("progress_service.worker")

#: How often the cancel flag is polled (seconds).
CANCEL_POLL = 0.25
#: How often a running job says its worker is alive (seconds).
ALIVE_EVERY = 30.0




def new_worker_id() -> str:
    """A worker id that names the host and process (shown in ``worker`` events)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class JobRun:
    """One attempt of one job on this worker."""

    def __init__(self, ctx: dict[str, Any], record: JobRecord, attempt: int, snapshot: JobSnapshot) -> None:
        self.settings: Settings = ctx["settings"]
        self.engine: AsyncEngine = ctx["engine"]
        self.redis: Redis = ctx["redis"]
        self.worker_id: str = ctx["worker_id"]
        self.record = record
        self.job_id = record.id
        self.attempt = attempt
        self.mapper = Mapper(snapshot)
        self.pub = Publisher(self.redis, self.job_id, attempt, self.settings, self.mapper, engine=self.engine)
        self.stop_reason: str | None = None  # cancelled | timeout | superseded
        self.cancelled_by: str | None = None
        spec_timeout = record.spec.timeoutSeconds or self.settings.job_timeout
        self.timeout = min(spec_timeout, self.settings.job_timeout_max)

    # -- the run --------------------------------------------------------------

    async def execute(self) -> str:
        """Run the attempt to its end; returns the final status (for arq's log)."""
        try:
            root = self.settings.workspace_path
            root.mkdir(parents=True, exist_ok=True)
            workdir = resolve_workdir(root, self.record.spec.workdir)
        except (WorkdirError, OSError) as exc:
            return await self._end("failed", str(exc))
        command = build_command(self.settings, self.record.spec, str(uuid.uuid4()))
        started = now_ms()
        demo = self.record.demo or command.demo
        await self.pub(self.mapper.status, "running", startedAt=started, demo=demo, attempt=self.attempt)
        await self.pub(self.mapper.worker, "alive", self.worker_id)
        await update_job(self.engine, self.job_id, snapshot=self.mapper.snapshot, demo=demo)
        try:
            async with start_claude(
                command.argv, cwd=workdir, env=child_env(self.settings), grace=self.settings.cancel_grace
            ) as proc:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._supervise, proc)
                    tg.start_soon(self._deadline, proc)
                    await self._read(proc)
                    tg.cancel_scope.cancel()
                returncode = proc.returncode
        except anyio.get_cancelled_exc_class():
            # arq abort, arq's own timeout or worker shutdown: the process is
            # already stopped by start_claude's exit; say how the job ended.
            await run_to_completion(self._interrupted())
            raise
        except OSError as exc:
            # The binary could not be started (missing, not executable).
            return await self._end("failed", f"could not start {command.argv[0]}: {exc}")
        return await self._conclude(returncode)

    async def _read(self, proc: ClaudeProcess) -> None:
        async for item in proc.output():
            if isinstance(item, Line):
                if item.stream == "stdout":
                    await self.pub(self.mapper.feed, item.data)
                else:
                    await self.pub(self.mapper.log, "stderr", item.data.decode("utf-8", "replace"))
            else:
                note = f"[line of {item.size} bytes truncated] " + item.head[:500].decode("utf-8", "replace")
                await self.pub(self.mapper.log, item.stream, note)
        await proc.wait()
        # The CLI is gone; anything it left running in its group goes too.
        await proc.reap_group()

    async def _stop(self, proc: ClaudeProcess, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        await proc.stop()

    async def _supervise(self, proc: ClaudeProcess) -> None:
        """Poll the cancel flag, refresh the lease, say the worker is alive."""
        lease_every = max(self.settings.lease_ttl / 3, CANCEL_POLL)
        last_lease = last_alive = anyio.current_time()
        while True:
            await anyio.sleep(CANCEL_POLL)
            who = await cancel_requested(self.redis, self.job_id)
            if who is not None:
                self.cancelled_by = who
                await self._stop(proc, "cancelled")
                return
            now = anyio.current_time()
            if now - last_lease >= lease_every:
                last_lease = now
                if not await refresh_lease(
                    self.redis, self.job_id, self.attempt, self.worker_id, self.settings.lease_ttl
                ):
                    # The sweeper gave this attempt up (we were too slow to
                    # refresh): another attempt owns the job now.
                    await self._stop(proc, "superseded")
                    return
            if now - last_alive >= ALIVE_EVERY:
                last_alive = now
                await self.pub(self.mapper.worker, "alive", self.worker_id)

    async def _deadline(self, proc: ClaudeProcess) -> None:
        await anyio.sleep(self.timeout)
        await self._stop(proc, "timeout")

    # -- endings --------------------------------------------------------------

    async def _conclude(self, returncode: int | None) -> str:
        if self.stop_reason == "superseded":
            return "superseded"
        if self.stop_reason == "cancelled":
            return await self._end("cancelled", f"cancelled by {self.cancelled_by or 'user'}")
        if self.stop_reason == "timeout":
            return await self._end("failed", f"timed out after {self.timeout}s")
        result = self.mapper.result
        if result is not None:
            # is_error decides, not the subtype (the CLI reports some
            # failures with subtype "success").
            if self.mapper.result_is_error:
                return await self._end("failed", result.error or "the agent reported an error")
            return await self._end("succeeded", None)
        return await self._end("failed", f"exited with code {returncode} and no result")

    async def _interrupted(self) -> None:
        """The arq task was cancelled: a user cancel, or this worker stopping."""
        who = await cancel_requested(self.redis, self.job_id)
        if who is not None:
            await self._end("cancelled", f"cancelled by {who}")
            return
        # Worker shutdown: give the job back as if this worker were lost, so
        # it is retried (or failed) now instead of after arq's long timeout.
        await self.redis.delete(lease_key(self.job_id))
        record = await get_job(self.engine, self.job_id)
        if record is not None:
            await recover_job(self.redis, self.engine, self.settings, record, why="worker stopped")

    async def _end(self, status: str, reason: str | None) -> str:
        """Publish the final status, unless this attempt lost the job meanwhile."""
        if not await refresh_lease(self.redis, self.job_id, self.attempt, self.worker_id, self.settings.lease_ttl):
            log.warning("job %s attempt %d: lost ownership, not publishing %s", self.job_id, self.attempt, status)
            return "superseded"
        await self.pub(self.mapper.status, status, reason=reason)
        await update_job(self.engine, self.job_id, snapshot=self.mapper.snapshot)
        await finish_run(
            self.redis,
            self.job_id,
            self.attempt,
            self.worker_id,
            "cancelled" if status == "cancelled" else "done",
            self.settings.events_ttl,
        )
        await expire_job(self.redis, self.job_id, self.settings.events_ttl)
        return status


async def run_job(ctx: dict[str, Any], job_id: str, attempt: int = 1) -> str:
    """arq job: run attempt ``attempt`` of job ``job_id``.

    Returns a short outcome for arq's log: the final status, or why the
    attempt was refused (``refused: terminal|busy|superseded``).
    """
    settings: Settings = ctx["settings"]
    engine: AsyncEngine = ctx["engine"]
    redis: Redis = ctx["redis"]
    worker_id: str = ctx.setdefault("worker_id", new_worker_id())
    record = await get_job(engine, job_id)
    if record is None:
        return "refused: unknown job"
    if record.status in TERMINAL_STATUSES:
        return "refused: terminal"
    if record.attempt > attempt:
        return "refused: superseded"
    verdict, _ = await claim_run(redis, job_id, attempt, worker_id, settings.lease_ttl)
    if verdict != "ok":
        return f"refused: {verdict}"
    snapshot, _ = await read_state(redis, job_id)
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
            return await run.execute()
        finally:
            await run.pub.close()


# --------------------------------------------------------------------------
# Lost workers
# --------------------------------------------------------------------------


async def recover_job(redis: Redis, engine: AsyncEngine, settings: Settings, record: JobRecord, *, why: str) -> str:
    """Deal with a job whose row says running but whose lease is gone.

    Re-enqueues it as the next attempt while ``job_max_tries`` allows, else
    fails it with ``why``; a job whose worker died after publishing its end
    only has its row brought up to date. Atomic with respect to other
    sweepers and to the worker (the decision is one Lua script). Returns what
    was done: alive, stale, synced, requeue or failed.
    """
    job_id = record.id
    snapshot, _ = await read_state(redis, job_id)
    if snapshot is None:
        snapshot = record.to_snapshot()
    if snapshot.status in TERMINAL_STATUSES:
        if await redis.exists(lease_key(job_id)):
            return "alive"
        await update_job(engine, job_id, snapshot=snapshot)
        return "synced"
    attempt = record.attempt
    lost_worker = await redis.hget(run_key(job_id), "worker")
    next_attempt = attempt + 1 if attempt < settings.job_max_tries else 0
    verdict = await reap_run(redis, job_id, attempt, next_attempt)
    if verdict in ("alive", "stale"):
        return verdict
    mapper = Mapper(snapshot)
    pub = Publisher(redis, job_id, attempt, settings, mapper, engine=engine)
    worker_name = lost_worker.decode() if isinstance(lost_worker, bytes) else (lost_worker or "unknown")
    await pub(mapper.worker, "lost", worker_name)
    if verdict == "requeue":
        reason = f"{why}; retrying as attempt {next_attempt} of {settings.job_max_tries}"
        await pub(mapper.status, "queued", reason=reason, phase="queued", attempt=next_attempt, startedAt=None)
        await update_job(engine, job_id, snapshot=mapper.snapshot)
        await enqueue_job(redis, job_id, attempt=next_attempt, queue_name=settings.queue_name)  # type: ignore[arg-type]
        log.warning("job %s: %s, re-enqueued as attempt %d", job_id, why, next_attempt)
        return "requeue"
    # "failed", or "ended" (run state says over but nobody published it).
    await pub(mapper.status, "failed", reason=why)
    await update_job(engine, job_id, snapshot=mapper.snapshot)
    await expire_job(redis, job_id, settings.events_ttl)
    log.warning("job %s: %s, failed after %d attempt(s)", job_id, why, attempt)
    return "failed"


async def sweep_once(arq_pool: ArqRedis, engine: AsyncEngine, settings: Settings) -> dict[str, str]:
    """One pass over running jobs; returns {job id: what was done} for those acted on."""
    done: dict[str, str] = {}
    for record in await jobs_in_status(engine, ["running"]):
        if await arq_pool.exists(lease_key(record.id)):
            continue
        outcome = await recover_job(arq_pool, engine, settings, record, why="worker lost")
        if outcome not in ("alive", "stale"):
            done[record.id] = outcome
    return done


async def run_sweeper(arq_pool: ArqRedis, engine: AsyncEngine, settings: Settings, *, interval: float | None = None) -> None:
    """Sweep for lost workers forever (every ``lease_ttl / 3`` s by default).

    Runs in every worker process; ``progress-service dev`` runs it through
    :func:`worker.settings.build_worker`. Errors are logged and the loop goes
    on, so a Redis or database hiccup does not end recovery for good.
    """
    every = interval if interval is not None else max(1.0, settings.lease_ttl / 3)
    while True:
        try:
            await sweep_once(arq_pool, engine, settings)
        except Exception:  # noqa: BLE001 - keep sweeping whatever happened
            log.exception("lost-worker sweep failed")
        await anyio.sleep(every)
