"""The outbox's own contract: byte limit, wake-ups, the send watchdog, the exported gauge."""

from __future__ import annotations

import anyio
import pytest

from progress_service import metrics
from progress_service.gateway.outbox import Outbox, SendTimeout, queued_bytes


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
    base = queued_bytes()
    outbox = Outbox(1 << 20)
    outbox.put("x" * 10, 10)
    outbox.put_many([("y" * 5, 5), ("z" * 5, 5)], 10)
    assert queued_bytes() == base + 20
    assert metrics.ws_outbox_bytes.collect()[0].samples[0].value == base + 20
    assert await outbox.get() == "x" * 10
    assert queued_bytes() == base + 10
    outbox.close()
    assert queued_bytes() == base
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
