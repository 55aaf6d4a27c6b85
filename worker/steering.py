"""The worker's half of steering: the job's inbox into the CLI's stdin, the CLI's answers back out.

One :class:`Steering` per attempt. It

* writes the prompt as the first stream-json user message;
* reads the job's inbox (:mod:`progress_service.inbox`) every
  ``POLL`` seconds and writes each instruction to stdin as a user message
  whose ``uuid`` is derived from its request id, publishing an
  ``instruction`` event ``queued``; the CLI's echo of that uuid
  (``--replay-user-messages``) is the delivery: an ``instruction`` event
  ``delivered``, whose id the sender gets as its ack;
* turns the CLI's ``control_request`` ``can_use_tool`` lines into
  ``permission`` events ``pending`` and answers them with a
  ``control_response`` when a ``decide`` arrives, or denies them once
  ``PS_PERMISSION_TIMEOUT`` passes unanswered (``expired``);
* closes stdin at the CLI's ``result`` (the job ends with its first
  answer) and closes the inbox: every instruction not echoed by then is
  ``rejected`` with the reason, and the gateway refuses new ones.

Every outcome is written to the job's outcome hash before its event is
published, so a sender waiting on the hash learns it even if it missed the
event.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec
from redis.asyncio import Redis

from progress_service import inbox
from progress_service.events import EventData, EventKind, InstructionData, PermissionData, clip
from progress_service.ids import now_ms
from progress_service.keys import inbox_key, steer_key
from worker.claude import ClaudeProcess, user_message
from worker.outage import REDIS_DOWN, Link

log = logging.getLogger("progress_service.worker.steering")

#: How often the inbox is read (seconds).
POLL = 0.2
#: Namespace of the stdin message uuids (uuid5 of the request id).
_NS = uuid.UUID("6f1f3c9e-4d0b-4e43-9a53-3b1f1d2a7c10")
#: Largest tool input copied into a ``permission`` event (characters of JSON).
INPUT_MAX_CHARS = 8000

#: ``publish(kind, data) -> event id or None`` (the JobRun's publisher).
Publish = Callable[[EventKind, EventData], Awaitable[str | None]]


class _Line(msgspec.Struct):
    """The fields of a stdout line this module looks at."""

    type: str = ""
    uuid: str | None = None
    isReplay: bool = False
    request_id: str | None = None
    request: dict[str, Any] | None = None


_line = msgspec.json.Decoder(_Line)


def message_uuid(request_id: str) -> str:
    """The stdin message uuid of an instruction (stable across retries)."""
    return str(uuid.uuid5(_NS, request_id))


class Steering:
    """Inbox, stdin and permission prompts of one attempt (see the module docstring)."""

    def __init__(self, redis: Redis, job_id: str, proc: ClaudeProcess, publish: Publish, *, timeout: float, ttl: int) -> None:
        self.redis = redis
        self.job_id = job_id
        self.proc = proc
        self.publish = publish
        self.timeout = timeout
        self.ttl = ttl
        self._key = steer_key(job_id)
        self._claim = redis.register_script(inbox.CLAIM)
        self._last = "0-0"
        self._written: dict[str, inbox.InboxItem] = {}  # message uuid -> instruction
        self._prompts: dict[str, tuple[float, PermissionData, dict[str, Any]]] = {}  # id -> (deadline, data, input)
        self._closed = False
        # One reader of the inbox at a time: close() drains it while run() may be mid-batch.
        self._reading = anyio.Lock()
        # An outage is one line when the inbox goes unreadable and one when it is back, not one per poll.
        self._link = Link(f"Redis (job {job_id} inbox)", log)

    async def start(self, prompt: str) -> None:
        """Open the inbox for this attempt and give the CLI its prompt."""
        # The prompt first: a Redis outage here must not hold the CLI back.
        await self.proc.write(user_message(prompt, str(uuid.uuid4())))
        try:
            await self.redis.hdel(self._key, "closed")
        except REDIS_DOWN as exc:
            # The gateway refuses instructions until this attempt's inbox opens; run() goes on.
            log.warning("job %s: could not open the inbox (%r)", self.job_id, exc)

    # -- reading the inbox -----------------------------------------------------

    async def run(self) -> None:
        """Read the inbox and expire unanswered prompts until the CLI takes no more input."""
        while not self._closed:
            try:
                await self._read_inbox()
            except REDIS_DOWN as exc:
                self._link.down(exc)
            else:
                self._link.up()
            await self._expire_prompts()
            await anyio.sleep(POLL)

    async def _read_inbox(self) -> None:
        async with self._reading:
            await self._read_batch()

    async def _read_batch(self) -> None:
        reply = await self.redis.xread({inbox_key(self.job_id): self._last}, count=100)
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                self._last = inbox.text_of(entry_id)
                raw = fields.get(b"b") or fields.get("b")
                if raw is None:
                    continue
                try:
                    item = inbox.decode_item(raw)
                except msgspec.DecodeError:
                    log.error("job %s: unreadable inbox entry %s", self.job_id, self._last)
                    continue
                if item.kind == "instruct":
                    await self._instruct(item)
                else:
                    await self._decide(item)

    async def _instruct(self, item: inbox.InboxItem) -> None:
        current = inbox.decode_outcome(await self.redis.hget(self._key, f"i:{item.requestId}"))  # REDIS_DOWN: run() retries
        if current is None or current.state != "queued":
            return  # already delivered or rejected (an earlier attempt's entry)
        if self._closed:
            await self._reject(item, "the run ended before the CLI took it")
            return
        await self.publish("instruction", InstructionData(requestId=item.requestId, by=item.by, text=item.text, state="queued"))
        muid = message_uuid(item.requestId)
        self._written[muid] = item
        if not await self.proc.write(user_message(item.text, muid)):
            self._written.pop(muid, None)
            await self._reject(item, "the CLI no longer takes input")

    async def _outcome(self, item: inbox.InboxItem, data: InstructionData) -> None:
        # The event first (its id is the ack), then the outcome a waiting sender polls.
        event_id = await self.publish("instruction", data)
        outcome = inbox.Outcome(state=data.state, reason=data.reason, by=item.by, text=item.text, eventId=event_id)
        await self._hset(f"i:{item.requestId}", inbox.encode(outcome))

    async def _hset(self, field: str, value: bytes) -> None:
        """Write an outcome; a Redis outage is logged, never ends the run (the CLI goes on)."""
        try:
            await self.redis.hset(self._key, field, value)
            await self.redis.expire(self._key, self.ttl)
        except REDIS_DOWN as exc:
            log.warning("job %s: could not record %s (%r)", self.job_id, field, exc)

    async def _reject(self, item: inbox.InboxItem, reason: str) -> None:
        data = InstructionData(requestId=item.requestId, by=item.by, text=item.text, state="rejected", reason=reason)
        await self._outcome(item, data)

    # -- what the CLI prints ---------------------------------------------------

    async def on_stdout(self, data: bytes) -> None:
        """Look at one stdout line: an echo of an instruction, a permission prompt, the result."""
        if b'"isReplay"' not in data and b'"control_request"' not in data and b'"result"' not in data:
            return
        try:
            line = _line.decode(data)
        except msgspec.DecodeError:
            return
        if line.type == "user" and line.isReplay and line.uuid in self._written:
            item = self._written.pop(line.uuid)
            await self._outcome(item, InstructionData(requestId=item.requestId, by=item.by, text=item.text, state="delivered"))
        elif line.type == "control_request" and line.request and line.request.get("subtype") == "can_use_tool":
            await self._prompt(line.request_id or "", line.request)
        elif line.type == "result":
            await self.close("the run ended before the CLI took it")

    async def _prompt(self, permission_id: str, request: dict[str, Any]) -> None:
        tool_input = request.get("input") if isinstance(request.get("input"), dict) else {}
        shown = tool_input if len(msgspec.json.encode(tool_input)) <= INPUT_MAX_CHARS else {"truncated": clip(str(tool_input), INPUT_MAX_CHARS)}
        data = PermissionData(
            permissionId=permission_id, tool=str(request.get("tool_name") or "tool"), state="pending", input=shown,
            stepId=request.get("tool_use_id") if isinstance(request.get("tool_use_id"), str) else None,
            expiresAt=now_ms() + int(self.timeout * 1000),
        )
        self._prompts[permission_id] = (anyio.current_time() + self.timeout, data, tool_input or {})
        await self._hset(f"p:{permission_id}", inbox.encode(inbox.Outcome(state="pending")))
        await self.publish("permission", data)

    async def _decide(self, item: inbox.InboxItem) -> None:
        prompt = self._prompts.pop(item.permissionId or "", None)
        if prompt is None:
            # Not pending here any more (the run ended): the sender is told so.
            gone = inbox.Outcome(state="rejected", reason="the prompt is no longer pending", by=item.by)
            await self._hset(f"d:{item.requestId}", inbox.encode(gone))
            return
        _deadline, data, tool_input = prompt
        if item.allow:
            response: dict[str, Any] = {"behavior": "allow", "updatedInput": tool_input}
            state = "allowed"
        else:
            response = {"behavior": "deny", "message": item.message or f"denied by {item.by}"}
            state = "denied"
        await self._answer(data.permissionId, response)
        event_id = await self.publish("permission", msgspec.structs.replace(
            data, state=state, by=item.by, message=item.message, expiresAt=None, input=None,
        ))
        await self._hset(f"d:{item.requestId}", inbox.encode(inbox.Outcome(state=state, by=item.by, eventId=event_id)))

    async def _expire_prompts(self) -> None:
        now = anyio.current_time()
        for permission_id, (deadline, data, _input) in list(self._prompts.items()):
            if now < deadline:
                continue
            expired = inbox.Outcome(state="expired")
            try:
                claimed = await self._claim(keys=[self._key], args=[f"p:{permission_id}", inbox.encode(expired)])
            except REDIS_DOWN:
                return
            if not claimed:
                continue  # an answer won the race; it is in the inbox
            self._prompts.pop(permission_id, None)
            reason = f"no answer within {self.timeout:g}s"
            await self._answer(permission_id, {"behavior": "deny", "message": reason})
            await self.publish("permission", msgspec.structs.replace(
                data, state="expired", message=reason, expiresAt=None, input=None,
            ))

    async def _answer(self, permission_id: str, response: dict[str, Any]) -> None:
        line = {"type": "control_response", "response": {"subtype": "success", "request_id": permission_id, "response": response}}
        await self.proc.write(msgspec.json.encode(line) + b"\n")

    # -- the end -----------------------------------------------------------------

    async def close(self, reason: str) -> None:
        """No more input: close stdin and the inbox, reject what was not delivered. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self.proc.close_stdin()
        await self._hset("closed", b"1")
        # What got into the inbox before it closed is rejected here; the
        # gateway refuses what comes after.
        try:
            await self._read_inbox()
        except REDIS_DOWN as exc:
            log.warning("job %s: could not drain the inbox (%r)", self.job_id, exc)
        for item in list(self._written.values()):
            await self._reject(item, reason)
        self._written.clear()
        for permission_id, (_deadline, data, _input) in list(self._prompts.items()):
            await self._hset(f"p:{permission_id}", inbox.encode(inbox.Outcome(state="expired")))
            await self.publish("permission", msgspec.structs.replace(
                data, state="expired", message=reason, expiresAt=None, input=None,
            ))
        self._prompts.clear()
