"""A connection's bounded outbound queue, measured in encoded bytes, and its sender.

Producers (the hub, the session, a replay) never wait on the network: the hub
calls :meth:`Outbox.put`, which refuses and reports an overflow instead of
growing past the limit; a replay calls :meth:`Outbox.put_wait`, which waits
for room (a replay is the connection's own backlog, not a reason to drop it).
One sender task per connection drains the queue with a timeout on every
send, because uvicorn's ``send`` just waits while the socket is full.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable

import anyio

from progress_service import metrics

#: With batching on, one array frame carries at most this many bytes of messages.
BATCH_FRAME_BYTES = 64 * 1024


class SendTimeout(Exception):
    """A frame could not be handed to the socket within the send timeout."""


class Outbox:
    """Encoded messages waiting for one connection, oldest first."""

    def __init__(self, limit: int, *, batch: bool = False, on_overflow: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self.batch = batch
        self._on_overflow = on_overflow
        self._items: deque[tuple[str, int]] = deque()
        self._size = 0
        self._ready = anyio.Event()
        self._space = anyio.Event()
        self.overflowed = False
        self.closed = False
        #: ``anyio.current_time()`` of the last frame handed to the socket.
        self.last_sent = anyio.current_time()
        self.messages_sent = 0

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
        if self.closed or self.overflowed:
            return False
        if self._size + size > self.limit:
            self.overflowed = True
            if self._on_overflow is not None:
                self._on_overflow()
            return False
        self._items.append((text, size))
        self._size += size
        metrics.ws_outbox_bytes.inc(size)
        self._ready.set()
        return True

    async def put_wait(self, text: str, size: int) -> bool:
        """Queue one message, first waiting until it fits (used by replays)."""
        while not self.closed and not self.overflowed and self._items and self._size + size > self.limit:
            self._space = anyio.Event() if self._space.is_set() else self._space
            await self._space.wait()
        return self.put(text, size)

    def close(self) -> None:
        """Refuse further messages and drop what is queued."""
        self.closed = True
        metrics.ws_outbox_bytes.dec(self._size)
        self._items.clear()
        self._size = 0
        self._ready.set()
        self._space.set()

    def _take(self) -> tuple[str, int]:
        """The next frame's text and how many messages it carries."""
        if not self.batch or len(self._items) == 1:
            text, size = self._items.popleft()
            self._release(size)
            return text, 1
        parts: list[str] = []
        total = 0
        while self._items and (not parts or total + self._items[0][1] <= BATCH_FRAME_BYTES):
            text, size = self._items.popleft()
            parts.append(text)
            total += size
        self._release(total)
        return "[" + ",".join(parts) + "]", len(parts)

    def _release(self, size: int) -> None:
        self._size -= size
        metrics.ws_outbox_bytes.dec(size)
        self._space.set()

    async def get(self) -> str | None:
        """The next queued message on its own (no batching); None once closed."""
        while not self._items:
            if self.closed:
                return None
            self._ready = anyio.Event()
            await self._ready.wait()
        text, size = self._items.popleft()
        self._release(size)
        return text

    async def pump(self, send: Callable[[str], Awaitable[None]], timeout: float) -> None:
        """Send queued frames until the outbox is closed (the one sender task).

        Raises :class:`SendTimeout` when the socket does not take a frame
        within ``timeout`` seconds (a reader that stopped reading).
        """
        while True:
            while not self._items:
                if self.closed:
                    return
                self._ready = anyio.Event()
                await self._ready.wait()
            if self.closed:
                return
            frame, count = self._take()
            with anyio.move_on_after(timeout) as scope:
                await send(frame)
            if scope.cancelled_caught:
                raise SendTimeout
            self.last_sent = anyio.current_time()
            self.messages_sent += count
            metrics.ws_messages_out.inc(count)
            metrics.ws_frames_out.inc()

    async def flush(self, send: Callable[[str], Awaitable[None]], timeout: float) -> None:
        """Send what is still queued (before a polite close), within ``timeout`` in total."""
        with anyio.move_on_after(timeout):
            while self._items and not self.closed:
                frame, count = self._take()
                await send(frame)
                self.messages_sent += count
