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

Under uvicorn with :class:`~progress_service.gateway.direct_send.DirectSendProtocol`
(the server's default) there is no sender task: :meth:`Outbox.write_through`
hands the outbox the connection's :class:`FrameSink`, and the wake-up that
would have resumed the sender writes the frames itself: in the write
window's timer callback, or in a callback soon after the ``put`` of a reply.
A batching outbox that still holds a whole chunk when the next arrives
queues the two merged (:meth:`Chunk.merged`, made once for every member in
step), and a frame that is one whole chunk is encoded once for every outbox
that sends it (:meth:`Chunk.frame`). A
paused transport holds the frames back (the outbox fills towards its limit)
until it drains; one paused for ``timeout`` is a stalled reader.

A room's members in step (their outboxes write through, batch and hold
nothing) do not even queue: the hub gathers them in one :class:`Broadcast`
per write window, which writes the window's merged chunk to each of their
sinks when the window ends (one list append per member per read, and one
write per member per window).

Why one module of ~780 lines: the queue, its chunks, the room broadcast, the write window that
wakes it and the process's send counters are the one fan-out hot path above;
they exist only for the outbox and are tuned together (docs/performance.md).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import anyio

from progress_service import metrics
from progress_service.errors import SendTimeout
from progress_service.gateway.direct_send import text_frame

if TYPE_CHECKING:
    from progress_service.gateway.direct_send import FrameSink

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


class _Drain:
    """Stands in for the sender's future when the outbox writes to a :class:`FrameSink` itself.

    One-shot like a future, so a window still holding an old one wakes nothing.
    Woken like a future, the drain runs soon, not inside the ``put`` that woke
    it (a replay queues a page message by message: they should share frames,
    as they do with a sender task); the write window, a timer callback
    already, drains at once (:meth:`drain_now`).
    """

    __slots__ = ("_fired", "_outbox")

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox
        self._fired = False

    def done(self) -> bool:
        return self._fired

    def set_result(self, _: None) -> None:
        self._fired = True
        asyncio.get_running_loop().call_soon(self._outbox._drain)

    def drain_now(self) -> None:
        if not self._fired:
            self._fired = True
            self._outbox._drain()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()


class Broadcast:
    """A room's fan-out for its members in step, written to each of their sinks when the write window ends.

    The hub makes one when a read finds members whose outboxes write
    through, batch, and hold nothing (:meth:`Outbox.in_step`): instead of a
    ``put_chunk``, a window wait and a drain per member, each is added here
    once, and the reads of the same window are merged into the one chunk
    (:meth:`extend`). At the window's end every member gets the chunk's
    frame, encoded once (:meth:`Outbox.take_broadcast`); a member whose
    transport paused meanwhile queues it instead, in order. While a
    broadcast is open, its members get nothing else from the room's event
    stream (the hub skips them, or fires the broadcast first).
    """

    __slots__ = ("_due", "_written", "chunk", "members")

    def __init__(self, chunk: Chunk) -> None:
        self.chunk = chunk
        #: The members it is for (``Member``: an ``outbox`` and ``live``); the hub appends.
        self.members: list[_Recipient] = []
        #: Woken (the write is scheduled soon) / written: reads may join it until it is written.
        self._due = False
        self._written = False

    def extend(self, following: Chunk) -> bool:
        """Add the next read's chunk for every member; False when written, or when it would pass a frame's worth."""
        if self._written or self.chunk.size + following.size > BATCH_FRAME_BYTES:
            return False
        self.chunk = self.chunk.merged(following)
        return True

    def done(self) -> bool:
        return self._due or self._written

    def set_result(self, _: None) -> None:
        self._due = True
        asyncio.get_running_loop().call_soon(self.drain_now)

    def drain_now(self) -> None:
        """Write it now (the window ended, or the next read would make it too big); once."""
        if self._written:
            return
        self._written = True
        chunk, now = self.chunk, asyncio.get_running_loop().time()
        for member in self.members:
            if member.live:
                member.outbox.take_broadcast(chunk, now)
        self.members = []

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()


class _Recipient(Protocol):
    """What a :class:`Broadcast` needs of a hub member."""

    live: bool
    outbox: Outbox


#: What wakes the sender: its future, the outbox's own drain, or a room's broadcast.
Waiter = asyncio.Future[None] | _Drain | Broadcast


def _wake(waiter: Waiter | None) -> None:
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
        self._waiters: list[Waiter] = []
        self._handle: asyncio.TimerHandle | None = None

    def hold(self, waiter: Waiter) -> None:
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
            if isinstance(waiter, asyncio.Future):
                _wake(waiter)
            else:
                waiter.drain_now()


class Chunk:
    """Encoded messages queued together, shared by every outbox that queues them.

    ``joined`` is ``",".join(texts)``, made once for all the outboxes, so a
    batching sender that takes the whole chunk adds one string to its frame
    (or, writing to a :class:`FrameSink`, the same frame bytes: :meth:`frame`).
    A queue holds chunks and single messages (``(text, size)`` pairs: a pair
    is not tracked by the garbage collector and costs nothing to make).
    """

    __slots__ = ("_frame", "_merged", "_pairs", "joined", "size", "sizes", "texts")

    def __init__(self, joined: str, size: int, texts: Sequence[str], sizes: Sequence[int],
                 pairs: Sequence[tuple[str, int]] | None = None) -> None:
        self.joined = joined
        #: Encoded bytes of all the messages.
        self.size = size
        self.texts = texts
        self.sizes = sizes
        self._pairs = pairs
        self._frame: tuple[bytes, bytes] | None = None
        #: The last :meth:`merged` answer, ``(next, merged)``: members in step share it.
        self._merged: tuple[Chunk, Chunk] | None = None

    @classmethod
    def of(cls, texts: Sequence[str], sizes: Sequence[int]) -> Chunk:
        """A chunk of these messages (joined here, once)."""
        return cls(",".join(texts), sum(sizes), texts, sizes)

    @property
    def pairs(self) -> Sequence[tuple[str, int]]:
        """The messages as ``(text, size)`` pairs, for the outboxes that send one per frame."""
        pairs = self._pairs
        if pairs is None:
            pairs = self._pairs = list(zip(self.texts, self.sizes, strict=True))
        return pairs

    def merged(self, following: Chunk) -> Chunk:
        """This chunk and ``following`` as one, made once for every outbox that queued both.

        A batching outbox that still holds this chunk whole when ``following``
        arrives queues the merged chunk instead, so connections in step (all
        of a busy room's live members) share one frame's bytes, however many
        reads the write window gathered.
        """
        merged = self._merged
        if merged is not None and merged[0] is following:
            return merged[1]
        chunk = Chunk(self.joined + "," + following.joined, self.size + following.size,
                      [*self.texts, *following.texts], [*self.sizes, *following.sizes])
        self._merged = (following, chunk)
        return chunk

    def frame(self) -> tuple[bytes, bytes]:
        """The whole chunk as one batching array frame, ``(frame, payload)``, encoded on first use."""
        frame = self._frame
        if frame is None:
            # one message goes bare, as a batching sender sends it (see Outbox._take)
            payload = (self.joined if len(self.texts) == 1 else "[" + self.joined + "]").encode()
            frame = self._frame = (text_frame(payload), payload)
        return frame


class Outbox:
    """Encoded messages waiting for one connection, oldest first."""

    __slots__ = (
        "_count",
        "_held",
        "_items",
        "_on_broken",
        "_on_overflow",
        "_pos",
        "_pump_task",
        "_sending_since",
        "_sink",
        "_size",
        "_space_waiter",
        "_stalled",
        "_stats",
        "_timeout",
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
        self._waiter: Waiter | None = None
        #: Batching: the sender's wait, held by ``_window`` until it ends (or a frame's worth is queued).
        self._window = window
        self._held: Waiter | None = None
        #: A replay's wait for room (``put_wait``).
        self._space_waiter: asyncio.Future[None] | None = None
        self.overflowed = False
        self.closed = False
        #: The loop's clock (``loop.time()``) when the last frame was handed to the socket.
        self.last_sent = asyncio.get_running_loop().time()
        self.messages_sent = 0
        #: Loop time at which the send in progress started; None between sends.
        self._sending_since: float | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._stalled = False
        #: Writing through (:meth:`write_through`): the sink, the stall timeout, who hears of a failure.
        self._sink: FrameSink | None = None
        self._timeout = 0.0
        self._on_broken: Callable[[bool], None] | None = None

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
        # (Cleared before the wake: a drain installs the next waiter itself.)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            _wake(waiter)
        elif self._held is not None:
            waiter, self._held = self._held, None
            _wake(waiter)
        return True

    def put_chunk(self, chunk: Chunk) -> bool:
        """Queue a (shared) chunk of encoded messages; the contract of :meth:`put_many`."""
        if self.closed or self.overflowed:
            return False
        size = chunk.size
        if self._size + size > self.limit:
            return all(self.put(text, n) for text, n in chunk.pairs)
        if self.batch:
            items = self._items
            last = items[-1] if items else None
            if (last is not None and not isinstance(last, tuple) and (self._pos == 0 or len(items) > 1)
                    and last.size + size <= BATCH_FRAME_BYTES):
                items[-1] = last.merged(chunk)
            else:
                items.append(chunk)
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

    @property
    def window(self) -> WriteWindow | None:
        """The write window that wakes this outbox (shared by the gateway's outboxes)."""
        return self._window

    def in_step(self) -> bool:
        """Whether a :class:`Broadcast` may stand in for the next ``put_chunk``.

        True for a batching outbox that writes through to a writable sink,
        with a window, and holds nothing: what it would send next is exactly
        the fan-out it is about to get.
        """
        sink = self._sink
        return (sink is not None and self.batch and not self._items and self._held is None
                and self._window is not None and sink.writable and not self.closed and not self.overflowed)

    def take_broadcast(self, chunk: Chunk, now: float) -> None:
        """A :class:`Broadcast`'s chunk: its shared frame now, or queued if the transport is not taking it."""
        sink = self._sink
        if self.closed or self.overflowed:
            return
        if sink is None or self._items or not sink.writable or chunk.size > BATCH_FRAME_BYTES:
            # paused (or something was queued meanwhile): in order, as any fan-out
            self.put_chunk(chunk)
            return
        frame, payload = chunk.frame()
        if not sink.write(frame, payload):
            self._broken(stalled=False)
            return
        count = len(chunk.texts)
        self.last_sent = now
        self.messages_sent += count
        self._stats.count_sent(1, count)

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
            held, self._held = self._held, None
            _wake(held)

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
        self.detach()
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
        if isinstance(entry, tuple):
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
            if isinstance(entry, tuple):
                text, size = entry
                if parts and total + size > BATCH_FRAME_BYTES:
                    break
                items.popleft()
                parts.append(text)
                total += size
                count += 1
                continue
            chunk = entry
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
                self._start_send(loop, timeout)
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

    def _start_send(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        """A send (or a pause) starts now: note when, and arm the watchdog unless it is armed."""
        self._sending_since = now = loop.time()
        if self._watchdog is None:
            self._watchdog = loop.call_at(now + timeout, self._check_stall, loop, timeout)

    def _check_stall(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        """The send watchdog: the reader stalled when one send (or a pause) has lasted ``timeout``.

        It cancels the pump, or tells the write-through owner. It re-arms
        itself for the deadline of the send in progress, and disarms while
        the sender is idle (the next send arms it again).
        """
        self._watchdog = None
        since = self._sending_since
        if since is None or (self._pump_task is None and self._sink is None):
            return
        due = since + timeout
        if loop.time() < due:
            self._watchdog = loop.call_at(due, self._check_stall, loop, timeout)
            return
        self._stalled = True
        if self._pump_task is not None:
            self._pump_task.cancel()
        else:
            self._broken(stalled=True)

    # ----------------------------------------------------------- writing through

    def write_through(self, sink: FrameSink, timeout: float, on_broken: Callable[[bool], None]) -> None:
        """From now on write frames to ``sink`` as they become ready, instead of a :meth:`pump` task.

        ``on_broken(stalled)`` is called once if writing ends on its own: the
        transport stayed paused for ``timeout`` seconds (True: a reader that
        stopped reading), or the connection is gone (False).
        """
        self._sink = sink
        self._timeout = timeout
        self._on_broken = on_broken
        sink.on_writable = self._drain
        self._waiter = _Drain(self)
        if self._items:
            _wake(self._waiter)

    def detach(self) -> None:
        """Stop writing through (before the last frames go by ``flush``, or at close)."""
        sink, self._sink = self._sink, None
        if sink is None:
            return
        sink.on_writable = None
        self._waiter = self._held = None
        self._sending_since = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _broken(self, *, stalled: bool) -> None:
        on_broken = self._on_broken
        self.detach()
        self._on_broken = None
        if on_broken is not None:
            on_broken(stalled)

    def _drain(self) -> None:
        """Write what is queued to the sink, until it is empty or the transport pauses."""
        sink = self._sink
        if sink is None:
            return
        self._held = self._waiter = None
        items = self._items
        loop = asyncio.get_running_loop()
        if sink.writable:
            # the transport drained since any pause: progress, so the stall clock starts over
            # (as the pump's timeout is per frame)
            self._sending_since = None
        frames = messages = 0
        while items and not self.closed:
            if not sink.writable:
                if self._sending_since is None:
                    self._start_send(loop, self._timeout)
                break  # the sink's on_writable drains again
            frame, payload, count = self._take_frame()
            if not sink.write(frame, payload):
                self._broken(stalled=False)
                break
            frames += 1
            messages += count
        else:
            self._sending_since = None
            if not self.closed:
                self._waiter = _Drain(self)
        if frames:
            self.last_sent = loop.time()
            self.messages_sent += messages
            self._stats.count_sent(frames, messages)

    def _take_frame(self) -> tuple[bytes, bytes, int]:
        """The next frame as ``(frame, payload, messages)``; a whole chunk's is shared by every outbox."""
        items = self._items
        if self.batch and len(items) == 1 and self._pos == 0:
            chunk = items[0]
            if not isinstance(chunk, tuple) and chunk.size <= BATCH_FRAME_BYTES:
                items.popleft()
                count = len(chunk.texts)
                self._count -= count
                self._release(chunk.size)
                frame, payload = chunk.frame()
                return frame, payload, count
        text, count = self._take()
        payload = text.encode()
        return text_frame(payload), payload, count

    async def flush(self, send: Callable[[str], Awaitable[None]], timeout: float) -> None:
        """Send what is still queued (before a polite close), within ``timeout`` in total."""
        with anyio.move_on_after(timeout):
            while self._items and not self.closed:
                frame, count = self._take()
                await send(frame)
                self.messages_sent += count
