"""Who may join a room, and how joins wait for the store.

**One answer, one cost.** A join of another team's job must be
indistinguishable from a join of a missing job: same answer (``not_found``),
same work. Only a *positive* answer is cached (a job never changes team);
anything not known to be the caller's team is looked up in the store by
one indexed query, and the team ids are compared in constant time. So both
refusals cost one store round trip and no Redis round trip, and the cache
cannot be used to tell them apart.

**A storm waits instead of failing.** After a gateway restart every client
reconnects at once; each join (and each auth) reads the store. The reads
go through :class:`StoreGate`: at most ``ws_store_slots`` run at once (the
connection pool's size, not hundreds queued inside it), each bounded by
``store_timeout``; the others queue for up to ``ws_store_wait`` seconds.
A healthy store drains the queue in well under that; only a store that
is really down (or slower than the timeout) answers ``unavailable``.
Concurrent lookups of one job share a single read.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from progress_service.store.jobs import job_team

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

T = TypeVar("T")

#: Jobs whose team a gateway remembers at most.
JOB_TEAMS_MAX = 100_000


class StoreGate:
    """At most ``slots`` store reads at once; a read waits ``wait`` s for a slot, then runs ``timeout`` s."""

    def __init__(self, slots: int, *, wait: float, timeout: float) -> None:
        self.wait = wait
        self.timeout = timeout
        self._slots = asyncio.Semaphore(slots)

    async def call(self, read: Callable[[], Awaitable[T]]) -> T:
        """``await read()`` in a slot; :class:`TimeoutError` when no slot frees in time or it is too slow."""
        if self._slots.locked():  # (a free slot is taken at once: no timer for the usual case)
            async with asyncio.timeout(self.wait):
                await self._slots.acquire()
        else:
            await self._slots.acquire()
        try:
            async with asyncio.timeout(self.timeout):
                return await read()
        finally:
            self._slots.release()


class _Flight:
    __slots__ = ("done", "finished", "result")

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.finished = False
        self.result: str | None = None


class JobAccess:
    """``await allowed(job_id, team_id)``: may this team see the job (one code path for every no)."""

    def __init__(self, engine: AsyncEngine, gate: StoreGate) -> None:
        self.engine = engine
        self.gate = gate
        #: job id -> team id, positive answers only.
        self.teams: dict[str, str] = {}
        self._flights: dict[str, _Flight] = {}

    async def allowed(self, job_id: str, team_id: str) -> bool:
        """True when the job exists and belongs to ``team_id``; store errors propagate."""
        cached = self.teams.get(job_id)
        if cached is not None and _same(cached, team_id):
            return True
        found = await self._lookup(job_id)
        return found is not None and _same(found, team_id)

    def remember(self, job_id: str, team_id: str) -> None:
        """Cache a job's team (bounded: past the limit the oldest half is dropped)."""
        teams = self.teams
        if len(teams) >= JOB_TEAMS_MAX:
            for key in list(teams)[: len(teams) // 2]:
                del teams[key]
        teams[job_id] = team_id

    async def _lookup(self, job_id: str) -> str | None:
        """The job's team from the store; concurrent lookups of one job share one read.

        A follower whose leader failed or was cancelled reads itself (a
        store error is not shared: the follower gets its own, or its answer).
        """
        while True:
            flight = self._flights.get(job_id)
            if flight is None:
                break
            await flight.done.wait()
            if flight.finished:
                return flight.result
        flight = self._flights[job_id] = _Flight()
        try:
            team = await self.gate.call(lambda: job_team(self.engine, job_id))
            flight.result, flight.finished = team, True
        finally:
            del self._flights[job_id]
            flight.done.set()
        if team is not None:
            self.remember(job_id, team)
        return team


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
