"""The Redis reads of every join waiting in this process, batched (:class:`JoinReads`).

A mass connect has hundreds of joins in flight; one MULTI each took a
pooled Redis connection each (the pool grew to hundreds of connections,
each with its health check and socket) and paid redis-py's per-pipeline
overhead per join (about 13 % of a mass connect). Here the joins that
arrive while one batch is under way share the next: one round trip per
batch, and one read of each room in it. A join's commands are still
atomic: on one Redis the whole batch is one MULTI; on a Redis Cluster
(where a MULTI may only name keys of one slot) the batch is one MULTI per
slot, sent to the slots' masters at once.
A reply that is an error fails only its join.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.exceptions import NoScriptError, RedisError

from progress_service.gateway.batching import BatchQueue
from progress_service.keys import events_key, snapshot_key
from progress_service.outage import STORE_ERRORS
from progress_service.redis_client import slot_of
from progress_service.store.identity import Principal

log = logging.getLogger("progress_service.gateway.joins")

#: Joins sharing one MULTI at most (a presence script each, and a room's reads once).
JOIN_BATCH_MAX = 500
#: Commands reading a room (snapshot, last, first, length, counters), once per room per MULTI.
ROOM_READS = 5
#: On a cluster: per-slot MULTIs of one batch in flight at once.
SLOT_MULTIS_IN_FLIGHT = 32


class _JoinRead:
    __slots__ = ("conn_id", "future", "job_id", "principal", "since")

    def __init__(self, job_id: str, since: str | None, conn_id: str, principal: Principal, future: asyncio.Future[Any]) -> None:
        self.job_id = job_id
        self.since = since
        self.conn_id = conn_id
        self.principal = principal
        self.future = future


class JoinReads:
    """The Redis reads of every join waiting in this process: one MULTI per slot per batch."""

    def __init__(self, redis: Any, presence: Any) -> None:
        self.redis = redis
        self.presence = presence
        self._pending: BatchQueue[_JoinRead] = BatchQueue(JOIN_BATCH_MAX)

    def read(self, job_id: str, since: str | None, conn_id: str, principal: Principal) -> asyncio.Future[Any]:
        """Queue a join's reads; the future gives ``(presence entry, replies)``.

        The replies are: snapshot, last event, first event, stream length,
        (entries ever added, whole-stream mark), then the presence-log id and
        the room's members after the join (``Presence.observe``).
        """
        future = asyncio.get_running_loop().create_future()
        self._pending.put(_JoinRead(job_id, since, conn_id, principal, future))
        return future

    async def run(self) -> None:
        """Run the queued joins' MULTIs, one at a time, until cancelled."""
        await self._pending.run(self._serve)

    async def _serve(self, batch: list[_JoinRead]) -> None:
        try:
            await self._execute(batch)
        except Exception as exc:  # every waiter hears of it; none is left hanging
            if not isinstance(exc, STORE_ERRORS):
                log.exception("gateway: join batch failed")
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(exc)

    async def _execute(self, batch: list[_JoinRead]) -> None:
        # Joins grouped by slot, in arrival order within each (one group on
        # one Redis): presence replies of one room must be observed in order.
        # A group that fails (its shard is down) fails only its own joins.
        groups: dict[int, list[_JoinRead]] = {}
        for j in batch:
            groups.setdefault(slot_of(self.redis, events_key(j.job_id)), []).append(j)
        if len(groups) == 1:
            await self._group(batch)
            return
        self.presence.start_batch()
        # Bounded: a mass connect's batch spans hundreds of slots, and each
        # MULTI in flight holds a connection to its master.
        slots = asyncio.Semaphore(SLOT_MULTIS_IN_FLIGHT)

        async def bounded(group: list[_JoinRead]) -> None:
            async with slots:
                await self._group(group, fresh=False)

        outcomes = await asyncio.gather(*(bounded(g) for g in groups.values()), return_exceptions=True)
        for group, outcome in zip(groups.values(), outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, STORE_ERRORS):
                    log.error("gateway: join group failed", exc_info=outcome)
                for j in group:
                    if not j.future.done():
                        j.future.set_exception(outcome)

    async def _group(self, group: list[_JoinRead], *, fresh: bool = True) -> None:
        """One MULTI for joins of one slot (or of one Redis), retried once after NOSCRIPT."""
        rooms = {j.job_id for j in group}
        for attempt in (1, 2):
            if fresh or attempt == 2:
                self.presence.start_batch(rooms if not fresh else None)
            try:
                entries, replies = await self._multi(group)
            except NoScriptError:
                if attempt == 2:
                    raise
                await self.presence.load_scripts()
                continue
            if attempt == 1 and any(isinstance(r[-1], NoScriptError) for r in replies):
                await self.presence.load_scripts()  # Redis lost its scripts: run the batch again
                continue
            break
        self._answer(group, entries, replies)

    async def _multi(self, group: list[_JoinRead]) -> tuple[list[str], list[list[Any]]]:
        """One MULTI of a group's joins (same slot, or all on one Redis); the entries and each join's replies.

        A room's reads are the same for every join of it, and a MULTI is one
        point in time: they are sent once per room, and each join gets them
        with its own presence reply (a mass connect into one room sends 1
        command per join, not 6).
        """
        presence = self.presence
        entries: list[str] = []
        room_at: dict[str, int] = {}  # job id -> index of its first read's reply
        presence_at: list[int] = []
        n = 0
        async with self.redis.pipeline(transaction=True) as pipe:
            for j in group:
                if j.job_id not in room_at:
                    room_at[j.job_id] = n
                    events, snap = events_key(j.job_id), snapshot_key(j.job_id)
                    pipe.hget(snap, "s")
                    pipe.xrevrange(events, count=1)
                    # what Redis holds of the stream (streams.coverage_of)
                    pipe.xrange(events, count=1)
                    pipe.xlen(events)
                    pipe.hmget(snap, "n", "k")
                    n += ROOM_READS
                entries.append(presence.queue_join(pipe, j.job_id, j.conn_id, j.principal))
                presence_at.append(n)
                n += 1
            replies = await pipe.execute(raise_on_error=False)
        per_join = [[*replies[room_at[j.job_id] : room_at[j.job_id] + ROOM_READS], replies[at]]
                    for j, at in zip(group, presence_at, strict=True)]
        return entries, per_join

    def _answer(self, batch: list[_JoinRead], entries: list[str], per_join: list[list[Any]]) -> None:
        presence = self.presence
        for j, entry, mine in zip(batch, entries, per_join, strict=True):
            # Every reply, in order, even of a join that gave up: each follows from the one before.
            observed = presence.observe(j.job_id, j.principal, mine[-1])
            if j.future.done():  # its join gave up (timeout, close)
                continue
            if not isinstance(mine[-1], Exception):
                mine[-1] = observed if observed is not None else RedisError("presence view lost in this batch")
            error = next((r for r in mine if isinstance(r, Exception)), None)
            if error is not None:
                j.future.set_exception(error)
            else:
                j.future.set_result((entry, mine))
