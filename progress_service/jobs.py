"""The jobs service: submitting a job and cancelling it.

:class:`Jobs` (``Services.jobs``) is what ``POST /api/jobs`` and ``POST
/api/jobs/{id}/cancel`` call; the HTTP layer only maps its exceptions to
status codes. The run-state scripts that decide who wins a race (worker or
canceller) are in :mod:`progress_service.queue`; how every status
transition is recorded (the app's, the worker's and the sweeper's) is
:mod:`progress_service.lifecycle`.
"""

from __future__ import annotations

import uuid

import msgspec
from arq.connections import ArqRedis
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from progress_service import metrics, outage, queue, streams
from progress_service.events import (
    CLAUDE_TOOLS,
    TERMINAL_STATUSES,
    JobSnapshot,
    JobSpec,
    StatusData,
    StoredEvent,
    unknown_tools,
)
from progress_service.errors import InvalidJob, NotCancellable, NotQueued, WorkdirError
from progress_service.history import append_archived
from progress_service.lifecycle import cancel_reason, fail_unqueued, publish_cancelled
from progress_service.ids import now_ms, room_id
from progress_service.settings import Settings
from progress_service.store import jobs as job_store
from progress_service.store.audit import Audit
from progress_service.store.identity import Principal
from progress_service.store.jobs import JobRecord
from progress_service.workspace import resolve_workdir


def check_spec(spec: JobSpec, settings: Settings) -> None:
    """Refuse a spec the worker could not run; :class:`InvalidJob` says which field and why."""
    if len(spec.prompt.strip()) == 0:
        raise InvalidJob("prompt: must not be blank")
    if "\x00" in spec.prompt:
        # PostgreSQL refuses NUL in text: a 400 here, not a 500 at the INSERT.
        raise InvalidJob("prompt: must not contain NUL characters")
    if len(spec.prompt) > settings.prompt_max_chars:
        raise InvalidJob(f"prompt: longer than {settings.prompt_max_chars} characters")
    if bad_tools := unknown_tools(spec.allowedTools):
        raise InvalidJob(
            f"allowedTools: unknown tool {', '.join(bad_tools)} "
            f"(the CLI's tools are {', '.join(sorted(CLAUDE_TOOLS))}, and mcp__<server>__<tool>)"
        )
    if spec.timeoutSeconds is not None and spec.timeoutSeconds > settings.job_timeout_max:
        raise InvalidJob(f"timeoutSeconds: at most {settings.job_timeout_max}")
    try:
        root = settings.workspace_path
        root.mkdir(parents=True, exist_ok=True)
        resolve_workdir(root, spec.workdir)
    except WorkdirError as exc:
        raise InvalidJob(str(exc)) from None
    except OSError as exc:
        # e.g. ENAMETOOLONG: a path component over the filesystem's limit.
        raise InvalidJob(f"workdir: not a usable path ({exc.strerror})") from None


class Jobs:
    """Submit and cancel jobs; each records its audit entry (never waiting for the store)."""

    def __init__(self, engine: AsyncEngine, redis: Redis, arq: ArqRedis, settings: Settings, audit: Audit) -> None:
        self.engine = engine
        self.redis = redis
        self.arq = arq
        self.settings = settings
        self.audit = audit

    async def submit(self, principal: Principal, spec: JobSpec) -> JobSnapshot:
        """Store, announce (``queued``) and enqueue a job of the caller's team.

        Raises :class:`InvalidJob` for a bad spec, and :class:`NotQueued` when
        Redis failed between the stored row and the enqueue (the job is then
        marked failed, see :meth:`_not_queued`).
        """
        check_spec(spec, self.settings)
        job_id = uuid.uuid4().hex
        created = now_ms()
        await job_store.create_job(
            self.engine,
            job_id=job_id,
            team_id=principal.team_id,
            user_id=principal.user_id,
            spec=spec,
            created_at=created,
            # Decided by the worker that runs the job (its CLI or the replay
            # program), not by this process's PATH.
            demo=False,
        )
        snapshot = JobSnapshot(
            id=job_id,
            roomId=room_id(job_id),
            prompt=spec.prompt,
            model=spec.model,
            workdir=spec.workdir or "",
            createdAt=created,
            submittedBy=principal.user_name,
        )
        event = StoredEvent(kind="status", at=created, data=msgspec.to_builtins(StatusData(status="queued", phase="queued")))
        try:
            snapshot.lastEventId = await append_archived(self.redis, self.engine, job_id, event, snapshot=snapshot)
            await queue.enqueue_job(self.arq, job_id, queue_name=self.settings.queue_name)
        except Exception as exc:
            await self._not_queued(job_id, snapshot, exc)
        metrics.jobs_submitted.inc()
        self._audit(principal, "job.submit", job_id)
        return snapshot

    async def cancel(self, principal: Principal, record: JobRecord) -> JobSnapshot:
        """Ask ``record``'s job to stop (see :func:`cancel_job`); raises :class:`NotCancellable` for a session.

        Who may cancel (the submitter, or role submitter and above) is the caller's check.
        """
        if record.kind == "session":
            raise NotCancellable(
                "this is a Claude Code session reported through hooks: it runs on "
                f"{record.host or 'another machine'}, not here, so it can only be stopped there"
            )
        snapshot = await cancel_job(self.redis, self.engine, self.settings, record.id, by=principal.user_name)
        self._audit(principal, "job.cancel", record.id)
        return snapshot

    async def _not_queued(self, job_id: str, snapshot: JobSnapshot, exc: Exception) -> None:
        """The row exists but the job could not be queued: fail it (never left ``queued``), raise :class:`NotQueued`.

        A worker that claimed it anyway (the enqueue landed, its reply was
        lost) means it is queued after all: then this returns and the submit
        succeeds. An error that is no outage (a bug) is raised as it is.
        """
        dependency = outage.classify(exc)
        if dependency is None:
            raise exc
        outage.warn(dependency, "POST /api/jobs (enqueue)", exc)
        reason = "not queued at submit: " + outage.describe(dependency).split(";")[0]
        if await fail_unqueued(self.redis, self.engine, self.settings, job_id, snapshot, reason) is None:
            return
        raise NotQueued(
            job_id, f"job {job_id} was not queued and is marked failed: {outage.describe(dependency)} and submit it again"
        )

    def _audit(self, principal: Principal, action: str, job_id: str) -> None:
        self.audit.record_nowait(
            action=action,
            team_id=principal.team_id,
            actor=principal.user_name,
            room_id=room_id(job_id),
            detail={},
        )


async def cancel_job(
    redis: Redis, engine: AsyncEngine, settings: Settings, job_id: str, *, by: str | None = None
) -> JobSnapshot:
    """Request cancellation of a job and return its snapshot.

    - never started (queued, or re-queued after a lost worker): the job is
      cancelled here (status event, snapshot and job row) and the claim of
      any worker that picks it up later is refused;
    - running: the cancel flag is set (the worker polls it and stops the
      process, reading its last lines); the returned snapshot is
      still ``running``, the worker publishes ``cancelled``;
    - already finished: the snapshot is returned unchanged.

    Raises :class:`LookupError` for an unknown job.
    """
    record = await job_store.get_job(engine, job_id)
    if record is None:
        raise LookupError(job_id)
    snapshot, _ = await streams.read_state(redis, job_id)
    if snapshot is None:
        snapshot = record.to_snapshot()
    if record.status in TERMINAL_STATUSES:
        return record.to_snapshot()
    who = by or "user"
    verdict, attempt = await queue.request_cancel(redis, job_id, who, settings.events_ttl)
    if verdict == "terminal":
        latest, _ = await streams.read_state(redis, job_id)
        return latest or record.to_snapshot()
    if verdict == "running":
        # The flag is the one contract: the worker polls it, stops the CLI
        # with SIGINT, reads its last lines and publishes "cancelled". No arq
        # abort: a native task cancel would lose those lines and race the
        # worker's own ending.
        return snapshot
    return await publish_cancelled(redis, engine, settings, job_id, snapshot, attempt, cancel_reason(who, before_start=True))
