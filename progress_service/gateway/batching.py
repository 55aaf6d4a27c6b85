"""Requests that one task serves in batches, in arrival order (:class:`BatchQueue`).

A mass connect has hundreds of joins and connection-cap admissions in flight
at once; each of them sent alone is one Redis round trip. Queued here, the
ones that arrive while a batch is under way share the next one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar


class Request(Protocol):
    """A queued request: its waiter's future (done: answered, or the waiter gave up)."""

    @property
    def future(self) -> asyncio.Future[Any]: ...


R = TypeVar("R", bound=Request)


class BatchQueue(Generic[R]):
    """Requests waiting for :meth:`run`'s task, served at most ``max_batch`` at a time.

    A request whose future is already done when its batch is taken (its
    connection closed meanwhile) is not served.
    """

    __slots__ = ("_items", "_wake", "max_batch")

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self._items: list[R] = []
        self._wake = asyncio.Event()

    def put(self, request: R) -> None:
        """Queue ``request`` for the next batch."""
        self._items.append(request)
        self._wake.set()

    async def run(self, serve: Callable[[list[R]], Awaitable[None]]) -> None:
        """Await ``serve`` on each batch, one at a time, until cancelled.

        ``serve`` answers every request of its batch (an exception it lets
        out ends the loop).
        """
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._items:
                batch = [r for r in self._items[: self.max_batch] if not r.future.done()]
                del self._items[: self.max_batch]
                if batch:
                    await serve(batch)

    def drain(self) -> list[R]:
        """Take every request still queued (the serving task is stopping)."""
        items, self._items = self._items, []
        return items
