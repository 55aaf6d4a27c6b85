"""One WebSocket connection's protocol state machine.

Three tasks in one task group live as long as the connection: the receiver
(decodes and handles client messages one at a time, in order), the sender
(drains the outbox) and the timer (application heartbeat, credential
expiry). Whatever decides that the connection must end calls
:meth:`Session.request_close`; ``run`` then cancels the tasks, leaves the
rooms and sends the close frame, with a timeout, exactly once.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import msgspec
from litestar import WebSocket
from litestar.exceptions import WebSocketDisconnect
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from progress_service import metrics, streams
from progress_service.auth import authenticate
from progress_service.events import (
    Ack,
    AuthOk,
    ClientAuth,
    ClientChat,
    ClientJoin,
    ClientLeave,
    ClientMessage,
    ClientPing,
    ErrorMsg,
    Gap,
    Heartbeat,
    Joined,
    LeftMsg,
    Pong,
    now_ms,
)
from progress_service.gateway import closes
from progress_service.gateway.closes import ABUSE_CODES, Close
from progress_service.gateway.hub import Member
from progress_service.gateway.limits import TokenBucket, WindowBudget
from progress_service.gateway.outbox import Outbox, SendTimeout
from progress_service.store.identity import Principal
from progress_service.store.jobs import get_job

if TYPE_CHECKING:
    from progress_service.gateway import Gateway

log = logging.getLogger("progress_service.gateway.session")

#: The one decoder of client messages (a strict tagged union).
client_decoder = msgspec.json.Decoder(ClientMessage)
_enc = msgspec.json.Encoder()

#: Control characters other than tab and newline are refused in chat text.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
#: Window (s) in which more than ``ws_chat_burst`` rate-limited chats close 4429.
ABUSE_WINDOW = 10.0
#: Closes after which queued messages are still flushed (they explain the close).
_NO_FLUSH = {1001, 1011, 1013}
_STORE_ERRORS = (RedisError, SQLAlchemyError, OSError, TimeoutError)


class CommentsUnavailable(Exception):
    """The comment could not be stored durably; nothing was broadcast."""


class CommentForbidden(Exception):
    """The user may not comment in this room."""


class CommentsHook(Protocol):
    """What the comments module installs as ``services.extras["comments"]``.

    ``post`` stores the comment and its audit record, appends it to the job
    stream (so the hub broadcasts it) and returns its event id; the same
    ``(room, user, request_id)`` returns the same id without a second copy.
    """

    async def post(self, principal: Principal, room_id: str, job_id: str, request_id: str, text: str) -> str: ...


def encode(message: Any) -> tuple[str, int]:
    """A server message as text plus its encoded size in bytes."""
    raw = _enc.encode(message)
    return raw.decode(), len(raw)


class Session:
    """The state of one authenticated (or authenticating) connection."""

    def __init__(self, gateway: Gateway, socket: WebSocket) -> None:
        self.gateway = gateway
        self.settings = gateway.settings
        self.socket = socket
        self.id = uuid.uuid4().hex[:16]
        self.principal: Principal | None = None
        #: The user this connection is counted for in the per-user cap.
        self.counted_for: str | None = None
        self.expires_at = 0  # epoch ms
        self.rooms: dict[str, Member] = {}
        self.outbox = Outbox(self.settings.ws_outbox_bytes, on_overflow=self._overflowed)
        self.chat_bucket = TokenBucket(self.settings.ws_chat_rate, self.settings.ws_chat_burst)
        self.chat_abuse = WindowBudget(self.settings.ws_chat_burst, ABUSE_WINDOW)
        self.errors = WindowBudget(self.settings.ws_error_budget, 60.0)
        self.close_with: Close | None = None
        self.peer_gone = False
        self._closing = anyio.Event()
        self._authenticated = anyio.Event()
        self.done = anyio.Event()

    # ----------------------------------------------------------- lifetime

    def request_close(self, close: Close | None) -> None:
        """End the connection with ``close`` (None: the peer is gone). First caller wins."""
        if self._closing.is_set():
            return
        if close is None:
            self.peer_gone = True
        elif close.code in ABUSE_CODES:
            self.audit("ws.closed", code=close.code, reason=close.reason)
        self.close_with = close
        self._closing.set()

    def audit(self, action: str, *, room_id: str | None = None, **detail: object) -> None:
        """Queue a security record (never blocks; never carries a credential)."""
        audit = self.gateway.services.extras.get("audit")
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
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._guarded, self._receive_loop)
                tg.start_soon(self._guarded, self._send_loop)
                tg.start_soon(self._guarded, self._timer_loop)
                await self._closing.wait()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._teardown()
            metrics.ws_connections.dec()
            self.done.set()

    async def _guarded(self, fn: Any) -> None:
        try:
            await fn()
        except Exception:
            log.exception("gateway: session %s failed", self.id)
            self.request_close(closes.INTERNAL)

    async def _teardown(self) -> None:
        for job_id, member in list(self.rooms.items()):
            self._forget_room(job_id, member)
        self.gateway.unregister(self)
        close = self.close_with
        if close is not None and not self.peer_gone:
            metrics.ws_closes.labels(str(close.code)).inc()
            timeout = self.settings.ws_send_timeout
            if close.code not in _NO_FLUSH:
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

    async def _timer_loop(self) -> None:
        # Timers start with authentication (before it, only the auth timeout runs).
        await self._authenticated.wait()
        heartbeat = self.settings.ws_heartbeat
        while True:
            now = anyio.current_time()
            left = (self.expires_at - now_ms()) / 1000
            if left <= 0:
                self.request_close(closes.TOKEN_EXPIRED)
                return
            idle = now - self.outbox.last_sent
            if idle >= heartbeat and not len(self.outbox):
                self.put(Heartbeat(at=now_ms()))
                self.outbox.last_sent = now
                idle = 0
            await anyio.sleep(max(0.01, min(heartbeat - idle, left)))

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
        try:
            message = client_decoder.decode(text)
        except msgspec.ValidationError as exc:
            self.request_close(closes.policy(str(exc)))
            return None
        except msgspec.DecodeError:
            self.request_close(closes.INVALID_JSON)
            return None
        metrics.ws_messages_in.labels(type(message).__struct_config__.tag).inc()
        return message

    async def _receive_loop(self) -> None:
        first: ClientMessage | None = None
        with anyio.move_on_after(self.settings.ws_auth_timeout):
            first = await self._next()
            if first is None:
                return
        if first is None:
            self.request_close(closes.AUTH_REQUIRED)
            return
        if not isinstance(first, ClientAuth):
            self.audit("auth.failed", reason="first message not auth")
            self.request_close(closes.AUTH_FAILED)
            return
        if not await self._auth(first):
            return
        while not self._closing.is_set():
            message = await self._next()
            if message is None:
                return
            await self._handle(message)

    async def _handle(self, message: ClientMessage) -> None:
        if isinstance(message, ClientJoin):
            await self._join(message)
        elif isinstance(message, ClientChat):
            await self._chat(message)
        elif isinstance(message, ClientLeave):
            self._leave(message)
        elif isinstance(message, ClientPing):
            self.put(Pong(sentAt=now_ms()))
        elif isinstance(message, ClientAuth):
            await self._auth(message)

    def refuse(self, code: str, message: str, *, room_id: str | None = None, request_id: str | None = None, counts: bool = True) -> None:
        """Answer ``error``; refusals the client caused spend its error budget."""
        self.put(ErrorMsg(code=code, message=message, roomId=room_id, requestId=request_id))
        if counts and not self.errors.hit():
            self.request_close(closes.TOO_MANY_ERRORS)

    # ----------------------------------------------------------- auth

    async def _auth(self, message: ClientAuth) -> bool:
        """First auth or a refresh; False (and a close) when refused."""
        try:
            with anyio.fail_after(self.settings.store_timeout):
                principal = await authenticate(self.gateway.services.engine, self.gateway.services.redis, message.token)
        except _STORE_ERRORS:
            log.warning("gateway: credential store unavailable during auth")
            self.request_close(closes.INTERNAL)
            return False
        if principal is None:
            self.audit("auth.failed", reason="invalid, expired, revoked or reused credential")
            self.request_close(closes.AUTH_FAILED)
            return False
        if self.principal is None:
            if not self.gateway.admit(self, principal):
                self.request_close(closes.TOO_MANY_CONNECTIONS)
                return False
            self.outbox.batch = message.batch
        elif (principal.user_id, principal.team_id) != (self.principal.user_id, self.principal.team_id):
            # a refresh may renew credentials, not switch identity
            self.audit("auth.failed", reason="refresh with another identity")
            self.request_close(closes.AUTH_FAILED)
            return False
        self.principal = principal
        self._authenticated.set()
        ceiling = now_ms() + self.settings.ws_credential_ttl * 1000
        self.expires_at = min(principal.expires_at or ceiling, ceiling)
        self.put(
            AuthOk(
                connectionId=self.id,
                userId=principal.user_id,
                heartbeatMs=int(self.settings.ws_heartbeat * 1000),
                expiresAt=self.expires_at,
            )
        )
        return True

    # ----------------------------------------------------------- rooms

    async def _join(self, message: ClientJoin) -> None:
        assert self.principal is not None
        room_id = message.roomId
        job_id = streams.job_id_of(room_id)
        if job_id in self.rooms:
            self.refuse("invalid", "already joined", room_id=room_id)
            return
        if len(self.rooms) >= self.settings.ws_max_rooms:
            self.refuse("limit", f"at most {self.settings.ws_max_rooms} rooms per connection", room_id=room_id)
            return
        services = self.gateway.services
        since = message.since
        try:
            with anyio.fail_after(self.settings.store_timeout):
                job = await get_job(services.engine, job_id, team_id=self.principal.team_id)
                if job is None:
                    # Unknown and other-team jobs get the same answer: rooms cannot be probed.
                    self.audit("join.refused", room_id=room_id)
                    self.refuse("not_found", "no such room", room_id=room_id)
                    return
                snapshot, head = await streams.read_state(services.redis, job_id)
                gap, oldest = await streams.gap_oldest(services.redis, job_id, since) if since else (False, None)
                presence_head, members = await self.gateway.presence.join(job_id, self.id, self.principal)
        except _STORE_ERRORS:
            self.refuse("unavailable", "try again later", room_id=room_id, counts=False)
            return
        member = Member(self.outbox, presence_after=streams.id_tuple(presence_head), owner=self)
        self.rooms[job_id] = member
        self.put(
            Joined(
                roomId=room_id,
                role=self.principal.role,
                snapshot=snapshot or job.to_snapshot(),
                head=head,
                presence=members,
            )
        )
        if gap:
            self.put(Gap(roomId=room_id, since=since or "", oldest=oldest))
        try:
            await self.gateway.hub.attach(job_id, member, since, head=head, presence_head=presence_head)
        except _STORE_ERRORS:
            # The join is undone: the client sees `error` for the room it was told it joined.
            self._forget_room(job_id, member)
            self.refuse("unavailable", "replay failed; join again", room_id=room_id, counts=False)

    def _leave(self, message: ClientLeave) -> None:
        job_id = streams.job_id_of(message.roomId)
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
        job_id = streams.job_id_of(room_id)
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
        if not self.chat_bucket.take():
            if not self.chat_abuse.hit():
                self.request_close(closes.RATE_LIMITED)
                return
            self.refuse("rate_limited", "too many comments; slow down", room_id=room_id, request_id=request_id, counts=False)
            return
        hook: CommentsHook | None = self.gateway.services.extras.get("comments")
        if hook is None:
            self.refuse("unavailable", "comments are not available", room_id=room_id, request_id=request_id, counts=False)
            return
        try:
            with anyio.fail_after(self.settings.store_timeout):
                event_id = await hook.post(self.principal, room_id, job_id, request_id, text)
        except CommentForbidden:
            self.refuse("forbidden", "you may not comment here", room_id=room_id, request_id=request_id)
            return
        except (CommentsUnavailable, *_STORE_ERRORS):
            self.refuse("unavailable", "the comment was not stored; retry", room_id=room_id, request_id=request_id, counts=False)
            return
        self.put(Ack(requestId=request_id, id=event_id))
