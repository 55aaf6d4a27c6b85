"""``gateway.batching.BatchQueue``: arrival order, the batch bound, waiters that gave up."""

from __future__ import annotations

import asyncio

import anyio

from progress_service.gateway.batching import BatchQueue


class _Req:
    __slots__ = ("future", "n")

    def __init__(self, n: int) -> None:
        self.n = n
        self.future: asyncio.Future[int] = asyncio.get_running_loop().create_future()


async def test_requests_at_once_share_bounded_batches_in_order_and_gave_up_ones_are_skipped() -> None:
    queue: BatchQueue[_Req] = BatchQueue(max_batch=4)
    batches: list[list[int]] = []

    async def serve(batch: list[_Req]) -> None:
        batches.append([r.n for r in batch])
        await asyncio.sleep(0)  # a round trip: requests put meanwhile wait for the next batch
        for r in batch:
            r.future.set_result(r.n * 10)

    reqs = [_Req(n) for n in range(10)]
    reqs[2].future.cancel()  # its connection closed before its batch
    async with anyio.create_task_group() as tg:
        tg.start_soon(queue.run, serve)
        for r in reqs:
            queue.put(r)
        answers = [await r.future for r in reqs if not r.future.cancelled()]
        late = _Req(99)
        queue.put(late)
        assert await late.future == 990
        tg.cancel_scope.cancel()
    assert answers == [n * 10 for n in range(10) if n != 2]
    assert batches == [[0, 1, 3], [4, 5, 6, 7], [8, 9], [99]]
    assert queue.drain() == []


async def test_drain_hands_back_what_no_batch_took() -> None:
    queue: BatchQueue[_Req] = BatchQueue(max_batch=2)
    reqs = [_Req(n) for n in range(3)]
    for r in reqs:
        queue.put(r)
    assert queue.drain() == reqs
    assert queue.drain() == []
