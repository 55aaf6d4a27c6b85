"""A job's log as a CI log reads it: one step in full, the raw log download, the spec to run again.

``GET /api/jobs/{id}/steps/{stepId}`` merges a step's ``started`` event (its
input) with its ``ok``/``error`` event (its output) per attempt, so a page can
show a step's whole stored text without holding every output in memory.
``GET /api/jobs/{id}/log.jsonl`` streams the job's retained events, one JSON
object a line, for download. ``GET /api/jobs/{id}/spec`` returns what was
submitted, so "run again" posts the same spec to ``POST /api/jobs``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Controller, get
from litestar.exceptions import NotFoundException
from litestar.response import Stream

from progress_service import history, streams
from progress_service.api.deps import error_responses
from progress_service.api.jobs import load_snapshot
from progress_service.events import JobSpec, StepData
from progress_service.ids import room_id
from progress_service.services import Services
from progress_service.store import jobs as job_store
from progress_service.store.identity import Principal

STEP_ID_RE = re.compile(r"^[A-Za-z0-9_:.-]{1,200}$")
#: Stream entries read per XRANGE while scanning a job's log.
_PAGE = 1000
_body_dec = msgspec.json.Decoder()


class StepDetail(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One step of one attempt: its input, its final state and output."""

    attempt: int
    startedAt: int | None = None
    finishedAt: int | None = None
    step: StepData


class StepDetails(msgspec.Struct, kw_only=True):
    stepId: str
    #: One entry per attempt that ran the step (a restarted job repeats it).
    attempts: list[StepDetail]


async def iter_entries(services: Services, job_id: str) -> AsyncIterator[tuple[str, dict[bytes, bytes]]]:
    """Every stream entry of a job, oldest first, in pages: from Redis and the archive (``history.read_page``)."""
    since: str | None = None
    while True:
        entries = await history.read_page(services.redis, services.engine, job_id, since, count=_PAGE)
        for eid, fields in entries:
            yield (eid.decode() if isinstance(eid, bytes) else eid), fields
        if len(entries) < _PAGE:
            return
        last = entries[-1][0]
        since = last.decode() if isinstance(last, bytes) else last


def merge_step(found: dict[int, StepDetail], attempt: int, at: int, data: dict[str, Any]) -> None:
    """Fold one step event into the per-attempt detail (input kept from ``started``)."""
    step = msgspec.convert(data, StepData)
    prior = found.get(attempt)
    if prior is None or step.state == "started":
        found[attempt] = StepDetail(attempt=attempt, startedAt=at if step.state == "started" else None, step=step)
        return
    if step.input is None and prior.step.input is not None:
        step = msgspec.structs.replace(step, input=prior.step.input)
    found[attempt] = StepDetail(attempt=attempt, startedAt=prior.startedAt, finishedAt=at, step=step)


class JobLogController(Controller):
    path = "/api/jobs/{job_id:str}"
    tags = ["jobs"]

    @get("/steps/{step_id:str}", summary="One step's input and output, per attempt", responses=error_responses(401, 404))
    async def step(self, job_id: str, step_id: str, principal: Principal, services: Services) -> StepDetails:
        """The step's stored input and output (clipped only at the event bounds)."""
        await load_snapshot(services, job_id, principal.team_id)
        if not STEP_ID_RE.match(step_id):
            raise NotFoundException("no such step")
        needle = f'"stepId":"{step_id}"'.encode()
        found: dict[int, StepDetail] = {}
        async for _eid, fields in iter_entries(services, job_id):
            body = fields.get(b"b", b"")
            # Cheap byte test first: most entries are other steps.
            if fields.get(b"t") == b"chat" or needle not in body:
                continue
            event = _body_dec.decode(body)
            if event.get("kind") == "step" and event.get("data", {}).get("stepId") == step_id:
                merge_step(found, int(event.get("attempt", 1)), int(event.get("at", 0)), event["data"])
        if not found:
            raise NotFoundException("no such step in the retained log")
        return StepDetails(stepId=step_id, attempts=[found[a] for a in sorted(found)])

    @get("/log.jsonl", summary="Download the job's events as JSON lines", responses=error_responses(401, 404))
    async def raw_log(self, job_id: str, principal: Principal, services: Services) -> Stream:
        """The retained events and comments, one protocol message per line."""
        await load_snapshot(services, job_id, principal.team_id)
        room = room_id(job_id)

        async def lines() -> AsyncIterator[bytes]:
            async for eid, fields in iter_entries(services, job_id):
                yield streams.wire_bytes(room, eid, fields) + b"\n"

        return Stream(
            lines(),
            media_type="application/x-ndjson",
            headers={"Content-Disposition": f'attachment; filename="job-{job_id}.jsonl"', "Cache-Control": "no-store"},
        )

    @get("/spec", summary="The spec the job was submitted with", responses=error_responses(401, 404))
    async def spec(self, job_id: str, principal: Principal, services: Services) -> JobSpec:
        """Post it to ``POST /api/jobs`` to run the job again."""
        await load_snapshot(services, job_id, principal.team_id)
        record = await job_store.get_job(services.engine, job_id, principal.team_id)
        if record is None:
            raise NotFoundException("no such job")
        return record.spec
