"""A reconnecting follower of one job's room over the WebSocket protocol.

:class:`JobFollower` speaks protocol v1 (``docs/protocol.md``): it sends the
API token as the first message, joins ``job:<id>`` with ``since`` = the last
event id it saw, drops anything it has already seen, re-reads the snapshot
over HTTP on ``gap``, and reconnects with the full-jitter backoff of
:mod:`.backoff` until the job ends. It closes a connection that stays silent
for 2 x ``heartbeatMs`` (a half-open TCP connection looks alive otherwise).

What it receives goes to a :class:`FollowSink` (the renderers of
:mod:`.render`); how the job ended comes back as an :class:`Outcome`. A
condition that retrying cannot fix (bad token, job not visible, a server that
says the client is broken) raises :class:`FollowError`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

import msgspec
import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from progress_service import closes
from progress_service.closes import Reconnect
from progress_service.errors import ApiError, FollowError
from progress_service.events import (
    TERMINAL_STATUSES,
    Ack,
    AuthOk,
    ChatMsg,
    ClientAuth,
    ClientJoin,
    ErrorMsg,
    EventMsg,
    Gap,
    Heartbeat,
    JobSnapshot,
    Joined,
    LeftMsg,
    Pong,
    PresenceMsg,
    ResultData,
    server_message_decoder,
)
from progress_service.ids import room_id
from progress_service.streams import id_lt
from progress_service.terminal.api import JobsApi
from progress_service.terminal.backoff import Backoff

CLIENT_NAME = "progress-service-terminal/1"

#: Seconds to wait for ``auth_ok`` (and for the watchdog before it is known).
AUTH_REPLY_TIMEOUT = 10.0
#: After a ``result`` event, how long to wait for the terminal ``status``
#: that normally follows it before ending on the result alone.
RESULT_GRACE = 3.0
#: A job answer the server refused with 1008 this many times in a row is a
#: client bug: stop instead of hammering the server.
MAX_POLICY_CLOSES = 3
#: Largest frame accepted from the server (a snapshot carries the prompt).
MAX_FRAME_BYTES = 16 * 1024 * 1024

ConnState = Literal["connecting", "live", "reconnecting", "offline"]

_encoder = msgspec.json.Encoder()


class FollowSink(Protocol):
    """Where a follower reports what happens; the renderers implement it."""

    def snapshot(self, snapshot: JobSnapshot, *, reason: Literal["joined", "gap"]) -> None:
        """The job's state as a whole (on join, and re-read after a gap)."""

    def event(self, msg: EventMsg) -> None:
        """A job event, each exactly once, in the room's order."""

    def chat(self, msg: ChatMsg) -> None:
        """A reviewer comment, each exactly once, in the room's order."""

    def presence(self, joined: list[str], left: list[str]) -> None:
        """Who started or stopped watching (user names)."""

    def connection(self, state: ConnState, detail: str = "") -> None:
        """The connection's state, e.g. ``reconnecting`` with ``in 1.2 s``."""

    def notice(self, text: str) -> None:
        """A diagnostic for the user (never part of the event output)."""


@dataclass
class Outcome:
    """How the job ended, as far as this follower saw."""

    status: str
    result: ResultData | None = None

    @property
    def ok(self) -> bool:
        """True when the job succeeded."""
        if self.status in TERMINAL_STATUSES:
            return self.status == "succeeded"
        return bool(self.result and self.result.ok)

    @property
    def exit_code(self) -> int:
        """0 on success, 1 when the job failed or was cancelled."""
        return 0 if self.ok else 1


def ws_url(base_url: str) -> str:
    """The ``/ws`` endpoint of a service given by its HTTP base URL.

    ``https://h/prefix`` becomes ``wss://h/prefix/ws``. Query and fragment
    are dropped: nothing secret, or anything else, rides in the URL.
    """
    parts = urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {base_url!r}")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws", "", ""))


class _Retry(Exception):
    """This connection is over; connect again after a delay (a long one if ``long``)."""

    def __init__(self, why: str, *, long: bool = False) -> None:
        super().__init__(why)
        self.why = why
        self.long = long


@dataclass
class _Progress:
    """What this follower knows about the job across connections."""

    last_id: str | None = None
    status: str | None = None
    result: ResultData | None = None
    result_at: float | None = None
    #: The join answered with a finished job: it is over once this id is seen.
    end_at: str | None = None
    policy_closes: int = 0
    joins: int = 0


class JobFollower:
    """Follows one job until it ends, across reconnects.

    ``api`` is used for the snapshot after a ``gap``; ``token`` is sent as the
    first WebSocket message of every connection and nowhere else.
    """

    def __init__(
        self,
        *,
        api: JobsApi,
        base_url: str,
        token: str,
        job_id: str,
        sink: FollowSink,
        backoff: Backoff | None = None,
        result_grace: float = RESULT_GRACE,
    ) -> None:
        self.api = api
        self.url = ws_url(base_url)
        self.job_id = job_id
        self.room = room_id(job_id)
        self.sink = sink
        self.backoff = backoff or Backoff()
        self.result_grace = result_grace
        self._token = token
        self._p = _Progress()

    @property
    def last_id(self) -> str | None:
        """The id of the last event or comment seen (the next ``since``)."""
        return self._p.last_id

    async def run(self) -> Outcome:
        """Follow the job to its end; raises :class:`FollowError` when that is impossible."""
        while True:
            self.sink.connection("connecting")
            outcome: Outcome | None = None
            why, long = "", False
            try:
                outcome = await self._connection()
            except _Retry as retry:
                why, long = retry.why, retry.long
            finally:
                self.backoff.disconnected()
            if outcome is not None:
                return outcome
            delay = self.backoff.long_delay() if long else self.backoff.next_delay()
            self.sink.connection("reconnecting", f"{why}; retrying in {delay:.1f} s")
            await asyncio.sleep(delay)

    # ------------------------------------------------------------------
    # One connection
    # ------------------------------------------------------------------

    async def _connection(self) -> Outcome | None:
        """Run one connection; an outcome when the job ended, else raise :class:`_Retry`."""
        try:
            async with connect(
                self.url,
                open_timeout=10,
                close_timeout=2,
                max_size=MAX_FRAME_BYTES,
                user_agent_header=f"{CLIENT_NAME} websockets/{websockets.version.version}",
            ) as ws:
                return await self._session(ws)
        except ConnectionClosed as exc:
            raise self._on_close(exc) from None
        except InvalidStatus as exc:
            status = exc.response.status_code
            if 400 <= status < 500 and status != 429:
                raise FollowError(f"the server refused the WebSocket handshake (HTTP {status})") from None
            raise _Retry(f"handshake answered HTTP {status}") from None
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise _Retry(f"cannot connect ({type(exc).__name__}: {exc})".replace(": )", ")")) from None

    def _on_close(self, exc: ConnectionClosed) -> Exception:
        """Map a close code to a retry (with the right delay) or a fatal error."""
        frame = exc.rcvd
        if frame is None:
            return _Retry("connection lost")
        code, reason = frame.code, frame.reason or ""
        said = f"{code} {reason}".strip()
        # What to do is the code's policy (progress_service.closes); the
        # wording is this client's.
        if closes.policy_of(code).reconnect is Reconnect.STOP:
            if (code, reason) == closes.REVOKED:
                return FollowError(f"the API token was revoked ({said}): ask an admin for a new one")
            if code == closes.AUTH_FAILED.code:
                return FollowError(f"authentication failed ({said}): check the API token (--token or PS_TOKEN)")
            if code == closes.BYE.code:
                return FollowError(f"the server ended the session ({said}) before the job finished")
            return FollowError(f"the server refused this client ({said}); not retrying")
        if code == closes.INVALID_MESSAGE.code:  # 1008: a client bug, or a server that disagrees with it
            self._p.policy_closes += 1
            if self._p.policy_closes >= MAX_POLICY_CLOSES:
                return FollowError(f"the server keeps refusing this client ({said}); not retrying")
        if closes.policy_of(code).reconnect is Reconnect.LONG_BACKOFF:
            return _Retry(f"server closed {said}", long=True)
        return _Retry(f"server closed {said}")

    async def _session(self, ws: ClientConnection) -> Outcome | None:
        await ws.send(_encoder.encode(ClientAuth(token=self._token, client=CLIENT_NAME)).decode())
        first = await self._recv(ws, AUTH_REPLY_TIMEOUT, waiting_for="auth_ok")
        if not isinstance(first, AuthOk):
            # The server answers a bad token with 4403; anything else is odd.
            raise _Retry(f"expected auth_ok, got {type(first).__name__}")
        self.backoff.connected()
        watchdog = 2 * first.heartbeatMs / 1000 if first.heartbeatMs > 0 else 60.0
        refresh_at = self._refresh_deadline(first.expiresAt)
        join = ClientJoin(roomId=self.room, since=self._p.last_id)
        await ws.send(_encoder.encode(join).decode())
        while True:
            timeout = watchdog
            now = time.monotonic()
            if self._p.result_at is not None:
                timeout = min(timeout, max(0.0, self._p.result_at + self.result_grace - now))
            if refresh_at is not None:
                timeout = min(timeout, max(0.0, refresh_at - now))
            try:
                msg = await self._recv(ws, timeout, waiting_for="any message")
            except _Retry:
                if self._p.result_at is not None and time.monotonic() >= self._p.result_at + self.result_grace:
                    # A result with no terminal status after it: the result decides.
                    return Outcome(status=self._p.status or "finished", result=self._p.result)
                if refresh_at is not None and time.monotonic() >= refresh_at:
                    # Re-send the token before the server's deadline, so it
                    # does not close the connection with 4401 token expired.
                    await ws.send(_encoder.encode(ClientAuth(token=self._token, client=CLIENT_NAME)).decode())
                    refresh_at = None
                    continue
                await ws.close(1000, "bye")
                raise _Retry(f"no message for {watchdog:.0f} s (heartbeat missed)") from None
            if isinstance(msg, AuthOk):
                watchdog = 2 * msg.heartbeatMs / 1000 if msg.heartbeatMs > 0 else watchdog
                refresh_at = self._refresh_deadline(msg.expiresAt)
                continue
            outcome = await self._handle(msg)
            if outcome is not None:
                await ws.close(1000, "bye")
                return outcome

    async def _recv(self, ws: ClientConnection, timeout: float, *, waiting_for: str) -> Any:
        """The next decodable server message; :class:`_Retry` on silence."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Retry(f"timed out waiting for {waiting_for}")
            try:
                async with asyncio.timeout(remaining):
                    raw = await ws.recv()
            except TimeoutError:
                raise _Retry(f"timed out waiting for {waiting_for}") from None
            try:
                return server_message_decoder.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError):
                # A newer server may send types this client does not know;
                # they are not ours to act on, and must not end the follow.
                continue

    @staticmethod
    def _refresh_deadline(expires_at_ms: int) -> float | None:
        """When to re-send the token: a minute (or a tenth of the lifetime) before expiry."""
        if expires_at_ms <= 0:
            return None
        remaining = expires_at_ms / 1000 - time.time()
        return time.monotonic() + max(0.0, remaining - max(1.0, min(60.0, remaining / 10)))

    # ------------------------------------------------------------------
    # Messages
    # ------------------------------------------------------------------

    def _fresh(self, item_id: str) -> bool:
        """True for an id after the last one seen; remembers it."""
        last = self._p.last_id
        if last is not None and not id_lt(last, item_id):
            return False
        self._p.last_id = item_id
        self._p.policy_closes = 0
        return True

    def _reached_end(self) -> Outcome | None:
        p = self._p
        if p.end_at is not None and p.last_id is not None and not id_lt(p.last_id, p.end_at):
            return Outcome(status=p.status or "finished", result=p.result)
        return None

    async def _handle(self, msg: Any) -> Outcome | None:
        p = self._p
        if isinstance(msg, EventMsg):
            if msg.roomId != self.room or not self._fresh(msg.id):
                return None
            self.sink.event(msg)
            if msg.kind == "status":
                status = msg.data.get("status")
                if status in TERMINAL_STATUSES:
                    p.status = status
                    return Outcome(status=status, result=p.result)
                p.status = status if isinstance(status, str) else p.status
            elif msg.kind == "result":
                try:
                    p.result = msgspec.convert(msg.data, ResultData)
                except msgspec.ValidationError:
                    p.result = ResultData(ok=bool(msg.data.get("ok")), turns=0, durationMs=0, costUsd=0.0, summary="")
                p.result_at = time.monotonic()
            return self._reached_end()
        if isinstance(msg, ChatMsg):
            if msg.roomId == self.room and self._fresh(msg.id):
                self.sink.chat(msg)
            return self._reached_end()
        if isinstance(msg, Joined):
            if msg.roomId != self.room:
                return None
            p.joins += 1
            self.sink.connection("live")
            self.sink.snapshot(msg.snapshot, reason="joined")
            if msg.snapshot.status in TERMINAL_STATUSES:
                p.status = msg.snapshot.status
                p.result = p.result or msg.snapshot.result
                if msg.head is None or (p.last_id is not None and not id_lt(p.last_id, msg.head)):
                    return Outcome(status=msg.snapshot.status, result=p.result)
                p.end_at = msg.head
            self.sink.presence([m.userName for m in msg.presence], [])
            return None
        if isinstance(msg, Gap):
            if msg.roomId == self.room:
                self.sink.notice(
                    f"missed events after {msg.since} (oldest retained is {msg.oldest}); re-reading the job's state"
                )
                try:
                    self.sink.snapshot(await self.api.get_job(self.job_id), reason="gap")
                except ApiError as exc:
                    self.sink.notice(f"could not re-read the job's state: {exc}")
            return None
        if isinstance(msg, ErrorMsg):
            if msg.roomId == self.room and msg.code in ("not_found", "forbidden"):
                raise FollowError(f"job {self.job_id} not found (or not visible to this token)")
            self.sink.notice(f"server error {msg.code}: {msg.message}")
            return None
        if isinstance(msg, PresenceMsg):
            if msg.roomId == self.room:
                self.sink.presence([m.userName for m in msg.joined], [m.userName for m in msg.left])
            return None
        if isinstance(msg, LeftMsg | Heartbeat | Pong | Ack):
            return None
        return None
