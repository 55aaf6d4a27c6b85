"""Steering, gateway side: who may instruct a running job or answer its permission prompts, and how.

One :class:`Steering` per process (``Services.steering``); the WebSocket
(``steer`` / ``decide``) and the HTTP API (``POST /api/jobs/{id}/instructions``,
``POST /api/jobs/{id}/permissions/{permissionId}``) both call it. The order
copies the comment flow's guarantees:

1. authorization: the job's own submitter, anyone with the role
   ``submitter`` or above, and reviewers when the job was submitted with
   ``steerable: "reviewers"`` (else :class:`SteerRefusal` ``forbidden``);
   text normalized like a comment's (``comments.normalize_text``);
2. the job must be running with a live worker (else ``not_running`` /
   ``worker_gone``, before anything is written);
3. the audit record (``job.instruct`` / ``permission.decide``) is written
   and durable before the item can reach the worker;
4. one script (``inbox.ENQUEUE`` / ``inbox.DECIDE``) records the request id
   and appends to the job's inbox, rechecking the run state: a retry with
   the same request id finds its outcome and enqueues nothing;
5. the caller waits (``PS_STEER_ACK_TIMEOUT``) for the worker's outcome:
   an instruction is acked with the id of its ``instruction`` event
   ``delivered`` only once the CLI echoed it; an answer with the id of its
   ``permission`` event.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from progress_service import inbox
from progress_service.comments import normalize_text
from progress_service.events import INSTRUCTION_MAX_CHARS, STEER_STATES, SteerResult, SteerState
from progress_service.errors import InvalidComment, SteerRefusal
from progress_service.ids import room_id
from progress_service.keys import lease_key, run_key, steer_key
from progress_service.store import audit
from progress_service.store.jobs import JobRecord, get_job

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from sqlalchemy.ext.asyncio import AsyncEngine
    from progress_service.settings import Settings
    from progress_service.store.identity import Principal

log = logging.getLogger("progress_service.steering")

__all__ = ["Steering", "may_steer"]

#: How often a waiting sender reads its outcome (seconds).
WAIT_POLL = 0.1


def _result(request_id: str, outcome: inbox.Outcome) -> SteerResult:
    """The answer for a final outcome; one still in flight (``reserved``) reads ``queued``."""
    state: SteerState = next((s for s in STEER_STATES if s == outcome.state), "queued")
    return SteerResult(requestId=request_id, state=state, eventId=outcome.eventId)


def may_steer(principal: Principal, record: JobRecord) -> bool:
    """Whether ``principal`` may instruct ``record``'s job and answer its prompts."""
    if principal.user_id == record.user_id or principal.at_least("submitter"):
        return True
    return record.spec.steerable == "reviewers" and principal.at_least("reviewer")


class Steering:
    """Instructions and permission answers (see the module docstring)."""

    def __init__(self, engine: AsyncEngine, redis: Redis, settings: Settings) -> None:
        self.engine = engine
        self.redis = redis
        self.settings = settings
        self._enqueue = redis.register_script(inbox.ENQUEUE)
        self._decide = redis.register_script(inbox.DECIDE)

    async def _job(self, principal: Principal, job_id: str) -> JobRecord:
        record = await get_job(self.engine, job_id, principal.team_id)
        if record is None:
            raise SteerRefusal("not_found", "no such job")
        if not may_steer(principal, record):
            who = "its submitter, role submitter or above, or reviewers when it was submitted steerable by reviewers"
            raise SteerRefusal("forbidden", f"only {who} may steer this job; you are '{principal.role}'")
        if record.kind == "session":
            raise SteerRefusal("not_running", "a Claude Code session reported through hooks cannot be steered from here")
        return record

    async def instruct(self, principal: Principal, job_id: str, request_id: str, text: str) -> SteerResult:
        """Send an instruction to the job's CLI; returns once it was delivered, rejected, or the wait ran out."""
        try:
            text = normalize_text(text, INSTRUCTION_MAX_CHARS)
        except InvalidComment as exc:
            raise SteerRefusal("invalid", str(exc)) from None
        try:
            await self._job(principal, job_id)
            field = f"i:{request_id}"
            key = steer_key(job_id)
            known = inbox.decode_outcome(await self.redis.hget(key, field))
            if known is None:
                await self._check_running(job_id)
                # The request id is reserved before the audit record: a
                # duplicate arriving meanwhile waits for this one's outcome.
                reservation = inbox.Outcome(state="reserved", by=principal.user_name, text=text)
                if await self.redis.hsetnx(key, field, inbox.encode(reservation)):
                    await self.redis.expire(key, self.settings.events_ttl)
                    await self._first_instruct(principal, job_id, request_id, field, text)
                else:
                    known = inbox.decode_outcome(await self.redis.hget(key, field))
            if known is not None and known.text is not None and known.text != text:
                raise SteerRefusal("invalid", "requestId: already used for a different instruction on this job")
            outcome = await self._wait(job_id, field)
        except (RedisError, SQLAlchemyError, OSError, TimeoutError) as exc:
            log.warning("steer %s: %r", job_id, exc)
            raise SteerRefusal("unavailable", "the instruction was not stored; retry with the same request id") from None
        if outcome.state == "rejected":
            raise SteerRefusal("rejected", outcome.reason or "the instruction was not delivered")
        return _result(request_id, outcome)

    async def _first_instruct(self, principal: Principal, job_id: str, request_id: str, field: str, text: str) -> None:
        """Audit, then enqueue, a reserved instruction; the reservation goes when either fails or is refused."""
        try:
            await self._audit(
                action="job.instruct", team_id=principal.team_id, actor=principal.user_name,
                room_id=room_id(job_id), detail={"requestId": request_id, "text": text},
            )
            item = inbox.InboxItem(kind="instruct", requestId=request_id, by=principal.user_name, text=text)
            queued = inbox.Outcome(state="queued", by=principal.user_name, text=text)
            verdict, detail = await self._enqueue(
                keys=inbox.keys(job_id),
                args=[field, inbox.encode(queued), inbox.encode(item), inbox.INBOX_MAXLEN, self.settings.events_ttl],
            )
            self._refused(inbox.text_of(verdict), inbox.text_of(detail))
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.redis.hdel(steer_key(job_id), field)
            raise

    async def decide(
        self, principal: Principal, job_id: str, request_id: str, permission_id: str, allow: bool, message: str | None
    ) -> SteerResult:
        """Answer a pending permission prompt; the first answer wins."""
        if message is not None:
            try:
                message = normalize_text(message, 2000)
            except InvalidComment as exc:
                raise SteerRefusal("invalid", f"message: {exc}") from None
        try:
            await self._job(principal, job_id)
            key = steer_key(job_id)
            answer_field = f"d:{request_id}"
            if await self.redis.hget(key, answer_field) is None:
                prompt = inbox.decode_outcome(await self.redis.hget(key, f"p:{permission_id}"))
                if prompt is None:
                    raise SteerRefusal("not_found", f"no permission prompt {permission_id} on this job")
                if prompt.state != "pending":
                    raise SteerRefusal("already_decided", f"permission {permission_id} is already {prompt.state}")
                await self._check_running(job_id)
                await self._audit(
                    action="permission.decide", team_id=principal.team_id, actor=principal.user_name,
                    room_id=room_id(job_id),
                    detail={"requestId": request_id, "permissionId": permission_id, "allow": allow, "message": message},
                )
                state = "allowed" if allow else "denied"
                decided = inbox.Outcome(state=state, by=principal.user_name, allow=allow)
                item = inbox.InboxItem(
                    kind="decide", requestId=request_id, by=principal.user_name, permissionId=permission_id,
                    allow=allow, message=message,
                )
                verdict, detail = await self._decide(
                    keys=inbox.keys(job_id),
                    args=[f"p:{permission_id}", inbox.encode(decided), inbox.encode(item), inbox.INBOX_MAXLEN,
                          self.settings.events_ttl, answer_field],
                )
                verdict, detail = inbox.text_of(verdict), inbox.text_of(detail)
                if verdict == "decided":
                    current = inbox.decode_outcome(detail)
                    raise SteerRefusal("already_decided", f"permission {permission_id} is already {current.state if current else 'decided'}")
                if verdict == "unknown":
                    raise SteerRefusal("not_found", f"no permission prompt {permission_id} on this job")
                self._refused(verdict, detail)
            outcome = await self._wait(job_id, answer_field, need_event=True)
        except (RedisError, SQLAlchemyError, OSError, TimeoutError) as exc:
            log.warning("decide %s: %r", job_id, exc)
            raise SteerRefusal("unavailable", "the answer was not stored; retry with the same request id") from None
        if outcome.state == "rejected":
            raise SteerRefusal("rejected", outcome.reason or "the answer did not reach the CLI")
        return _result(request_id, outcome)

    async def _audit(self, *, action: str, team_id: str, actor: str, room_id: str, detail: dict[str, object]) -> None:
        """The durable audit record, within ``store_timeout`` (past it: ``unavailable``, nothing sent)."""
        with anyio.fail_after(self.settings.store_timeout):
            await audit.record(self.engine, action=action, team_id=team_id, actor=actor, room_id=room_id, detail=detail)

    async def _check_running(self, job_id: str) -> None:
        """Refuse before the audit record when the job cannot take input (the script checks again)."""
        # ``closed`` matters here: the worker closes the inbox when its CLI
        # exits, before it publishes the final status and marks the run done,
        # so a sender who saw the job end is refused before any audit record.
        raw = await self.redis.hget(run_key(job_id), "state")
        state = inbox.text_of(raw) if raw is not None else ""
        if state != "running":
            self._refused("not_running", state)
        elif await self.redis.hexists(steer_key(job_id), "closed"):
            self._refused("closed", "")
        elif not await self.redis.exists(lease_key(job_id)):
            self._refused("worker_gone", "")

    @staticmethod
    def _refused(verdict: str, detail: str) -> None:
        if verdict in ("ok", "dup"):
            return
        if verdict == "not_running":
            raise SteerRefusal("not_running", f"the job is not running ({detail or 'not started or finished'}); nothing was sent")
        if verdict == "closed":
            raise SteerRefusal("not_running", "the job's run has ended; nothing was sent")
        if verdict == "worker_gone":
            raise SteerRefusal("worker_gone", "the job's worker is gone (it will be retried); nothing was sent")
        raise SteerRefusal("unavailable", f"unexpected inbox verdict {verdict!r}")

    async def _wait(self, job_id: str, field: str, *, need_event: bool = False) -> inbox.Outcome:
        """Poll the outcome until the worker decided it, or ``steer_ack_timeout`` passes (then ``queued``)."""
        key = steer_key(job_id)
        last = inbox.Outcome(state="queued")
        with anyio.move_on_after(self.settings.steer_ack_timeout):
            while True:
                current = inbox.decode_outcome(await self.redis.hget(key, field))
                if current is not None:
                    last = current
                    if need_event:
                        done = current.eventId is not None or current.state == "rejected"
                    else:
                        done = current.state not in ("queued", "reserved")
                    if done:
                        return current
                await anyio.sleep(WAIT_POLL)
        return last if need_event else inbox.Outcome(state="queued", by=last.by, text=last.text)
