"""Job rows: the durable record of each job (spec, final state, result)."""

from __future__ import annotations

from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from progress_service.events import JobKind, JobSnapshot, JobSpec, JobStatus, Phase, ResultData
from progress_service.store.db import first_row, of_team
from progress_service.store.schema import jobs, users

_enc = msgspec.json.Encoder()
_spec_dec = msgspec.json.Decoder(JobSpec)
_snap_dec = msgspec.json.Decoder(JobSnapshot)
_result_dec = msgspec.json.Decoder(ResultData)


class JobRecord(msgspec.Struct, kw_only=True):
    id: str
    team_id: str
    user_id: str
    user_name: str | None
    spec: JobSpec
    status: JobStatus
    phase: Phase
    reason: str | None
    result: ResultData | None
    snapshot: JobSnapshot | None
    cost_usd: float | None
    attempt: int
    demo: bool
    created_at: int
    started_at: int | None
    finished_at: int | None
    #: "job" or "session" (see ``events.JobKind``); source/host for sessions.
    kind: JobKind = "job"
    source: str | None = None
    host: str | None = None

    def to_snapshot(self) -> JobSnapshot:
        """The job's last known state; the stored snapshot when the job kept one."""
        if self.snapshot is not None:
            return self.snapshot
        return JobSnapshot(
            id=self.id,
            roomId=f"job:{self.id}",
            status=self.status,
            phase=self.phase,
            costUsd=self.cost_usd,
            result=self.result,
            reason=self.reason,
            attempt=self.attempt,
            demo=self.demo,
            prompt=self.spec.prompt,
            model=self.spec.model,
            workdir=self.spec.workdir or "",
            createdAt=self.created_at,
            startedAt=self.started_at,
            finishedAt=self.finished_at,
            submittedBy=self.user_name,
            kind=self.kind,
        )


def _record(row: Any) -> JobRecord:
    return JobRecord(
        id=row.id,
        team_id=row.team_id,
        user_id=row.user_id,
        user_name=row.user_name,
        spec=_spec_dec.decode(row.spec),
        status=row.status,
        phase=row.phase,
        reason=row.reason,
        result=_result_dec.decode(row.result) if row.result else None,
        snapshot=_snap_dec.decode(row.snapshot) if row.snapshot else None,
        cost_usd=row.cost_usd,
        attempt=row.attempt,
        demo=bool(row.demo),
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        kind=row.kind,
        source=row.source,
        host=row.host,
    )


_select = sa.select(jobs, users.c.name.label("user_name")).select_from(
    jobs.outerjoin(users, users.c.id == jobs.c.user_id)
)


async def create_job(
    engine: AsyncEngine,
    *,
    job_id: str,
    team_id: str,
    user_id: str,
    spec: JobSpec,
    created_at: int,
    demo: bool,
    kind: str = "job",
    source: str | None = None,
    host: str | None = None,
    status: str = "queued",
    phase: str = "queued",
    snapshot: JobSnapshot | None = None,
) -> None:
    """Insert a new job: queued for a worker, or (``kind="session"``) one reported from elsewhere."""
    async with engine.begin() as conn:
        await conn.execute(
            sa.insert(jobs).values(
                id=job_id,
                team_id=team_id,
                user_id=user_id,
                spec=_enc.encode(spec).decode(),
                status=status,
                phase=phase,
                created_at=created_at,
                demo=demo,
                kind=kind,
                source=source,
                host=host,
                snapshot=_enc.encode(snapshot).decode() if snapshot is not None else None,
                started_at=snapshot.startedAt if snapshot is not None else None,
            )
        )


async def get_job(engine: AsyncEngine, job_id: str, team_id: str | None = None) -> JobRecord | None:
    """A job by id; with ``team_id``, only if it belongs to that team."""
    row = await first_row(engine, of_team(_select.where(jobs.c.id == job_id), jobs.c.team_id, team_id))
    return _record(row) if row else None


async def job_team(engine: AsyncEngine, job_id: str) -> str | None:
    """The team id of a job, or None when there is no such job (one indexed lookup either way)."""
    async with engine.connect() as conn:
        return await conn.scalar(sa.select(jobs.c.team_id).where(jobs.c.id == job_id))


async def list_jobs(
    engine: AsyncEngine,
    team_id: str,
    *,
    status: str | None = None,
    limit: int = 50,
    before: tuple[int, str] | None = None,
) -> list[JobRecord]:
    """The team's jobs, newest first; ``before`` is a (created_at, id) cursor."""
    query = _select.where(jobs.c.team_id == team_id)
    if status:
        query = query.where(jobs.c.status == status)
    if before:
        created, jid = before
        query = query.where(
            sa.or_(jobs.c.created_at < created, sa.and_(jobs.c.created_at == created, jobs.c.id < jid))
        )
    query = query.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [_record(r) for r in rows]


async def update_job(engine: AsyncEngine, job_id: str, *, snapshot: JobSnapshot | None = None, **values: Any) -> None:
    """Update columns of a job row; ``snapshot`` also fills its derived columns."""
    if snapshot is not None:
        values.setdefault("status", snapshot.status)
        values.setdefault("phase", snapshot.phase)
        values.setdefault("reason", snapshot.reason)
        values.setdefault("cost_usd", snapshot.costUsd)
        values.setdefault("attempt", snapshot.attempt)
        values.setdefault("started_at", snapshot.startedAt)
        values.setdefault("finished_at", snapshot.finishedAt)
        if snapshot.result is not None:
            values.setdefault("result", _enc.encode(snapshot.result).decode())
        values["snapshot"] = _enc.encode(snapshot).decode()
    if not values:
        return
    async with engine.begin() as conn:
        await conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(**values))


async def jobs_in_status(engine: AsyncEngine, statuses: list[str]) -> list[JobRecord]:
    """Every worker job currently in one of ``statuses`` (for recovery sweeps).

    Session jobs are left out: no worker runs them, so no lease can be lost.
    """
    query = _select.where(jobs.c.status.in_(statuses), jobs.c.kind == "job")
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [_record(r) for r in rows]
