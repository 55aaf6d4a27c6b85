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

A batching connection's sender is woken through the process's
:class:`WriteWindow`: fan-out (``put_chunk``/``put_many``: events,
comments, presence) queued for an idle batching outbox does not wake its
sender at once but at the end of a short window (a millisecond or two), one
timer for all the outboxes that became ready in it, so everything that
arrives meanwhile for that connection (comments of several group commits,
events of several reads, presence) leaves in one frame. A queue that reaches
a frame's worth of bytes, or a single ``put`` (a reply to the client: it
should not wait), wakes the sender at once with everything queued.
Connections without ``batch`` get one message per frame, woken at once.

Queued messages are held in *chunks*: the hub encodes the entries of one
XREAD answer once, and every member that gets all of them queues the same
chunk (one append, not one per entry), with the entries already joined by
commas, so a batching connection's array frame is built from a few joined
chunks instead of one string per message.

Why one module of ~470 lines: the queue, its chunks, the write window that
wakes it and the process's send counters are the one fan-out hot path above;
they exist only for the outbox and are tuned together (docs/performance.md).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

import anyio

from progress_service import metrics
from progress_service.errors import SendTimeout

#: With batching on, one array frame carries at most this many bytes of messages.
BATCH_FRAME_BYTES = 64 * 1024

#: Pending frames past which they are added to the Prometheus counters at once.
COUNT_EVERY = 512


class OutboxStats:
    """What a gateway's outboxes hold and sent: bytes queued, and sent counts not yet exported.

    One per :class:`~progress_service.gateway.Gateway`, shared by its
    outboxes; the gateway hooks :meth:`queued` to the ``ws_outbox_bytes``
    gauge while it runs.
    """

    __slots__ = ("pending_frames", "pending_messages", "queued_bytes")

    def __init__(self) -> None:
        #: Encoded bytes queued in the outboxes.
        self.queued_bytes = 0
        #: Frames and messages sent but not yet added to the Prometheus counters.
        self.pending_frames = 0
        self.pending_messages = 0

    def count_sent(self, frames: int, messages: int) -> None:
        """Count sent frames; exported every COUNT_EVERY frames and on each scrape.

        With a write window a busy period is often one frame, so adding per busy
        period (two locked increments) cost ~12 % of a hot room's CPU.
        """
        self.pending_frames += frames
        self.pending_messages += messages
        if self.pending_frames >= COUNT_EVERY:
            self.flush()

    def flush(self) -> None:
        """Add the pending frame and message counts to the Prometheus counters."""
        if self.pending_frames:
            metrics.ws_frames_out.inc(self.pending_frames)
            metrics.ws_messages_out.inc(self.pending_messages)
            self.pending_frames = self.pending_messages = 0

    def queued(self) -> int:
        """Encoded bytes waiting in the outboxes (read on scrape; flushes the sent counts too)."""
        self.flush()
        return self.queued_bytes


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class WriteWindow:
    """Wakes the senders of batching outboxes together, ``seconds`` after the first became ready.

    One per gateway; one timer per window for every outbox in it (not one per
    outbox). ``seconds <= 0`` wakes at once, as without a window.
    """

    __slots__ = ("_handle", "_waiters", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._waiters: list[asyncio.Future[None]] = []
        self._handle: asyncio.TimerHandle | None = None

    def hold(self, waiter: asyncio.Future[None]) -> None:
        """Wake ``waiter`` when the current window ends (opening one if none is open)."""
        if self.seconds <= 0:
            _wake(waiter)
            return
        self._waiters.append(waiter)
        if self._handle is None:
            self._handle = waiter.get_loop().call_later(self.seconds, self._flush)

    def _flush(self) -> None:
        self._handle = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            _wake(waiter)


class Chunk(NamedTuple):
    """Encoded messages queued together, shared by every outbox that queues them.

    ``joined`` is ``",".join(texts)``, made once for all the outboxes, so a
    batching sender that takes the whole chunk adds one string to its frame.
    A queue holds chunks and single messages (``(text, size)`` pairs, told
    apart by their length: a pair is not tracked by the garbage collector and
    costs nothing to make).
    """

    joined: str
    #: Encoded bytes of all the messages.
    size: int
    texts: Sequence[str]
    sizes: Sequence[int]
    #: The messages as ``(text, size)`` pairs, for the outboxes that send one per frame.
    pairs: Sequence[tuple[str, int]]

    @classmethod
    def of(cls, texts: Sequence[str], sizes: Sequence[int]) -> Chunk:
        """A chunk of these messages (joined here, once)."""
        return cls(",".join(texts), sum(sizes), texts, sizes, list(zip(texts, sizes, strict=True)))


class Outbox:
    """Encoded messages waiting for one connection, oldest first."""

    __slots__ = (
        "_count",
        "_held",
        "_items",
        "_on_overflow",
        "_pos",
        "_pump_task",
        "_sending_since",
        "_size",
        "_space_waiter",
        "_stalled",
        "_stats",
        "_waiter",
        "_watchdog",
        "_window",
        "batch",
        "closed",
        "last_sent",
        "limit",
        "messages_sent",
        "overflowed",
    )

    def __init__(self, limit: int, *, batch: bool = False, on_overflow: Callable[[], None] | None = None,
                 window: WriteWindow | None = None, stats: OutboxStats | None = None) -> None:
        self.limit = limit
        #: Shared with the gateway's other outboxes (a private one when not given).
        self._stats = stats if stats is not None else OutboxStats()
        self.batch = batch
        self._on_overflow = on_overflow
        self._items: deque[Chunk | tuple[str, int]] = deque()
        #: Messages of ``_items[0]`` (a chunk) already taken: a chunk can span frames.
        self._pos = 0
        #: Messages queued.
        self._count = 0
        self._size = 0
        #: The sender's (or ``get``'s) wait for a message; None while it is not waiting.
        self._waiter: asyncio.Future[None] | None = None
        #: Batching: the sender's wait, held by ``_window`` until it ends (or a frame's worth is queued).
        self._window = window
        self._held: asyncio.Future[None] | None = None
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
        self._pump_task: asyncio.Task[None] | None = None
        self._stalled = False

    @property
    def size(self) -> int:
        """Encoded bytes currently queued."""
        return self._size

    def __len__(self) -> int:
        return self._count

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
            self._overflow()
            return False
        self._items.append((text, size))
        self._count += 1
        self._size += size
        self._stats.queued_bytes += size
        # One message on its own (a reply, a heartbeat, a replay page's entry):
        # the sender goes now, taking whatever a window was holding with it.
        if self._waiter is not None:
            _wake(self._waiter)
            self._waiter = None
        elif self._held is not None:
            _wake(self._held)
            self._held = None
        return True

    def put_chunk(self, chunk: Chunk) -> bool:
        """Queue a (shared) chunk of encoded messages; the contract of :meth:`put_many`."""
        if self.closed or self.overflowed:
            return False
        size = chunk.size
        if self._size + size > self.limit:
            return all(self.put(text, n) for text, n in chunk.pairs)
        if self.batch:
            self._items.append(chunk)
        else:
            # one frame per message anyway: queue them one by one, so the
            # sender's take is a popleft
            self._items.extend(chunk.pairs)
        self._count += len(chunk.texts)
        self._size += size
        self._stats.queued_bytes += size
        if self._waiter is not None or self._held is not None:
            self._ready()
        return True

    def _ready(self) -> None:
        """Fan-out was queued while the sender waits: wake it at the end of the window (or now)."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if self.batch and self._window is not None and self._size < BATCH_FRAME_BYTES:
                self._held = waiter
                self._window.hold(waiter)
                return
            _wake(waiter)
        elif self._size >= BATCH_FRAME_BYTES:
            # a frame's worth is queued: no reason to wait for the window's end
            _wake(self._held)
            self._held = None

    def put_many(self, items: list[tuple[str, int]], size: int) -> bool:
        """Queue several encoded messages (``size``: their total bytes) at once.

        The same contract as calling :meth:`put` for each in order: on an
        overflow the messages that fit are queued, the rest refused, and the
        overflow is reported. The sender is woken once.
        """
        if not items:
            return not (self.closed or self.overflowed)
        texts = [t for t, _ in items]
        return self.put_chunk(Chunk(",".join(texts), size, texts, [n for _, n in items], items))

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
        self.closed = True
        self._stats.queued_bytes -= self._size
        self._items.clear()
        self._pos = 0
        self._count = 0
        self._size = 0
        _wake(self._waiter)
        _wake(self._held)
        _wake(self._space_waiter)

    def _pop_one(self) -> tuple[str, int]:
        """The oldest message and its size (not yet released)."""
        items = self._items
        entry = items.popleft()
        if len(entry) == 2:
            return entry
        # a chunk (queued while batching was on, or partly taken): its rest as pairs
        pairs = entry.pairs[self._pos :]
        self._pos = 0
        items.extendleft(reversed(pairs[1:]))
        return pairs[0]

    def _take(self) -> tuple[str, int]:
        """The next frame's text and how many messages it carries."""
        if not self.batch or self._count == 1:
            text, size = self._pop_one()
            self._count -= 1
            self._release(size)
            return text, 1
        items = self._items
        parts: list[str] = []
        total = 0
        count = 0
        while items:
            entry = items[0]
            if len(entry) == 2:
                text, size = entry
                if parts and total + size > BATCH_FRAME_BYTES:
                    break
                items.popleft()
                parts.append(text)
                total += size
                count += 1
                continue
            chunk: Chunk = entry
            if self._pos == 0 and total + chunk.size <= BATCH_FRAME_BYTES:
                # the whole chunk fits: its messages are joined already
                items.popleft()
                parts.append(chunk.joined)
                total += chunk.size
                count += len(chunk.texts)
                continue
            # a chunk that does not fit (or is partly sent): message by message
            texts, sizes, pos, n = chunk.texts, chunk.sizes, self._pos, len(chunk.texts)
            start = pos
            while pos < n and (not parts or total + sizes[pos] <= BATCH_FRAME_BYTES):
                parts.append(texts[pos])
                total += sizes[pos]
                pos += 1
            count += pos - start
            if pos < n:
                self._pos = pos
                break
            items.popleft()
            self._pos = 0
        self._count -= count
        self._release(total)
        return "[" + ",".join(parts) + "]", count

    def _release(self, size: int) -> None:
        self._size -= size
        self._stats.queued_bytes -= size
        if self._space_waiter is not None:
            _wake(self._space_waiter)

    async def get(self) -> str | None:
        """The next queued message on its own (no batching); None once closed."""
        while not self._items:
            if self.closed:
                return None
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            await waiter
        text, size = self._pop_one()
        self._count -= 1
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
        # The Prometheus counters take a lock per call: count locally, hand
        # the counts over once per busy period (see OutboxStats.count_sent).
        frames = messages = 0
        # The watchdog cancels this task itself (no cancel scope: an anyio
        # scope and its task state cost ~1 KB per idle connection).
        task = self._pump_task = asyncio.current_task()
        try:
            while True:
                if not items:
                    if frames:
                        self._stats.count_sent(frames, messages)
                        frames = messages = 0
                    if self.closed:
                        return
                    waiter = self._waiter = loop.create_future()
                    await waiter
                    self._held = None
                    continue
                frame, count = self._take()
                self._sending_since = now = loop.time()
                if self._watchdog is None:
                    self._watchdog = loop.call_at(now + timeout, self._check_stall, loop, timeout)
                await send(frame)
                self._sending_since = None
                self.last_sent = loop.time()
                self.messages_sent += count
                messages += count
                frames += 1
        except asyncio.CancelledError:
            # Ours (the watchdog's) unless someone else cancelled the task too.
            if not self._stalled or task is None or task.uncancel() > 0:
                raise
        finally:
            if frames:
                self._stats.count_sent(frames, messages)
            self._sending_since = None
            self._pump_task = None
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
        raise SendTimeout

    def _check_stall(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        """The send watchdog: cancel the pump when one send has taken ``timeout`` or more.

        It re-arms itself for the deadline of the send in progress, and
        disarms while the sender is idle (the next send arms it again).
        """
        self._watchdog = None
        since = self._sending_since
        if since is None or self._pump_task is None:
            return
        due = since + timeout
        if loop.time() >= due:
            self._stalled = True
            self._pump_task.cancel()
        else:
            self._watchdog = loop.call_at(due, self._check_stall, loop, timeout)

    async def flush(self, send: Callable[[str], Awaitable[None]], timeout: float) -> None:
        """Send what is still queued (before a polite close), within ``timeout`` in total."""
        with anyio.move_on_after(timeout):
            while self._items and not self.closed:
                frame, count = self._take()
                await send(frame)
                self.messages_sent += count
