"""Living through Redis and store outages: which errors mean "down", and waiting them out.

A worker must outlast a dependency that blinks or stays away for an hour:
the errors below are "the dependency is unreachable, try again", never a
reason to end a job or a process. :class:`Link` keeps the log to one line
when a dependency goes away and one when it is back, instead of a traceback
per attempt.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import InterfaceError, OperationalError

T = TypeVar("T")

log = logging.getLogger("progress_service.worker")

#: Errors that mean Redis is unreachable (restarting, loading its AOF, network).
REDIS_DOWN: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, ConnectionError, asyncio.TimeoutError)
#: Errors that mean the SQL store is unreachable.
STORE_DOWN: tuple[type[BaseException], ...] = (OperationalError, InterfaceError, ConnectionError, OSError)
#: Either of them.
DEPENDENCY_DOWN = REDIS_DOWN + STORE_DOWN


class Link:
    """The state of one dependency as one user of it sees it; logs only the changes."""

    def __init__(self, name: str, logger: logging.Logger = log) -> None:
        self.name = name
        self.log = logger
        self.since: float | None = None  # when it went down (None: up)

    @property
    def is_up(self) -> bool:
        """False between a failure and the next success."""
        return self.since is None

    def down(self, exc: BaseException) -> None:
        """Record a failure; logs the first one of an outage only."""
        if self.since is None:
            self.since = anyio.current_time()
            self.log.warning("%s unavailable (%s: %s); retrying until it is back", self.name, type(exc).__name__, exc)

    def up(self) -> None:
        """Record a success; logs the end of an outage."""
        if self.since is not None:
            self.log.warning("%s is back after %.1f s", self.name, anyio.current_time() - self.since)
            self.since = None


async def persist(op: Callable[[], Awaitable[T]], link: Link, *, cap: float = 5.0) -> T:
    """Run ``op`` until it succeeds, waiting out outages (backoff up to ``cap`` seconds).

    For the writes a job cannot end without (its final status, handing it
    back). Only cancellation ends the wait; any other error is raised.
    """
    delay = 0.1
    while True:
        try:
            result = await op()
        except DEPENDENCY_DOWN as exc:
            link.down(exc)
            await anyio.sleep(delay)
            delay = min(cap, delay * 2)
        else:
            link.up()
            return result
