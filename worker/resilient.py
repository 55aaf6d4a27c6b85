"""An arq worker that outlives Redis: :class:`ResilientWorker`.

arq's poll loop ends on the first ``ConnectionError`` (Redis restarting,
loading its AOF, a network blip), and with it the worker process, abandoning
every running CLI. Here the loop waits the outage out instead: it backs off
(0.2 s doubling to 5 s), logs one line when Redis goes away and one when it
is back, and goes on polling. Running jobs are not touched: they wait out
the outage themselves (:mod:`worker.jobs`).
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from arq.connections import create_pool
from arq.worker import Worker
from redis.exceptions import WatchError

from worker.outage import REDIS_DOWN, Link, log

#: Longest pause between two polls while Redis is down (seconds).
MAX_BACKOFF = 5.0
#: What a poll can raise while Redis is away. redis-py reports a connection
#: lost inside ``WATCH`` (arq's claim pipeline) as a ``WatchError``.
POLL_DOWN = REDIS_DOWN + (WatchError,)


class ResilientWorker(Worker):
    """arq's ``Worker`` whose connect and poll steps survive Redis outages of any length."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.redis_link = Link("Redis (worker poll loop)")
        self._backoff = 0.2
        self._stopping = False

    async def _pause(self, exc: BaseException) -> None:
        self.redis_link.down(exc)
        await asyncio.sleep(self._backoff)
        self._backoff = min(MAX_BACKOFF, self._backoff * 2)

    async def main(self) -> None:
        """Connect (waiting for Redis however long it takes), then run arq's loop."""
        while self._pool is None:
            try:
                self._pool = await create_pool(
                    self.redis_settings,
                    job_deserializer=self.job_deserializer,
                    job_serializer=self.job_serializer,
                    default_queue_name=self.queue_name,
                    expires_extra_ms=self.expires_extra_ms,
                )
            except REDIS_DOWN as exc:
                await self._pause(exc)
        self.redis_link.up()
        self._backoff = 0.2
        await super().main()

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except POLL_DOWN as exc:
            await self._pause(exc)
        else:
            self.redis_link.up()
            self._backoff = 0.2

    def handle_sig(self, signum: signal.Signals) -> None:
        """Stop (once: ``close`` after a signal must not cancel and log it all again)."""
        if self._stopping:
            return
        self._stopping = True
        super().handle_sig(signum)

    async def close(self) -> None:
        """arq's ``close``, made safe for what can happen while stopping.

        arq gathers its job tasks without ``return_exceptions``: a task that
        the stop cancelled while it was recording its result (after our job
        function returned) would raise ``CancelledError`` into the caller of
        ``close``. Those tasks are awaited here first, whatever they raise.
        With Redis down it still runs ``on_shutdown`` and ends without a
        traceback.
        """
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        self.tasks.clear()
        try:
            await super().close()
        except REDIS_DOWN as exc:
            log.warning("Redis unavailable while the worker stopped (%s); its health key will expire", exc)
            if self.on_shutdown:
                await self.on_shutdown(self.ctx)
            self._pool = None

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's ``start_jobs``, one id at a time, giving back the slot a Redis error took.

        arq counts a job and takes a semaphore slot before its claim
        pipeline; a ``ConnectionError`` in that pipeline would leak both, and
        a few outages would leave the worker unable to take any job.
        """
        for job_id in job_ids:
            try:
                await super().start_jobs([job_id])
            except POLL_DOWN:
                self.job_counter -= 1
                self.sem.release()
                raise
