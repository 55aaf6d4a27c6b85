"""Single flight: concurrent callers asking the same question share one answer.

A join storm into one room (a deploy, a page shared in chat) asks Redis the
same replay question hundreds of times at once; the first caller reads, the
others await its answer. Nothing is cached: once the read is answered the key
is free again, so a later caller reads afresh.

Only the caller that reads can be cancelled out of the read: the others wait
through ``asyncio.shield``. When the reader is cancelled, its waiters read
themselves instead (:class:`_Abandoned` never leaves this module); when the
read fails, every waiter gets the same error, as if it had read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Abandoned(Exception):
    """The reader was cancelled before it had an answer."""


class SingleFlight(Generic[K, V]):
    """At most one ``read`` per key in flight; callers of that key share its answer."""

    __slots__ = ("_flights",)

    def __init__(self) -> None:
        self._flights: dict[K, asyncio.Future[V]] = {}

    def __len__(self) -> int:
        """Reads in flight now."""
        return len(self._flights)

    async def run(self, key: K, read: Callable[[], Awaitable[V]]) -> V:
        """``await read()``, or the answer of the read of ``key`` already in flight.

        The answer is shared between callers: treat it as read-only.
        """
        while True:
            flight = self._flights.get(key)
            if flight is None:
                break
            try:
                return await asyncio.shield(flight)
            except _Abandoned:
                continue  # its reader was cancelled: read (or join a newer read)
        flight = asyncio.get_running_loop().create_future()
        self._flights[key] = flight
        try:
            answer = await read()
        except BaseException as exc:
            flight.set_exception(exc if isinstance(exc, Exception) else _Abandoned())
            flight.exception()  # retrieved: no "never retrieved" warning when nobody waited
            raise
        else:
            flight.set_result(answer)
            return answer
        finally:
            del self._flights[key]
