"""uvicorn's sans-I/O WebSocket protocol, plus a synchronous text-frame writer for the gateway.

ASGI sends a frame as a coroutine call with a message dict, which uvicorn
turns into a websockets ``Frame``, serializes, joins and writes: on the
fan-out hot path that, and the sender task it needs, was most of a
delivery's cost (docs/performance.md). uvicorn takes its WebSocket protocol
as a class (``uvicorn.Config(ws=...)``), so the server stays uvicorn and the
reads, pings, the close handshake and the flow control stay its own. This
subclass offers the app, as the ASGI scope extension :data:`EXTENSION`, a
:class:`FrameSink`: write one already-encoded text frame now, or say that
the socket is not taking more (paused) or gone. It also answers a plain
opening handshake itself (gateway/handshake.py), as websockets would.

A server text frame is not masked, so its bytes are the same for every
connection: the outbox encodes a broadcast frame once (:func:`text_frame`)
and hands the same bytes to each sink. With an extension negotiated
(``PS_WS_PER_MESSAGE_DEFLATE``) frames go through websockets' serializer as
before, still synchronously.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from uvicorn.protocols.utils import ClientDisconnected, get_client_addr, get_path_with_query_string
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from progress_service.gateway.handshake import PlainRequest, accept_response, parse_plain

#: The ASGI scope extension (``{"sink": FrameSink}``) under which a connection's sink is offered.
EXTENSION = "progress_service.frame_sink"

_TEXT_FIN = 0x81


def text_frame(payload: bytes) -> bytes:
    """One final, unmasked text frame (RFC 6455 section 5.2) carrying ``payload``."""
    n = len(payload)
    if n < 126:
        return bytes((_TEXT_FIN, n)) + payload
    if n < 65536:
        return bytes((_TEXT_FIN, 126)) + n.to_bytes(2, "big") + payload
    return bytes((_TEXT_FIN, 127)) + n.to_bytes(8, "big") + payload


class FrameSink:
    """Writes whole text frames to one connection's transport, without waiting.

    ``on_writable`` is called when a paused transport drains below its low
    water mark, and when the connection is lost (the outbox writes what it
    held back, or finds the connection gone). After the close frame is
    sent, or once the peer is gone, :meth:`write` refuses.
    """

    __slots__ = ("_flag", "_protocol", "on_writable")

    def __init__(self, protocol: DirectSendProtocol) -> None:
        self._protocol = protocol
        self._flag: _Flag = protocol.writable  # type: ignore[assignment]
        self.on_writable: Callable[[], None] | None = None

    @property
    def writable(self) -> bool:
        """The transport takes more now (not above its high water mark; uvicorn's own flag)."""
        return self._flag._set

    def write(self, frame: bytes, payload: bytes) -> bool:
        """Write ``frame`` (``text_frame(payload)``); False once the close frame is sent or the connection is lost."""
        p = self._protocol
        if p.close_sent or p.disconnected or p.transport.is_closing():
            return False
        conn = p.conn
        if conn.extensions:  # e.g. permessage-deflate: websockets frames it
            conn.send_text(payload)
            p.transport.write(b"".join(conn.data_to_send()))
        else:
            p.transport.write(frame)
        return True


class _Inbox:
    """uvicorn's receive queue for one reader (the app's ``receive``), without ``asyncio.Queue``'s three deques."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    async def get(self) -> Any:
        while not self._items:
            if self._waiter is not None:
                raise RuntimeError("one receive at a time")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)  # a few at most: reading pauses at INBOX_PAUSE_AT


class _Flag:
    """uvicorn's ``writable`` event; its waiters' list is made only when a send waits (a paused transport)."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = True
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)


#: Client messages waiting for the app at which reading pauses (uvicorn: 1).
INBOX_PAUSE_AT = 4


class DirectSendProtocol(WebSocketsSansIOProtocol):
    """uvicorn's ``websockets-sansio`` protocol that offers each accepted connection a :class:`FrameSink`.

    It also holds less per connection: a list-backed receive queue and a
    plain writable flag instead of an ``asyncio.Queue`` and an
    ``asyncio.Event`` (four deques), and no handshake request or response
    (nor their headers) after the accept. A plain handshake (gateway/handshake.py)
    is read and answered without websockets' HTTP parser; any other goes
    through it as before.
    """

    sink: FrameSink | None = None
    #: The ``Sec-WebSocket-Accept`` of a plain handshake until it is answered (None: websockets answers).
    _plain_accept: bytes | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = _Inbox()  # type: ignore[assignment]
        self.writable = _Flag()  # type: ignore[assignment]
        #: Only the first bytes uvicorn hands over (the whole request, re-serialized) may be a plain handshake.
        self._first = not self.config.ws_per_message_deflate

    def data_received(self, data: bytes) -> None:
        """A plain handshake is opened here; everything else is uvicorn's."""
        if self._first:
            self._first = False
            request = parse_plain(data)
            if request is not None:
                self._open_plain(request)
                return
        super().data_received(data)

    def _open_plain(self, request: PlainRequest) -> None:
        """uvicorn's ``handle_connect`` for a request websockets would accept as it is, without parsing it again."""
        self.handshake_initiated = True
        # From here on websockets reads frames only: its parser no longer waits for a request.
        self.conn = ServerProtocol(state=State.OPEN, max_size=self.config.ws_max_size, logger=self.conn.logger)
        self.request = self.response = None  # type: ignore[assignment]
        self._plain_accept = request.accept
        raw_path, _, query_string = request.target.partition("?")
        self.sink = FrameSink(self)
        self.scope = {  # as uvicorn's handle_connect builds it (no subprotocol is offered in a plain request)
            "type": "websocket",
            "asgi": {"version": self.asgi_version, "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": self.scheme,
            "server": self.server,
            "client": self.client,
            "root_path": self.root_path,
            "path": self.root_path + unquote(raw_path),
            "raw_path": self.root_path.encode("ascii") + raw_path.encode("ascii"),
            "query_string": query_string.encode("ascii"),
            "headers": request.headers,
            "subprotocols": [],
            "state": self.app_state.copy(),
            "extensions": {"websocket.http.response": {}, EXTENSION: {"sink": self.sink}},
        }
        self.queue.put_nowait({"type": "websocket.connect"})
        task = self.loop.create_task(self.run_asgi())
        task.add_done_callback(self.on_task_complete)
        self.tasks.add(task)

    def send_receive_event_to_app(self) -> None:
        """uvicorn's, except that reading pauses once :data:`INBOX_PAUSE_AT` messages wait, not after each.

        uvicorn pauses the transport after every client message and resumes
        it when the app has read it: two ``epoll_ctl`` calls and the
        selector's bookkeeping per message, ~7 % of a join storm's samples.
        Its own pause is skipped by showing it the flag set; uvicorn's
        ``receive`` still resumes reading once the inbox is empty.
        """
        paused = self.read_paused
        self.read_paused = True
        try:
            super().send_receive_event_to_app()
        finally:
            self.read_paused = paused
        # Past the close (uvicorn discards the message) reading goes on: the peer's close reply must arrive.
        full = self.queue.qsize() >= INBOX_PAUSE_AT
        if full and not paused and not self.close_sent and not self.transport.is_closing():
            self.read_paused = True
            self.transport.pause_reading()

    def handle_connect(self, event: Request) -> None:
        """uvicorn's handshake; a connection it hands to the app gets a sink in its scope."""
        super().handle_connect(event)
        if self.close_sent:  # refused by websockets: no scope, no app
            return
        # websockets' parser keeps the handshake request as a local for the
        # connection's life; uvicorn has copied its headers into the scope.
        event.headers.clear()
        self.sink = FrameSink(self)
        extensions: dict[str, Any] = self.scope["extensions"]
        extensions[EXTENSION] = {"sink": self.sink}

    async def send(self, message: Any) -> None:
        """uvicorn's ASGI ``send``; once the handshake is answered its request and response are let go.

        uvicorn keeps both (headers and all, a few KB) for the connection's
        life but reads neither after the ``websocket.accept``.
        """
        if self._plain_accept is not None and message["type"] == "websocket.accept":
            await self._accept_plain(message)
            return
        await super().send(message)
        if message["type"] == "websocket.accept" and self.handshake_complete:
            self.request = self.response = None  # type: ignore[assignment]

    async def _accept_plain(self, message: Any) -> None:
        """uvicorn's ``websocket.accept`` of a plain handshake: the same 101, the same log line."""
        await self.writable.wait()
        if self.disconnected:
            raise ClientDisconnected()
        accept, self._plain_accept = self._plain_accept, None
        assert accept is not None
        if self.handshake_complete or self.initial_response is not None:  # not uvicorn's to accept now: its error
            await super().send(message)
            return
        self.logger.info('%s - "WebSocket %s" [accepted]', get_client_addr(self.scope),
                         get_path_with_query_string(self.scope))
        if not self.transport.is_closing():
            self.handshake_complete = True
            headers = [*self.default_headers, *message.get("headers", [])]
            self.transport.write(accept_response(accept, headers, message.get("subprotocol")))
            self.start_keepalive()

    def resume_writing(self) -> None:
        """The transport drained: uvicorn's ``send`` may go on, and the sink's owner writes what it held."""
        super().resume_writing()
        self._tell_sink()

    def connection_lost(self, exc: Exception | None) -> None:
        """uvicorn's bookkeeping (it sets ``writable``); the sink's owner hears of it too (it may be holding frames)."""
        super().connection_lost(exc)
        self._tell_sink()

    def _tell_sink(self) -> None:
        sink = self.sink
        if sink is not None and sink.on_writable is not None:
            sink.on_writable()


def sink_of(scope: Any) -> FrameSink | None:
    """The connection's :class:`FrameSink`, when the server is :class:`DirectSendProtocol`."""
    extension = (scope.get("extensions") or {}).get(EXTENSION)
    return extension["sink"] if extension else None
