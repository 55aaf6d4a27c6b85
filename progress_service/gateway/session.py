"""One WebSocket connection's protocol state machine.

A connection costs as little as possible while it is idle (thousands are):

- the ASGI task itself runs the receiver (decodes and handles client
  messages one at a time, in order) inside a cancel scope;
- one sender task drains the outbox;
- no timer task: the auth timeout, the application heartbeat and the
  credential expiry are one ``loop.call_at`` handle at a time, re-armed by
  its own callback (the event loop's heap is the process-wide timer wheel).

Whatever decides that the connection must end calls
:meth:`Session.request_close`; it cancels the receiver's scope, and ``run``
stops the sender, leaves the rooms and sends the close frame, with a
timeout, exactly once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import msgspec
from litestar import WebSocket
from litestar.exceptions import WebSocketDisconnect
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from progress_service import history, metrics, outage, streams
from progress_service.auth import authenticate, cached_principal
from progress_service.errors import CommentForbidden, CommentsUnavailable, SendTimeout, SteerRefusal
from progress_service.events import (
    Ack,
    AuthOk,
    ClientAuth,
    ClientChat,
    ClientDecide,
    ClientSteer,
    ClientJoin,
    ClientLeave,
    ClientMessage,
    ClientPing,
    ErrorMsg,
    Heartbeat,
    JobSnapshot,
    LeftMsg,
    Pong,
    PresenceMember,
    SteerResult,
)
from progress_service import closes
from progress_service.closes import Close
from progress_service.gateway.hub import Member
from progress_service.gateway.limits import TokenBucket, WindowBudget, json_too_deep
from progress_service.gateway.outbox import Outbox
from progress_service.gateway.subscription import announce, resume_point
from progress_service.ids import job_id_of, now_ms
from progress_service.store.identity import Principal, token_revoked
from progress_service.store.jobs import JobRecord, get_job

if TYPE_CHECKING:
    from progress_service.gateway import Gateway
    from progress_service.settings import Settings

log = logging.getLogger("progress_service.gateway.session")

#: The one decoder of client messages (a strict tagged union).
client_decoder = msgspec.json.Decoder(ClientMessage)
_enc = msgspec.json.Encoder()

#: Control characters other than tab and newline are refused in chat text.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
#: Window (s) in which more than ``ws_chat_burst`` rate-limited chats close 4429.
ABUSE_WINDOW = 10.0
_STORE_ERRORS = (RedisError, SQLAlchemyError, OSError, TimeoutError)


class CommentsHook(Protocol):
    """The gateway's chat hook (:class:`progress_service.comments.Comments`).

    ``post`` stores the comment and its audit record, appends it to the job
    stream (so the hub broadcasts it) and returns its event id; the same
    ``(room, user, request_id)`` returns the same id without a second copy.
    """

    async def post(self, principal: Principal, room_id: str, job_id: str, request_id: str, text: str) -> str: ...


class SteeringHook(Protocol):
    """The gateway's steering hook (:class:`progress_service.steering.Steering`).

    Both return a result with the event id once the CLI took the input (or
    without one when the wait ran out) and raise a :class:`SteerRefusal`
    (``code``, ``message``) when it was refused.
    """

    async def instruct(self, principal: Principal, job_id: str, request_id: str, text: str) -> SteerResult: ...

    async def decide(
        self, principal: Principal, job_id: str, request_id: str, permission_id: str, allow: bool, message: str | None
    ) -> SteerResult: ...


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def encode(message: Any) -> tuple[str, int]:
    """A server message as text plus its encoded size in bytes."""
    raw = _enc.encode(message)
    return raw.decode(), len(raw)


#: Comments of one connection being stored at once; the receiver waits past this.
CHATS_IN_FLIGHT = 32

class Session:
    """The state of one authenticated (or authenticating) connection."""

    __slots__ = (
        "_chat_abuse",
        "_chat_bucket",
        "_chats",
        "_done",
        "_errors",
        "_greeted",
        "_scope",
        "_sender",
        "_timer",
        "close_with",
        "closing",
        "counted_for",
        "expires_at",
        "finished",
        "gateway",
        "id",
        "outbox",
        "peer_gone",
        "principal",
        "rooms",
        "socket",
    )

    def __init__(self, gateway: Gateway, socket: WebSocket) -> None:
        self.gateway = gateway
        self.socket = socket
        self.id = uuid.uuid4().hex[:16]
        self.principal: Principal | None = None
        #: The user this connection is counted for in the per-user cap.
        self.counted_for: str | None = None
        self.expires_at = 0  # epoch ms
        self.rooms: dict[str, Member] = {}
        self.outbox = Outbox(
            gateway.settings.ws_outbox_bytes,
            on_overflow=self._overflowed,
            window=gateway.write_window,
            stats=gateway.outbox_stats,
        )
        # Limits are made on first use: most connections never chat nor err.
        self._chat_bucket: TokenBucket | None = None
        self._chat_abuse: WindowBudget | None = None
        #: Comments being stored (``_post`` tasks), made on first use.
        self._chats: set[asyncio.Task[None]] | None = None
        self._errors: WindowBudget | None = None
        self.close_with: Close | None = None
        self.peer_gone = False
        #: Set once by the first :meth:`request_close`.
        self.closing = False
        #: Set when ``run`` has cleaned up.
        self.finished = False
        #: The first client message arrived (the auth timeout no longer applies).
        self._greeted = False
        self._scope: anyio.CancelScope | None = None
        self._sender: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._done: anyio.Event | None = None

    @property
    def settings(self) -> Settings:
        """The service settings (kept on the gateway, not per connection)."""
        return self.gateway.settings

    # ----------------------------------------------------------- lifetime

    def request_close(self, close: Close | None) -> None:
        """End the connection with ``close`` (None: the peer is gone). First caller wins."""
        if self.closing:
            return
        if close is None:
            self.peer_gone = True
        elif close.audited:
            self.audit("ws.closed", code=close.code, reason=close.reason)
        self.close_with = close
        self.closing = True
        if self._scope is not None:
            self._scope.cancel()

    async def wait_done(self) -> None:
        """Wait until ``run`` has cleaned up (rooms left, close frame sent)."""
        if self.finished:
            return
        if self._done is None:
            self._done = anyio.Event()
        await self._done.wait()

    def audit(self, action: str, *, room_id: str | None = None, **detail: object) -> None:
        """Queue a security record (never blocks; never carries a credential)."""
        audit = self.gateway.audit
        if audit is None:
            return
        principal = self.principal
        client = self.socket.scope.get("client")
        audit.record_nowait(
            action=action,
            team_id=principal.team_id if principal else None,
            actor=principal.user_name if principal else None,
            room_id=room_id,
            detail={"connectionId": self.id, "peer": client[0] if client else None, **detail},
        )

    def _overflowed(self) -> None:
        self.request_close(closes.SLOW_CONSUMER)

    async def run(self) -> None:
        """Serve the connection until it closes, then clean up."""
        metrics.ws_connections.inc()
        self.gateway.register(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(loop.time() + self.settings.ws_auth_timeout, self._on_timer)
        try:
            self._sender = asyncio.create_task(self._send_loop())
            with anyio.CancelScope() as scope:
                self._scope = scope
                if not self.closing:
                    await self._guarded(self._receive_loop)
        finally:
            self._scope = None
            with anyio.CancelScope(shield=True):
                await self._teardown()
            metrics.ws_connections.dec()
            self.finished = True
            if self._done is not None:
                self._done.set()

    async def _guarded(self, fn: Any) -> None:
        try:
            await fn()
        except Exception as exc:
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        """An exception no handler expected: log it and close 1011."""
        dependency = outage.classify(exc)
        if dependency is None:
            log.exception("gateway: session %s failed", self.id)
        else:  # an outage no handler expected: 1011 (retry), one line, not a traceback
            outage.warn(dependency, "a WebSocket session", exc)
        self.request_close(closes.INTERNAL)

    async def _teardown(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.cancel()
            await asyncio.wait((sender,))
        if self._chats:
            for task in self._chats:
                task.cancel()
            await asyncio.wait(self._chats)
        if not self.closing:  # the receiver ended without a decision (cancelled from outside)
            self.request_close(None)
        for job_id, member in list(self.rooms.items()):
            self._forget_room(job_id, member)
        self.gateway.unregister(self)
        close = self.close_with
        if close is not None and not self.peer_gone:
            metrics.ws_closes.labels(str(close.code)).inc()
            timeout = self.settings.ws_send_timeout
            if close.flush:
                await self.outbox.flush(self._send_text, min(timeout, 2.0))
            self.outbox.close()
            with anyio.move_on_after(timeout):
                try:
                    await self.socket.close(code=close.code, reason=close.reason)
                except (OSError, WebSocketDisconnect, RuntimeError):
                    pass
        self.outbox.close()

    def _forget_room(self, job_id: str, member: Member) -> None:
        self.rooms.pop(job_id, None)
        self.gateway.hub.remove(job_id, member)
        if self.principal is not None:
            self.gateway.presence.leave(job_id, self.id, self.principal)

    async def _send_text(self, text: str) -> None:
        await self.socket.send({"type": "websocket.send", "text": text})

    async def _send_loop(self) -> None:
        try:
            await self.outbox.pump(self._send_text, self.settings.ws_send_timeout)
        except SendTimeout:
            self.request_close(closes.SLOW_CONSUMER)
        except (OSError, WebSocketDisconnect, RuntimeError):
            # uvicorn's ClientDisconnected is an OSError: the peer vanished
            self.request_close(None)
        except Exception as exc:  # as _guarded does, without its frame held by every idle connection
            self._failed(exc)

    # ----------------------------------------------------------- timers

    def _arm(self, due: float | None = None) -> None:
        """(Re)schedule the one timer of an authenticated connection: heartbeat or expiry."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        if self.closing:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if due is None:
            due = self.outbox.last_sent + self.settings.ws_heartbeat
        expiry = now + (self.expires_at - now_ms()) / 1000
        self._timer = loop.call_at(max(now, min(due, expiry)), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closing:
            return
        if self.principal is None:
            # Before authentication only the auth timeout runs; an auth under
            # way is bounded by the store timeout and arms the timer itself.
            if not self._greeted:
                self.request_close(closes.AUTH_REQUIRED)
            return
        if self.expires_at <= now_ms():
            self.request_close(closes.TOKEN_EXPIRED)
            return
        heartbeat = self.settings.ws_heartbeat
        outbox = self.outbox
        now = asyncio.get_running_loop().time()
        due = None
        if now - outbox.last_sent >= heartbeat:
            if len(outbox):
                # Frames are queued, so the sender will move last_sent; look again shortly.
                due = now + min(heartbeat, 1.0)
            else:
                self.put(Heartbeat(at=now_ms()))
                outbox.last_sent = now
        self._arm(due)

    # ----------------------------------------------------------- receiving

    def put(self, message: Any) -> None:
        """Queue one server message for this connection."""
        text, size = encode(message)
        self.outbox.put(text, size)

    async def _next(self) -> ClientMessage | None:
        """The next valid client message; None once the connection is closing."""
        try:
            event = await self.socket.receive()
        except WebSocketDisconnect:
            self.request_close(None)
            return None
        if event["type"] == "websocket.disconnect":
            self.request_close(None)
            return None
        text = event.get("text")
        if text is None:
            self.request_close(closes.TEXT_ONLY)
            return None
        limit = self.settings.ws_max_frame_bytes
        if len(text) > limit or (len(text) * 4 > limit and len(text.encode()) > limit):
            self.request_close(closes.TOO_LARGE)
            return None
        depth = self.settings.ws_max_json_depth
        if json_too_deep(text, depth):
            self.request_close(closes.policy(f"JSON nested deeper than {depth} levels"))
            return None
        try:
            message = client_decoder.decode(text)
        except msgspec.ValidationError as exc:
            self.request_close(closes.policy(str(exc)))
            return None
        except msgspec.DecodeError:
            self.request_close(closes.INVALID_JSON)
            return None
        except RecursionError:  # (the depth check above makes this unreachable in practice)
            self.request_close(closes.policy(f"JSON nested deeper than {depth} levels"))
            return None
        metrics.ws_messages_in.labels(type(message).__struct_config__.tag).inc()
        return message

    async def _receive_loop(self) -> None:
        # The auth timeout is the timer armed in `run`: it cancels this wait.
        first = await self._next()
        if first is None:
            return
        self._greeted = True
        if not isinstance(first, ClientAuth):
            self.audit("auth.failed", reason="first message not auth")
            self.request_close(closes.AUTH_FAILED)
            return
        if not await self._auth(first):
            return
        while not self.closing:
            message = await self._next()
            if message is None:
                return
            await self._handle(message)

    async def _handle(self, message: ClientMessage) -> None:
        if isinstance(message, ClientJoin):
            await self._join(message)
        elif isinstance(message, ClientChat):
            await self._chat(message)
        elif isinstance(message, (ClientSteer, ClientDecide)):
            await self._steer(message)
        elif isinstance(message, ClientLeave):
            self._leave(message)
        elif isinstance(message, ClientPing):
            self.put(Pong(sentAt=now_ms()))
        elif isinstance(message, ClientAuth):
            await self._auth(message)

    def refuse(self, code: str, message: str, *, room_id: str | None = None, request_id: str | None = None, counts: bool = True) -> None:
        """Answer ``error``; refusals the client caused spend its error budget."""
        self.put(ErrorMsg(code=code, message=message, roomId=room_id, requestId=request_id))
        if not counts:
            return
        if self._errors is None:
            self._errors = WindowBudget(self.settings.ws_error_budget, 60.0)
        if not self._errors.hit():
            self.request_close(closes.TOO_MANY_ERRORS)

    # ----------------------------------------------------------- auth

    async def _auth(self, message: ClientAuth) -> bool:
        """First auth or a refresh; False (and a close) when refused."""
        cache = self.gateway.principals
        principal = cached_principal(cache, message.token)
        if principal is None:
            try:
                # The store gate bounds the read (store_timeout) and the queue
                # before it (ws_store_wait), so a reconnect storm waits. Its
                # timeouts are asyncio's, not anyio.fail_after: an anyio scope
                # with a deadline costs a task lookup and a timer handle more,
                # ~10 % of a connect.
                gateway = self.gateway
                principal = await gateway.store_gate.call(
                    lambda: authenticate(gateway.engine, gateway.redis, message.token, cache=cache)
                )
            except _STORE_ERRORS as exc:
                outage.warn(outage.classify(exc) or "store", "WebSocket auth", exc)
                self.request_close(closes.INTERNAL)
                return False
            if self.closing:
                return False
        if principal is None:
            self.audit("auth.failed", reason="invalid, expired, revoked or reused credential")
            self.request_close(closes.REVOKED if await self._revoked(message.token) else closes.AUTH_FAILED)
            return False
        if principal.is_reporter:
            # Reporter tokens report Claude Code sessions over HTTP; they read nothing.
            self.audit("auth.failed", reason="a reporter token cannot watch")
            self.request_close(closes.AUTH_FAILED)
            return False
        if self.principal is None:
            if not await self.gateway.admit(self, principal):
                self.request_close(closes.TOO_MANY_CONNECTIONS)
                return False
            self.outbox.batch = message.batch
        elif (principal.user_id, principal.team_id) != (self.principal.user_id, self.principal.team_id):
            # a refresh may renew credentials, not switch identity
            self.audit("auth.failed", reason="refresh with another identity")
            self.request_close(closes.AUTH_FAILED)
            return False
        self.principal = principal
        ceiling = now_ms() + self.settings.ws_credential_ttl * 1000
        self.expires_at = min(principal.expires_at or ceiling, ceiling)
        self._arm()
        self.put(
            AuthOk(
                connectionId=self.id,
                userId=principal.user_id,
                heartbeatMs=int(self.settings.ws_heartbeat * 1000),
                expiresAt=self.expires_at,
            )
        )
        return True

    async def _revoked(self, secret: str) -> bool:
        """After a refusal: was ``secret`` an API token that got revoked? (tells its holder why)."""
        engine = self.gateway.engine
        try:
            return await self.gateway.store_gate.call(lambda: token_revoked(engine, secret))
        except _STORE_ERRORS:
            return False

    # ----------------------------------------------------------- rooms

    async def _join(self, message: ClientJoin) -> None:
        assert self.principal is not None
        room_id = message.roomId
        job_id = job_id_of(room_id)
        if job_id in self.rooms:
            self.refuse("invalid", "already joined", room_id=room_id)
            return
        if len(self.rooms) >= self.settings.ws_max_rooms:
            self.refuse("limit", f"at most {self.settings.ws_max_rooms} rooms per connection", room_id=room_id)
            return
        gateway = self.gateway
        principal = self.principal
        since = message.since
        try:
            # Its own bounded waits: a reconnect storm queues here (see job_access).
            allowed = await gateway.access.allowed(job_id, principal.team_id)
        except _STORE_ERRORS:
            self.refuse("unavailable", "try again later", room_id=room_id, counts=False)
            return
        if not allowed:
            # Unknown and other-team jobs: the same answer after the same work (rooms cannot be probed).
            self.audit("join.refused", room_id=room_id)
            self.refuse("not_found", "no such room", room_id=room_id)
            return
        try:
            # The room's reads queue behind the other joins' batches (JoinReads):
            # in a reconnect storm that is a wait, bounded like the store gate's.
            async with asyncio.timeout(self.settings.ws_store_wait):
                snapshot, cov, presence_head, members = await self._read_room(job_id, since)
                # Redis while it holds the entries; the store answers for the rest.
                pos = await history.position(gateway.engine, job_id, since, cov) if cov.holds_from is None else (
                    await gateway.store_gate.call(lambda: history.position(gateway.engine, job_id, since, cov))
                )
                if snapshot is None:
                    # No live snapshot in Redis (expired): the stored one.
                    job: JobRecord | None = await gateway.store_gate.call(
                        lambda: get_job(gateway.engine, job_id, principal.team_id)
                    )
                    if job is None:
                        self.refuse("not_found", "no such room", room_id=room_id)
                        return
                    snapshot = job.to_snapshot()
        except _STORE_ERRORS:
            self.refuse("unavailable", "try again later", room_id=room_id, counts=False)
            return
        point = resume_point(since, pos)
        member = Member(self.outbox, presence_after=streams.id_tuple(presence_head), owner=self)
        self.rooms[job_id] = member
        announce(self, room_id, self.principal.role, snapshot, point, since, members)
        try:
            await self.gateway.hub.attach(job_id, member, point.replay_from, head=point.head, presence_head=presence_head)
        except _STORE_ERRORS:
            # The join is undone: the client sees `error` for the room it was told it joined.
            self._forget_room(job_id, member)
            self.refuse("unavailable", "replay failed; join again", room_id=room_id, counts=False)

    async def _read_room(
        self, job_id: str, since: str | None
    ) -> tuple[JobSnapshot | None, streams.Coverage, str, list[PresenceMember]]:
        """Everything a join reads from Redis, in one MULTI (shared: :class:`JoinReads`).

        The same reads as ``streams.read_state`` and ``streams.coverage``
        plus the presence join script. Returns ``(snapshot, coverage,
        presence_head, members)``.
        """
        assert self.principal is not None
        entry, replies = await self.gateway.joins.read(job_id, since, self.id, self.principal)
        raw, last, first, length, (added, whole) = replies[:5]
        cov = streams.coverage_of(first, last, length, added, whole)
        snapshot = streams.decode_snapshot(raw) if raw else None
        if snapshot is not None:
            snapshot.lastEventId = cov.head
        presence_head, members = replies[-1]
        self.gateway.presence.joined(job_id, entry, self.principal)
        return snapshot, cov, presence_head, members

    def _leave(self, message: ClientLeave) -> None:
        job_id = job_id_of(message.roomId)
        member = self.rooms.get(job_id)
        if member is None:
            self.refuse("not_joined", "not in this room", room_id=message.roomId)
            return
        self._forget_room(job_id, member)
        self.put(LeftMsg(roomId=message.roomId))

    # ----------------------------------------------------------- chat

    async def _chat(self, message: ClientChat) -> None:
        assert self.principal is not None
        room_id, request_id = message.roomId, message.requestId
        job_id = job_id_of(room_id)
        if job_id not in self.rooms:
            self.request_close(closes.CHAT_BEFORE_JOIN)
            return
        text = message.text.strip()
        if not 1 <= len(text) <= self.settings.ws_max_text_chars:
            self.request_close(closes.policy(f"text: 1-{self.settings.ws_max_text_chars} characters after trimming"))
            return
        if _CONTROL.search(text):
            self.request_close(closes.policy("text: control characters other than newline and tab"))
            return
        if not self.principal.at_least("reviewer"):
            self.refuse("forbidden", "your role may not comment", room_id=room_id, request_id=request_id)
            return
        if self._chat_bucket is None:
            self._chat_bucket = TokenBucket(self.settings.ws_chat_rate, self.settings.ws_chat_burst)
            self._chat_abuse = WindowBudget(self.settings.ws_chat_burst, ABUSE_WINDOW)
        if not self._chat_bucket.take():
            assert self._chat_abuse is not None
            if not self._chat_abuse.hit():
                self.request_close(closes.RATE_LIMITED)
                return
            self.refuse("rate_limited", "too many comments; slow down", room_id=room_id, request_id=request_id, counts=False)
            return
        hook = self.gateway.comments
        if hook is None:
            self.refuse("unavailable", "comments are not available", room_id=room_id, request_id=request_id, counts=False)
            return
        # The receiver goes on reading while the comment is stored (the seed
        # and clients keep several in flight): the writer groups them, and a
        # group shares one transaction, one XADD and one frame per watcher.
        # The posts are this session's tasks, bounded, cancelled at teardown;
        # they enter the writer's queue in the order they were received.
        await self._in_flight(functools.partial(self._post, hook, room_id, job_id, request_id, text))

    async def _in_flight(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` as one of this session's bounded in-flight tasks (cancelled at teardown), in arrival order."""
        chats = self._chats
        if chats is None:
            chats = self._chats = set()
        while len(chats) >= CHATS_IN_FLIGHT:
            await asyncio.wait(chats, return_when=asyncio.FIRST_COMPLETED)
        task = asyncio.ensure_future(self._guarded(work))
        chats.add(task)
        task.add_done_callback(chats.discard)

    # ----------------------------------------------------------- steering

    async def _steer(self, message: ClientSteer | ClientDecide) -> None:
        """An instruction or a permission answer: checked and sent by the steering hook, acked when it arrived.

        Runs as one of this session's bounded in-flight tasks (like a
        comment): waiting for the CLI's echo does not stop the receiver.
        """
        room_id, request_id = message.roomId, message.requestId
        job_id = job_id_of(room_id)
        if job_id not in self.rooms:
            self.request_close(closes.CHAT_BEFORE_JOIN)
            return
        hook = self.gateway.steering
        if hook is None:
            self.refuse("unavailable", "steering is not available", room_id=room_id, request_id=request_id, counts=False)
            return
        await self._in_flight(functools.partial(self._send_steer, hook, job_id, message))

    async def _send_steer(self, hook: SteeringHook, job_id: str, message: ClientSteer | ClientDecide) -> None:
        assert self.principal is not None
        room_id, request_id = message.roomId, message.requestId
        # Bounded: the store's write plus the wait for the CLI, plus slack.
        limit = self.settings.store_timeout + self.settings.steer_ack_timeout + 5
        try:
            async with asyncio.timeout(limit):
                if isinstance(message, ClientSteer):
                    result = await hook.instruct(self.principal, job_id, request_id, message.text)
                else:
                    result = await hook.decide(
                        self.principal, job_id, request_id, message.permissionId, message.allow, message.message
                    )
        except _STORE_ERRORS:
            self.refuse("unavailable", "not sent; retry with the same requestId", room_id=room_id, request_id=request_id, counts=False)
            return
        except SteerRefusal as exc:
            counts = exc.code in ("forbidden", "invalid")
            self.refuse(exc.code, exc.message, room_id=room_id, request_id=request_id, counts=counts)
            return
        if result.eventId is None:
            self.refuse(
                "timeout", "not delivered yet; send it again with the same requestId to learn the outcome",
                room_id=room_id, request_id=request_id, counts=False,
            )
            return
        self.put(Ack(requestId=request_id, id=result.eventId))

    async def _post(self, hook: CommentsHook, room_id: str, job_id: str, request_id: str, text: str) -> None:
        """Store and publish one comment, then ack it (or answer why not)."""
        assert self.principal is not None
        try:
            async with asyncio.timeout(self.settings.store_timeout):  # see _auth
                event_id = await hook.post(self.principal, room_id, job_id, request_id, text)
        except CommentForbidden:
            self.refuse("forbidden", "you may not comment here", room_id=room_id, request_id=request_id)
            return
        except (CommentsUnavailable, *_STORE_ERRORS):
            self.refuse("unavailable", "the comment was not stored; retry", room_id=room_id, request_id=request_id, counts=False)
            return
        self.put(Ack(requestId=request_id, id=event_id))
