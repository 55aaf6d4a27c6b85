"""``/api/jobs``: submit, list, inspect, read events of and cancel jobs."""

from __future__ import annotations

import base64
from typing import Annotated, Any

import msgspec
from litestar import Controller, get, post
from litestar.exceptions import ClientException, NotFoundException, ValidationException
from litestar.params import Parameter
from litestar.status_codes import HTTP_201_CREATED, HTTP_202_ACCEPTED, HTTP_409_CONFLICT

from progress_service import history, streams
from progress_service.api.deps import INT64_MAX, error_responses, require_role, requires, unavailable
from progress_service.events import JobSnapshot, JobSpec
from progress_service.ids import is_event_id, is_job_id, room_id
from progress_service.errors import InvalidJob, NotCancellable, NotQueued
from progress_service.jobs import Jobs
from progress_service.keys import snapshot_key
from progress_service.services import Services
from progress_service.store import jobs as job_store
from progress_service.store.identity import Principal

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


class JobPage(msgspec.Struct, kw_only=True):
    items: list[JobSnapshot]
    nextCursor: str | None


class EventPage(msgspec.Struct, kw_only=True):
    items: list[dict[str, Any]]
    #: Pass as ``since`` to read on; None when the page was empty.
    next: str | None
    #: True when events after ``since`` are gone (trimmed before they were
    #: archived, or removed by ``PS_HISTORY_DAYS``); never for events that are
    #: only missing from Redis (those come from the archive).
    gap: bool = False
    #: With ``gap``: the oldest event still kept.
    oldest: str | None = None


def _cursor_encode(created_at: int, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at}:{job_id}".encode()).decode().rstrip("=")


def _cursor_decode(cursor: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, job_id = raw.split(":", 1)
        if not is_job_id(job_id) or not created.isascii() or not created.isdigit():
            raise ValueError
        if int(created) > INT64_MAX:
            raise ValueError
        return int(created), job_id
    except (ValueError, UnicodeDecodeError):
        raise ValidationException("cursor: not a cursor returned by this API") from None


async def load_snapshot(services: Services, job_id: str, team_id: str) -> JobSnapshot:
    """The job's live snapshot (Redis), else its stored one; 404 for other teams.

    A job of another team answers exactly like a missing one, so ids cannot
    be probed.
    """
    if not is_job_id(job_id):
        raise NotFoundException("no such job")
    record = await job_store.get_job(services.engine, job_id, team_id)
    if record is None:
        raise NotFoundException("no such job")
    snapshot, _head = await streams.read_state(services.redis, job_id)
    return snapshot if snapshot is not None else record.to_snapshot()


class JobsController(Controller):
    path = "/api/jobs"
    tags = ["jobs"]

    @post(
        "/",
        status_code=HTTP_201_CREATED,
        summary="Submit a Claude Code job",
        responses=error_responses(401, 403, 413),
        guards=[requires("submitter")],
    )
    async def submit(self, data: JobSpec, principal: Principal, jobs: Jobs) -> JobSnapshot:
        """Queue a job for the caller's team. Role ``submitter`` or above."""
        try:
            return await jobs.submit(principal, data)
        except InvalidJob as exc:
            raise ValidationException(str(exc)) from None
        except NotQueued as exc:  # stored, not queued: the row is failed, the client resubmits
            raise unavailable(str(exc)) from None

    @get("/", summary="List the team's jobs, newest first", responses=error_responses(401))
    async def list_jobs(
        self,
        principal: Principal,
        services: Services,
        status: Annotated[str | None, Parameter(description="queued|running|succeeded|failed|cancelled")] = None,
        limit: Annotated[int, Parameter(ge=1, le=200)] = 50,
        cursor: str | None = None,
    ) -> JobPage:
        if status is not None and status not in STATUSES:
            raise ValidationException(f"status: one of {', '.join(STATUSES)}")
        before = _cursor_decode(cursor) if cursor else None
        records = await job_store.list_jobs(
            services.engine, principal.team_id, status=status, limit=limit, before=before
        )
        # Live state comes from Redis; the row is the fallback once it expired.
        async with services.redis.pipeline(transaction=False) as pipe:
            for r in records:
                pipe.hget(snapshot_key(r.id), "s")
            raws = await pipe.execute()
        items = [
            streams.decode_snapshot(raw) if raw else r.to_snapshot() for r, raw in zip(records, raws, strict=True)
        ]
        next_cursor = _cursor_encode(records[-1].created_at, records[-1].id) if len(records) == limit else None
        return JobPage(items=items, nextCursor=next_cursor)

    @get("/{job_id:str}", summary="A job's current state", responses=error_responses(401, 404))
    async def get_job(self, job_id: str, principal: Principal, services: Services) -> JobSnapshot:
        return await load_snapshot(services, job_id, principal.team_id)

    @get("/{job_id:str}/events", summary="The job's retained events, in order", responses=error_responses(401, 404))
    async def events(
        self,
        job_id: str,
        principal: Principal,
        services: Services,
        since: str | None = None,
        limit: Annotated[int, Parameter(ge=1, le=1000)] = 500,
    ) -> EventPage:
        await load_snapshot(services, job_id, principal.team_id)
        if since is not None and not is_event_id(since):
            raise ValidationException("since: an event id like '1700000000000-0'")
        # Redis while it holds the entries, the archive for what it does not.
        cov = await streams.coverage(services.redis, job_id)
        pos = await history.position(services.engine, job_id, since, cov)
        room = room_id(job_id)
        entries = await history.read_page(services.redis, services.engine, job_id, since, count=limit)
        items = [streams.entry_dict(room, eid, fields) for eid, fields in entries]
        return EventPage(items=items, next=items[-1]["id"] if items else since, gap=pos.gap, oldest=pos.oldest)

    @post(
        "/{job_id:str}/cancel",
        status_code=HTTP_202_ACCEPTED,
        summary="Cancel a queued or running job",
        responses=error_responses(401, 403, 404, 409),
    )
    async def cancel(self, job_id: str, principal: Principal, services: Services, jobs: Jobs) -> JobSnapshot:
        """Ask the job to stop. Its submitter, or anyone with role submitter or above."""
        record = await job_store.get_job(services.engine, job_id, principal.team_id) if is_job_id(job_id) else None
        if record is None:
            raise NotFoundException("no such job")
        if record.user_id != principal.user_id:
            require_role(principal, "submitter")
        try:
            return await jobs.cancel(principal, record)
        except NotCancellable as exc:
            raise ClientException(str(exc), status_code=HTTP_409_CONFLICT) from None
