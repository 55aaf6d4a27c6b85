"""A connection's bounded outbound queue, measured in encoded bytes, and its sender.

Producers (the hub, the session, a replay) never wait on the network: the hub
calls :meth:`Outbox.put` (or :meth:`Outbox.put_many` for all the entries of
one read), which refuses and reports an overflow instead of growing past the
limit; a replay calls :meth:`Outbox.put_wait`, which waits for room (a replay
is the connection's own backlog, not a reason to drop it). One sender task
per connection drains the queue (:meth:`Outbox.pump`).

This is the fan-out hot path: ``put`` runs once per member per event, the
pump once per frame. So neither touches Prometheus (the queued bytes are a
plain int read on scrape) nor creates an event object, a cancel scope or a
timer per call. The sender waits on one bare future, set by the first ``put``
after it started waiting; the send timeout is a watchdog timer armed at most
once per timeout period while frames are being sent (uvicorn's ``send``
returns at once unless the socket is full, so a per-frame timeout would only
cost time).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

import anyio

from progress_service import metrics

#: With batching on, one array frame carries at most this many bytes of messages.
BATCH_FRAME_BYTES = 64 * 1024

#: Encoded bytes queued in all outboxes of this process (exported on scrape).
_queued_bytes = 0


def queued_bytes() -> int:
    """Encoded bytes waiting in all outboxes of this process."""
    return _queued_bytes


metrics.ws_outbox_bytes.set_function(queued_bytes)


class SendTimeout(Exception):
    """A frame could not be handed to the socket within the send timeout."""


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class Outbox:
    """Encoded messages waiting for one connection, oldest first."""

    __slots__ = (
        "_items",
        "_on_overflow",
        "_pump_scope",
        "_sending_since",
        "_size",
        "_space_waiter",
        "_stalled",
        "_waiter",
        "_watchdog",
        "batch",
        "closed",
        "last_sent",
        "limit",
        "messages_sent",
        "overflowed",
    )

    def __init__(self, limit: int, *, batch: bool = False, on_overflow: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self.batch = batch
        self._on_overflow = on_overflow
        self._items: deque[tuple[str, int]] = deque()
        self._size = 0
        #: The sender's (or ``get``'s) wait for a message; None while it is not waiting.
        self._waiter: asyncio.Future[None] | None = None
        #: A replay's wait for room (``put_wait``).
        self._space_waiter: asyncio.Future[None] | None = None
        self.overflowed = False
        self.closed = False
        #: ``anyio.current_time()`` (the loop's clock) of the last frame handed to the socket.
        self.last_sent = anyio.current_time()
        self.messages_sent = 0
        #: Loop time at which the send in progress started; None between sends.
        self._sending_since: float | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._pump_scope: anyio.CancelScope | None = None
        self._stalled = False

    @property
    def size(self) -> int:
        """Encoded bytes currently queued."""
        return self._size

    def __len__(self) -> int:
        return len(self._items)

    def put(self, text: str, size: int) -> bool:
        """Queue one encoded message without waiting.

        Returns False when the outbox is closed or the message would take it
        over its limit; the overflow is reported once through ``on_overflow``
        and the outbox refuses everything after it (the connection is going
        away with 1013, and a later message must not slip in after a gap).
        """
        global _queued_bytes
        if self.closed or self.overflowed:
            return False
        if self._size + size > self.limit:
            self._overflow()
            return False
        self._items.append((text, size))
        self._size += size
        _queued_bytes += size
        if self._waiter is not None:
            _wake(self._waiter)
            self._waiter = None
        return True

    def put_many(self, items: list[tuple[str, int]], size: int) -> bool:
        """Queue several encoded messages (``size``: their total bytes) at once.

        The same contract as calling :meth:`put` for each in order: on an
        overflow the messages that fit are queued, the rest refused, and the
        overflow is reported. The sender is woken once.
        """
        global _queued_bytes
        if self.closed or self.overflowed:
            return False
        if self._size + size > self.limit:
            return all(self.put(text, n) for text, n in items)
        self._items.extend(items)
        self._size += size
        _queued_bytes += size
        if self._waiter is not None:
            _wake(self._waiter)
            self._waiter = None
        return True

    def _overflow(self) -> None:
        self.overflowed = True
        if self._on_overflow is not None:
            self._on_overflow()

    async def put_wait(self, text: str, size: int) -> bool:
        """Queue one message, first waiting until it fits (used by replays)."""
        while not self.closed and not self.overflowed and self._items and self._size + size > self.limit:
            waiter = self._space_waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._space_waiter = None
        return self.put(text, size)

    def close(self) -> None:
        """Refuse further messages and drop what is queued."""
        global _queued_bytes
        self.closed = True
        _queued_bytes -= self._size
        self._items.clear()
        self._size = 0
        _wake(self._waiter)
        _wake(self._space_waiter)

    def _take(self) -> tuple[str, int]:
        """The next frame's text and how many messages it carries."""
        items = self._items
        if not self.batch or len(items) == 1:
            text, size = items.popleft()
            self._release(size)
            return text, 1
        parts: list[str] = []
        total = 0
        while items and (not parts or total + items[0][1] <= BATCH_FRAME_BYTES):
            text, size = items.popleft()
            parts.append(text)
            total += size
        self._release(total)
        return "[" + ",".join(parts) + "]", len(parts)

    def _release(self, size: int) -> None:
        global _queued_bytes
        self._size -= size
        _queued_bytes -= size
        if self._space_waiter is not None:
            _wake(self._space_waiter)

    async def get(self) -> str | None:
        """The next queued message on its own (no batching); None once closed."""
        while not self._items:
            if self.closed:
                return None
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            await waiter
        text, size = self._items.popleft()
        self._release(size)
        return text

    async def pump(self, send: Callable[[str], Awaitable[None]], timeout: float) -> None:
        """Send queued frames until the outbox is closed (the one sender task).

        Raises :class:`SendTimeout` when the socket does not take a frame
        within ``timeout`` seconds (a reader that stopped reading).
        """
        loop = asyncio.get_running_loop()
        items = self._items
        self._stalled = False
        with anyio.CancelScope() as scope:
            self._pump_scope = scope
            try:
                while True:
                    if not items:
                        if self.closed:
                            return
                        waiter = self._waiter = loop.create_future()
                        await waiter
                        continue
                    frame, count = self._take()
                    self._sending_since = now = loop.time()
                    if self._watchdog is None:
                        self._watchdog = loop.call_at(now + timeout, self._check_stall, loop, timeout)
                    await send(frame)
                    self._sending_since = None
                    self.last_sent = loop.time()
                    self.messages_sent += count
                    metrics.ws_messages_out.inc(count)
                    metrics.ws_frames_out.inc()
            finally:
                self._sending_since = None
                self._pump_scope = None
                if self._watchdog is not None:
                    self._watchdog.cancel()
                    self._watchdog = None
        if self._stalled:
            raise SendTimeout

    def _check_stall(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        """The send watchdog: cancel the pump when one send has taken ``timeout`` or more.

        It re-arms itself for the deadline of the send in progress, and
        disarms while the sender is idle (the next send arms it again).
        """
        self._watchdog = None
        since = self._sending_since
        if since is None or self._pump_scope is None:
            return
        due = since + timeout
        if loop.time() >= due:
            self._stalled = True
            self._pump_scope.cancel()
        else:
            self._watchdog = loop.call_at(due, self._check_stall, loop, timeout)

    async def flush(self, send: Callable[[str], Awaitable[None]], timeout: float) -> None:
        """Send what is still queued (before a polite close), within ``timeout`` in total."""
        with anyio.move_on_after(timeout):
            while self._items and not self.closed:
                frame, count = self._take()
                await send(frame)
                self.messages_sent += count
