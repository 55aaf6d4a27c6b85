"""SingleFlight (gateway.single_flight): concurrent callers of one key share one read, and nobody hangs."""

from __future__ import annotations

import asyncio

import pytest

from progress_service.gateway.single_flight import SingleFlight


async def test_callers_of_one_key_share_one_read_and_the_key_is_free_after() -> None:
    flights: SingleFlight[str, list[int]] = SingleFlight()
    reads = 0
    gate = asyncio.Event()

    async def read() -> list[int]:
        nonlocal reads
        reads += 1
        mine = reads
        await gate.wait()
        return [mine]

    callers = [asyncio.create_task(flights.run("room", read)) for _ in range(10)]
    other = asyncio.create_task(flights.run("other room", read))
    while len(flights) < 2:
        await asyncio.sleep(0)
    gate.set()
    answers = await asyncio.gather(*callers)
    assert answers == [[1]] * 10  # one read for the ten (the first caller's)
    assert all(a is answers[0] for a in answers)  # the same answer, shared
    assert await other == [2] and reads == 2 and len(flights) == 0
    assert await flights.run("room", read) == [3]  # nothing cached: a later caller reads afresh


async def test_a_failed_read_fails_every_caller_with_its_error() -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    gate = asyncio.Event()

    async def read() -> int:
        await gate.wait()
        raise ConnectionError("redis went away")

    callers = [asyncio.create_task(flights.run("room", read)) for _ in range(3)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert [type(r) for r in results] == [ConnectionError] * 3
    assert len(flights) == 0


async def test_a_cancelled_reader_leaves_its_waiters_to_read_themselves() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    first_started = asyncio.Event()
    never = asyncio.Event()

    async def stuck() -> str:
        first_started.set()
        await never.wait()
        return "never"

    async def quick() -> str:
        return "read by a waiter"

    reader = asyncio.create_task(flights.run("room", stuck))
    await first_started.wait()
    waiter = asyncio.create_task(flights.run("room", quick))  # joins the stuck read
    await asyncio.sleep(0)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert await asyncio.wait_for(waiter, 5) == "read by a waiter"
    assert len(flights) == 0


async def test_a_cancelled_waiter_does_not_cancel_the_read() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    gate = asyncio.Event()

    async def read() -> str:
        await gate.wait()
        return "answer"

    reader = asyncio.create_task(flights.run("room", read))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(flights.run("room", read))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    gate.set()
    assert await reader == "answer"
