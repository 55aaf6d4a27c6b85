"""The outbox's own contract: byte limit, wake-ups, the send watchdog, the exported gauge."""

from __future__ import annotations

import anyio
import pytest

from progress_service import metrics
from progress_service.errors import SendTimeout
from progress_service.gateway.outbox import BATCH_FRAME_BYTES, Chunk, Outbox, OutboxStats, WriteWindow


async def test_pump_times_out_a_send_that_never_returns() -> None:
    outbox = Outbox(1 << 20)
    never = anyio.Event()

    async def stuck(_frame: str) -> None:
        await never.wait()

    outbox.put("a", 1)
    start = anyio.current_time()
    with anyio.fail_after(5), pytest.raises(SendTimeout):
        await outbox.pump(stuck, 0.2)
    assert 0.2 <= anyio.current_time() - start < 2


async def test_slow_sends_that_progress_are_not_a_timeout() -> None:
    """The timeout is per frame: many frames, each under it, together well over it."""
    outbox = Outbox(1 << 20)
    sent: list[str] = []

    async def slow(frame: str) -> None:
        await anyio.sleep(0.05)
        sent.append(frame)
        if len(sent) == 12:
            outbox.close()

    for i in range(12):
        outbox.put(str(i), 1)
    with anyio.fail_after(5):
        await outbox.pump(slow, 0.2)  # returns (closed) instead of raising
    assert sent == [str(i) for i in range(12)]


async def test_idle_pump_is_not_a_timeout_and_wakes_on_put() -> None:
    outbox = Outbox(1 << 20, batch=True)
    frames: list[str] = []

    async def send(frame: str) -> None:
        frames.append(frame)

    async with anyio.create_task_group() as tg:
        tg.start_soon(outbox.pump, send, 0.05)
        await anyio.sleep(0.2)  # idle for four timeouts
        outbox.put_many([('{"a":1}', 7), ('{"b":2}', 7)], 14)
        with anyio.fail_after(2):
            while not frames:
                await anyio.sleep(0.01)
        outbox.close()
    assert frames == ['[{"a":1},{"b":2}]']
    assert outbox.messages_sent == 2


async def test_put_many_overflow_queues_what_fits_and_reports_once() -> None:
    overflows = []
    outbox = Outbox(10, on_overflow=lambda: overflows.append(1))
    assert not outbox.put_many([("aaaa", 4), ("bbbb", 4), ("cccc", 4)], 12)
    assert len(outbox) == 2 and outbox.size == 8
    assert not outbox.put("d", 1)
    assert overflows == [1]


async def test_queued_bytes_gauge_follows_puts_sends_and_close() -> None:
    stats = OutboxStats()
    outbox = Outbox(1 << 20, stats=stats)
    outbox.put("x" * 10, 10)
    outbox.put_many([("y" * 5, 5), ("z" * 5, 5)], 10)
    assert stats.queued() == 20
    metrics.ws_outbox_bytes.set_function(stats.queued)  # what a running Gateway hooks
    assert metrics.ws_outbox_bytes.collect()[0].samples[0].value == 20
    assert await outbox.get() == "x" * 10
    assert stats.queued() == 10
    outbox.close()
    assert stats.queued() == 0
    metrics.ws_outbox_bytes.set_function(lambda: 0)
    assert await outbox.get() is None


async def test_put_wait_waits_for_room() -> None:
    outbox = Outbox(10)
    outbox.put("a" * 8, 8)
    done = anyio.Event()

    async def replay() -> None:
        assert await outbox.put_wait("b" * 8, 8)
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(replay)
        await anyio.sleep(0.05)
        assert not done.is_set()
        assert await outbox.get() == "a" * 8
        with anyio.fail_after(2):
            await done.wait()
    assert await outbox.get() == "b" * 8


async def test_shared_chunk_becomes_one_array_frame_per_batching_outbox() -> None:
    chunk = Chunk.of(['{"a":1}', '{"b":2}', '{"c":3}'], [7, 7, 7])
    first, second = Outbox(1 << 20, batch=True), Outbox(1 << 20, batch=True)
    assert first.put_chunk(chunk) and second.put_chunk(chunk)
    assert first.put('{"d":4}', 7)
    assert len(first) == 4 and first.size == 28
    assert first._take() == ('[{"a":1},{"b":2},{"c":3},{"d":4}]', 4)
    assert second._take() == ('[{"a":1},{"b":2},{"c":3}]', 3)
    assert len(first) == 0 and first.size == 0 and len(second) == 0


async def test_chunk_to_an_unbatched_outbox_is_one_frame_per_message_in_order() -> None:
    outbox = Outbox(1 << 20)
    outbox.put("x", 1)
    outbox.put_chunk(Chunk.of(["a", "b", "c"], [1, 1, 1]))
    outbox.put("y", 1)
    assert [outbox._take() for _ in range(5)] == [("x", 1), ("a", 1), ("b", 1), ("c", 1), ("y", 1)]
    assert len(outbox) == 0 and outbox.size == 0


async def test_a_chunk_larger_than_a_frame_spans_frames_without_loss_or_reorder() -> None:
    big = "x" * (BATCH_FRAME_BYTES // 3 + 1)  # three of them do not fit one frame
    texts = [f'"{i}{big}"' for i in range(7)]
    sizes = [len(t) for t in texts]
    outbox = Outbox(1 << 30, batch=True)
    outbox.put("0", 1)
    outbox.put_chunk(Chunk.of(texts, sizes))
    outbox.put("1", 1)
    got: list[str] = []
    while len(outbox):
        frame, count = outbox._take()
        parts = [p for p in frame[1:-1].split(",")] if frame.startswith("[") else [frame]
        assert len(parts) == count
        assert count == 1 or sum(len(p) for p in parts) <= BATCH_FRAME_BYTES
        got += parts
    assert got == ["0", *texts, "1"]
    assert outbox.size == 0


async def test_a_single_message_larger_than_a_frame_is_sent_alone() -> None:
    huge = "y" * (BATCH_FRAME_BYTES + 10)
    outbox = Outbox(1 << 30, batch=True)
    outbox.put_chunk(Chunk.of([huge, "z"], [len(huge), 1]))
    assert outbox._take() == (f"[{huge}]", 1)
    assert outbox._take() == ("z", 1)


async def test_put_chunk_overflow_queues_what_fits_and_reports_once() -> None:
    overflows: list[int] = []
    outbox = Outbox(10, batch=True, on_overflow=lambda: overflows.append(1))
    assert not outbox.put_chunk(Chunk.of(["aaaa", "bbbb", "cccc"], [4, 4, 4]))
    assert len(outbox) == 2 and outbox.size == 8 and overflows == [1]
    assert outbox._take() == ("[aaaa,bbbb]", 2)


async def _frames_sent(outbox: Outbox, feed) -> list[str]:
    """Run ``outbox``'s pump while ``feed(outbox)`` queues; the frames sent."""
    frames: list[str] = []

    async def send(frame: str) -> None:
        frames.append(frame)

    async with anyio.create_task_group() as tg:
        tg.start_soon(outbox.pump, send, 5.0)
        await anyio.sleep(0.01)
        with anyio.fail_after(5):
            await feed(outbox)
        outbox.close()
    return frames


async def test_write_window_sends_fan_out_of_several_reads_in_one_frame() -> None:
    """Three hub hand-offs within the window: one array frame, in order; not batching: one frame each."""

    async def feed(outbox: Outbox) -> None:
        for i in range(3):
            outbox.put_chunk(Chunk.of([f'{{"n":{i}}}'], [7]))
            await anyio.sleep(0)  # other work of the loop in between, well inside the window
        while outbox.messages_sent < 3:  # the window's end (or at once, unbatched)
            await anyio.sleep(0.01)

    window = WriteWindow(0.5)
    assert await _frames_sent(Outbox(1 << 20, batch=True, window=window), feed) == ['[{"n":0},{"n":1},{"n":2}]']
    unbatched = await _frames_sent(Outbox(1 << 20, window=window), feed)
    assert unbatched == ['{"n":0}', '{"n":1}', '{"n":2}']


async def test_write_window_gives_way_to_a_reply_and_to_a_full_frame() -> None:
    window = WriteWindow(10.0)  # longer than the test: only the reply or the byte bound can wake the sender

    async def reply(outbox: Outbox) -> None:
        outbox.put_chunk(Chunk.of(['{"e":1}'], [7]))
        await anyio.sleep(0.01)
        outbox.put('{"type":"ack"}', 14)
        while outbox.messages_sent < 2:
            await anyio.sleep(0.005)

    assert await _frames_sent(Outbox(1 << 20, batch=True, window=window), reply) == ['[{"e":1},{"type":"ack"}]']

    big = "x" * (BATCH_FRAME_BYTES // 2)

    async def full(outbox: Outbox) -> None:
        outbox.put_chunk(Chunk.of([f'"{big}"'], [len(big) + 2]))
        await anyio.sleep(0.01)
        assert outbox.messages_sent == 0  # held by the window
        outbox.put_chunk(Chunk.of([f'"{big}"'], [len(big) + 2]))
        while outbox.messages_sent < 2:
            await anyio.sleep(0.005)

    assert len(await _frames_sent(Outbox(1 << 20, batch=True, window=window), full)) >= 1
