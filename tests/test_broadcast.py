"""A room's broadcast: members in step get the window's reads as one shared frame, and nothing twice or out of order.

The hub fans reads out (``Hub._deliver``) to outboxes that write through to
recording sinks (the transport's side of ``FrameSink``); each test checks
every member's frames against the entries it should have got, in order.
"""

from __future__ import annotations

import json
import types
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from progress_service.gateway.hub import Hub, Member
from progress_service.gateway.outbox import Outbox, WriteWindow
from frame_sinks import RecordingSink

#: Long enough that a test's reads all fall in one window, even on a busy machine.
WINDOW = 0.2


@pytest.fixture
async def hub(redis_url: str) -> AsyncIterator[Hub]:
    redis = Redis.from_url(redis_url)
    try:
        yield Hub(types.SimpleNamespace(redis=redis, redis_url=redis_url, engine=None), "t")  # type: ignore[arg-type]
    finally:
        await redis.aclose()


def _entries(first: int, n: int) -> list[Any]:
    """``n`` stream entries with ids from ``first``, as the broker reads them."""
    return [(f"{i}-0".encode(), {b"t": b"event", b"b": json.dumps({"kind": "log", "n": i}).encode()})
            for i in range(first, first + n)]


class Watcher:
    """One live member of the room: a batching outbox writing through to a recording sink."""

    def __init__(self, hub: Hub, window: WriteWindow, *, batch: bool = True, after: int = 0) -> None:
        self.sink = RecordingSink()
        self.broken: list[bool] = []
        self.outbox = Outbox(1 << 20, batch=batch, window=window)
        self.outbox.write_through(self.sink, 5.0, self.broken.append)
        self.member = Member(self.outbox)
        hub.add("job", self.member, head=None, presence_head=None)
        self.member.after = (after, 0)
        self.member.live = True

    def got(self) -> list[int]:
        """The entry numbers received, in order, whatever the framing."""
        out: list[int] = []
        for text in self.sink.texts():
            msg = json.loads(text)
            out.extend(m["n"] for m in (msg if isinstance(msg, list) else [msg]))
        return out


async def _until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(10):
        while not condition():
            await anyio.sleep(0.005)


async def test_members_in_step_get_the_windows_reads_as_one_shared_frame(hub: Hub) -> None:
    window = WriteWindow(WINDOW)
    watchers = [Watcher(hub, window) for _ in range(3)]
    room = hub.rooms["job"]
    for first in (1, 3, 5):
        hub._deliver(room, _entries(first, 2), 0)
    assert room.broadcast is not None and len(room.broadcast.members) == 3
    assert all(len(w.outbox) == 0 for w in watchers)  # nothing queued per member
    await _until(lambda: all(w.sink.frames for w in watchers))
    assert [w.got() for w in watchers] == [[1, 2, 3, 4, 5, 6]] * 3
    assert watchers[0].sink.frames[0] is watchers[1].sink.frames[0] is watchers[2].sink.frames[0]
    assert all(w.outbox.messages_sent == 6 for w in watchers)
    hub._deliver(room, _entries(7, 1), 0)  # the next window: a new broadcast, the next frame
    await _until(lambda: all(len(w.sink.frames) == 2 for w in watchers))
    assert [w.got() for w in watchers] == [[1, 2, 3, 4, 5, 6, 7]] * 3


async def test_a_member_that_falls_in_step_later_gets_only_what_follows(hub: Hub) -> None:
    """A member that was not in step at the window's first read does not join that broadcast (it would get it twice)."""
    window = WriteWindow(WINDOW)
    steady = Watcher(hub, window)
    late = Watcher(hub, window)
    late.member.live = False  # still replaying
    room = hub.rooms["job"]
    hub._deliver(room, _entries(1, 2), 0)
    late.member.live, late.member.after = True, (2, 0)  # caught up to 2 by its replay
    hub._deliver(room, _entries(3, 2), 0)
    await _until(lambda: bool(steady.sink.frames) and bool(late.sink.frames))
    await anyio.sleep(WINDOW * 1.5)
    assert steady.got() == [1, 2, 3, 4]
    assert late.got() == [3, 4]


async def test_a_member_that_had_part_of_a_read_gets_the_rest_once(hub: Hub) -> None:
    window = WriteWindow(WINDOW)
    steady = Watcher(hub, window)
    ahead = Watcher(hub, window, after=2)  # its replay reached 2-0
    room = hub.rooms["job"]
    hub._deliver(room, _entries(1, 4), 0)
    await _until(lambda: bool(steady.sink.frames) and bool(ahead.sink.frames))
    assert steady.got() == [1, 2, 3, 4] and ahead.got() == [3, 4]


async def test_a_transport_that_pauses_before_the_window_ends_gets_the_frame_when_it_drains(hub: Hub) -> None:
    window = WriteWindow(WINDOW)
    paused = Watcher(hub, window)
    other = Watcher(hub, window)
    room = hub.rooms["job"]
    hub._deliver(room, _entries(1, 2), 0)
    paused.sink.writable = False
    hub._deliver(room, _entries(3, 1), 0)
    await _until(lambda: bool(other.sink.frames))
    assert paused.sink.frames == [] and len(paused.outbox) == 3  # queued, in order
    hub._deliver(room, _entries(4, 1), 0)  # not in step now: queued behind it
    paused.sink.resume()
    assert paused.got() == [1, 2, 3, 4]
    await _until(lambda: other.got() == [1, 2, 3, 4])
    assert paused.broken == other.broken == []


async def test_a_read_past_a_frames_worth_writes_the_open_broadcast_first(hub: Hub) -> None:
    """The broadcast holds at most one frame's worth; the read that would pass it sends it first, then goes on."""
    window = WriteWindow(WINDOW)
    watchers = [Watcher(hub, window) for _ in range(2)]
    room = hub.rooms["job"]
    big = "x" * 40_000
    entries = [(f"{i}-0".encode(), {b"t": b"event", b"b": json.dumps({"n": i, "pad": big}).encode()})
               for i in (1, 2, 3)]
    for entry in entries:
        hub._deliver(room, [entry], 0)
    assert all(len(w.sink.frames) == 2 for w in watchers)  # 1 alone, then 2 alone: each passed a frame's worth
    await _until(lambda: all(len(w.sink.frames) == 3 for w in watchers))
    assert [w.got() for w in watchers] == [[1, 2, 3]] * 2


async def test_non_batching_and_gone_members_and_those_that_left(hub: Hub) -> None:
    window = WriteWindow(WINDOW)
    steady = Watcher(hub, window)
    plain = Watcher(hub, window, batch=False)  # one message per frame, its own queue
    gone = Watcher(hub, window)
    leaving = Watcher(hub, window)
    room = hub.rooms["job"]
    hub._deliver(room, _entries(1, 2), 0)
    assert room.broadcast is not None
    assert {id(m.outbox) for m in room.broadcast.members} == {id(steady.outbox), id(gone.outbox), id(leaving.outbox)}
    gone.sink.gone = True
    hub.remove("job", leaving.member)
    await _until(lambda: bool(steady.sink.frames) and len(plain.sink.frames) == 2 and bool(gone.broken))
    assert steady.got() == [1, 2] and plain.got() == [1, 2]
    assert gone.broken == [False] and gone.sink.frames == []
    assert leaving.sink.frames == []


async def test_a_window_of_zero_writes_soon_without_a_timer(hub: Hub) -> None:
    window = WriteWindow(0)
    watchers = [Watcher(hub, window) for _ in range(2)]
    room = hub.rooms["job"]
    hub._deliver(room, _entries(1, 2), 0)
    hub._deliver(room, _entries(3, 1), 0)  # same loop turn: merged into the same broadcast
    await _until(lambda: all(w.sink.frames for w in watchers))
    assert [w.got() for w in watchers] == [[1, 2, 3]] * 2
    assert all(len(w.sink.frames) == 1 for w in watchers)
