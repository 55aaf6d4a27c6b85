"""One WebSocket connection's protocol state machine.

A connection costs as little as possible while it is idle (thousands are):

- the ASGI task itself runs the receiver (decodes and handles client
  messages one at a time, in order) inside a cancel scope;
- no sender task under the server's own uvicorn protocol: the outbox writes
  frames to the connection's :class:`FrameSink` itself as they become ready
  (elsewhere, one sender task drains it);
- no timer task: the auth timeout, the application heartbeat and the
  credential expiry are one ``loop.call_at`` handle at a time, re-armed by
  its own callback (the event loop's heap is the process-wide timer wheel).

Whatever decides that the connection must end calls
:meth:`Session.request_close`; it cancels the receiver's scope, and ``run``
stops the sender, leaves the rooms and sends the close frame, with a
timeout, exactly once.

Here: the lifetime, the timer, the receiver and its dispatch. Each client
message is handled in its own module: ``frames`` (decoding and the frame
checks), ``credentials`` (``auth``), ``rooms`` (``join``/``leave``),
``chat`` and ``steer``; they act on the session through its public methods.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
from litestar import WebSocket
from litestar.exceptions import WebSocketDisconnect

from progress_service import closes, metrics, outage
from progress_service.closes import Close
from progress_service.errors import SendTimeout
from progress_service.events import (
    AuthOk,
    ClientAuth,
    ClientChat,
    ClientDecide,
    ClientJoin,
    ClientLeave,
    ClientMessage,
    ClientPing,
    ClientSteer,
    ErrorMsg,
    Heartbeat,
    Pong,
)
from progress_service.gateway import rooms
from progress_service.gateway.chat import ChatRate, chat
from progress_service.gateway.credentials import verify
from progress_service.gateway.direct_send import sink_of
from progress_service.gateway.frames import decode_frame, encode
from progress_service.gateway.hub import Member
from progress_service.gateway.limits import WindowBudget
from progress_service.gateway.outbox import Outbox
from progress_service.gateway.steer import steer
from progress_service.ids import now_ms
from progress_service.store.identity import Principal

if TYPE_CHECKING:
    from progress_service.gateway import Gateway
    from progress_service.gateway.endpoint import RawSocket
    from progress_service.settings import Settings

log = logging.getLogger("progress_service.gateway.session")

#: Comments (and steering inputs) of one connection in flight at once; the receiver waits past this.
CHATS_IN_FLIGHT = 32


class Session:
    """The state of one authenticated (or authenticating) connection."""

    __slots__ = (
        "_chats",
        "_done",
        "_errors",
        "_greeted",
        "_receiver",
        "_sender",
        "_timer",
        "chat_rate",
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

    def __init__(self, gateway: Gateway, socket: WebSocket[Any, Any, Any] | RawSocket) -> None:
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
        #: The chat rate limit (owned by ``chat``).
        self.chat_rate: ChatRate | None = None
        #: Comments being stored, steering inputs being sent (:meth:`in_flight`), made on first use.
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
        #: The task running the receive loop, while it runs (:meth:`request_close` cancels it).
        self._receiver: asyncio.Task[Any] | None = None
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
        receiver = self._receiver
        # Cancelled only from outside: called from within the loop itself, the
        # loop sees `closing` once the message at hand is done (a cancel of the
        # running task could not be taken back, and would hit the teardown).
        if receiver is not None and receiver is not asyncio.current_task():
            self._receiver = None  # (the loop's handler: this cancel is ours)
            receiver.cancel()

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
            sink = sink_of(self.socket.scope)
            if sink is not None:
                self.outbox.write_through(sink, self.settings.ws_send_timeout, self._write_broken)
            else:
                self._sender = asyncio.create_task(self._send_loop())
            # The receive loop is cancelled by request_close with the task's own
            # cancel: an anyio CancelScope per connection was ~3 % of a join
            # storm's CPU (get_async_backend on each) and ~1 KB of every idle one.
            task = asyncio.current_task()
            assert task is not None
            if not self.closing:
                self._receiver = task
                try:
                    # not through _guarded: one coroutine frame less held by every idle connection
                    await self._receive_loop()
                except Exception as exc:
                    self._failed(exc)
                except asyncio.CancelledError:
                    # Ours (request_close) unless someone else cancelled the task (too).
                    if self._receiver is not None or task.uncancel() > 0:
                        raise
                finally:
                    self._receiver = None
        finally:
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
        self.outbox.detach()
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
            rooms.forget(self, job_id, member)
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

    async def _send_text(self, text: str) -> None:
        await self.socket.send({"type": "websocket.send", "text": text, "bytes": None})

    def _write_broken(self, stalled: bool) -> None:
        """The outbox stopped writing through: a reader that stopped reading, or a vanished peer."""
        self.request_close(closes.SLOW_CONSUMER if stalled else None)

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
        message = decode_frame(event.get("text"), self.settings.ws_max_frame_bytes, self.settings.ws_max_json_depth)
        if isinstance(message, Close):
            self.request_close(message)
            return None
        metrics.ws_messages_in.labels(type(message).__struct_config__.tag).inc()
        return message

    async def _receive_loop(self) -> None:
        if not await self._greet():
            return
        while not self.closing:
            message = await self._next()
            if message is None:
                return
            await self._handle(message)
            # Not held while the connection idles (the next await would keep it).
            del message

    async def _greet(self) -> bool:
        """The first message, which must be an accepted ``auth`` (its token is not kept past this frame)."""
        # The auth timeout is the timer armed in `run`: it cancels this wait.
        first = await self._next()
        if first is None:
            return False
        self._greeted = True
        if not isinstance(first, ClientAuth):
            self.audit("auth.failed", reason="first message not auth")
            self.request_close(closes.AUTH_FAILED)
            return False
        return await self._auth(first)

    async def _handle(self, message: ClientMessage) -> None:
        if isinstance(message, ClientJoin):
            await rooms.join(self, message)
        elif isinstance(message, ClientChat):
            await chat(self, message)
        elif isinstance(message, (ClientSteer, ClientDecide)):
            await steer(self, message)
        elif isinstance(message, ClientLeave):
            rooms.leave(self, message)
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

    async def in_flight(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` as one of this session's bounded in-flight tasks (cancelled at teardown), in arrival order."""
        chats = self._chats
        if chats is None:
            chats = self._chats = set()
        while len(chats) >= CHATS_IN_FLIGHT:
            await asyncio.wait(chats, return_when=asyncio.FIRST_COMPLETED)
        task = asyncio.ensure_future(self._guarded(work))
        chats.add(task)
        task.add_done_callback(chats.discard)

    # ----------------------------------------------------------- auth

    async def _auth(self, message: ClientAuth) -> bool:
        """First auth or a refresh; False (and a close) when refused."""
        principal = await verify(self, message.token)
        if principal is None:
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
        heartbeat_ms = int(self.settings.ws_heartbeat * 1000)
        self.put(AuthOk(connectionId=self.id, userId=principal.user_id, heartbeatMs=heartbeat_ms, expiresAt=self.expires_at))
        return True
