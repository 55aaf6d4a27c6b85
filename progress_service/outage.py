"""Telling a dependency outage (the SQL store, Redis) apart from a bug.

An outage is not the client's fault and not a bug of ours: HTTP answers
``503`` with ``Retry-After`` and the API's error body, the log gets one
warning line (no traceback), the WebSocket gets ``unavailable``. Anything
else that escapes a handler stays a logged ``500``.

:func:`classify` walks the exception, what caused it (``__cause__`` /
``__context__``: SQLAlchemy wraps the driver's error, which wraps the
socket's) and the members of exception groups (task groups).
"""

from __future__ import annotations

import errno
import logging
import socket
import sqlite3
import time
from typing import Literal

import sqlalchemy.exc as sa_exc
from redis import exceptions as redis_exc

from progress_service import metrics

log = logging.getLogger("progress_service.outage")

Dependency = Literal["store", "redis", "network"]

#: Seconds a client should wait before retrying a 503.
RETRY_AFTER_SECONDS = 2

#: What a call to the store or Redis raises when the dependency is down or too
#: slow (the gateway answers these ``unavailable`` instead of closing 1011).
STORE_ERRORS = (redis_exc.RedisError, sa_exc.SQLAlchemyError, OSError, TimeoutError)

#: Socket errors that mean "the other side is not there (now)".
_NETWORK_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ETIMEDOUT,
    }
)

#: PostgreSQL error classes of an unavailable server: connection exceptions
#: (08), "the database system is starting up / shutting down" (57P),
#: insufficient resources such as too many connections (53).
_OUTAGE_SQLSTATES = ("08", "57P", "53")

_REDIS_TYPES: tuple[type[BaseException], ...] = (
    redis_exc.ConnectionError,  # includes BusyLoadingError (Redis loading its AOF)
    redis_exc.TimeoutError,
    redis_exc.ClusterDownError,
)
_STORE_TYPES: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError,  # connection lost, "database is locked", server shutting down
    sa_exc.InterfaceError,  # the driver's connection is closed
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,  # the pool had no connection in time
    sqlite3.OperationalError,
)


def _asyncpg_types() -> tuple[type[BaseException], ...]:
    try:
        import asyncpg  # noqa: PLC0415 - optional: only with a PostgreSQL store
    except ImportError:
        return ()
    names = ("PostgresConnectionError", "OperatorInterventionError", "ConnectionDoesNotExistError", "InterfaceError")
    return tuple(t for t in (getattr(asyncpg.exceptions, n, None) for n in names) if isinstance(t, type))


_STORE_TYPES += _asyncpg_types()


def _network(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)):
        return True
    if isinstance(exc, OSError):
        # asyncpg/asyncio connecting to a name with several addresses raise
        # a plain OSError("Multiple exceptions: [Errno 111] ...").
        return exc.errno in _NETWORK_ERRNOS or str(exc).startswith("Multiple exceptions")
    return False


def classify(exc: BaseException) -> Dependency | None:
    """Which dependency's outage ``exc`` is, or None for anything else (a bug)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    network = False
    while todo:
        cur = todo.pop()
        if id(cur) in seen or len(seen) > 50:
            continue
        seen.add(id(cur))
        if isinstance(cur, _REDIS_TYPES):
            return "redis"
        if isinstance(cur, _STORE_TYPES):
            return "store"
        if isinstance(cur, sa_exc.DBAPIError) and cur.connection_invalidated:
            return "store"
        sqlstate = getattr(cur, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_OUTAGE_SQLSTATES):
            return "store"
        network = network or _network(cur)
        if isinstance(cur, BaseExceptionGroup):
            todo.extend(cur.exceptions)
        # ``orig``: SQLAlchemy's wrapper keeps the driver's error there even
        # when a re-raise (Litestar's dependency task group) replaced its cause.
        for nxt in (cur.__cause__, cur.__context__, getattr(cur, "orig", None)):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    if network:
        # A refused connect is the bare socket error (asyncpg and redis-py
        # raise it unwrapped); whose it was shows in where it was raised.
        return _raised_in(exc) or "network"
    return None


def _raised_in(exc: BaseException) -> Dependency | None:
    tb = exc.__traceback__
    found: Dependency | None = None
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", ""))
        if module.startswith(("sqlalchemy", "asyncpg", "aiosqlite", "progress_service.store")):
            found = "store"
        elif module.startswith(("redis", "arq")):
            found = "redis"
        tb = tb.tb_next
    return found


_WHAT = {"store": "the SQL store", "redis": "Redis", "network": "a backing service"}


def describe(dependency: Dependency) -> str:
    """The client-facing sentence of a 503."""
    return f"{_WHAT[dependency]} is unavailable; retry after {RETRY_AFTER_SECONDS} s"


class _Throttle:
    """One warning line per dependency per ``interval``; repeats are counted."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, dependency: Dependency, where: str, exc: BaseException) -> None:
        metrics.outages.labels(dependency).inc()
        now = time.monotonic()
        if now - self._last.get(dependency, -self.interval) < self.interval:
            self._suppressed[dependency] = self._suppressed.get(dependency, 0) + 1
            return
        self._last[dependency] = now
        more = self._suppressed.pop(dependency, 0)
        text = str(exc).splitlines()[0][:200] if str(exc) else ""
        log.warning(
            "%s unavailable (%s: %s) in %s%s",
            _WHAT[dependency],
            type(exc).__name__,
            text,
            where,
            f"; {more} more since the last warning" if more else "",
        )


_throttle = _Throttle()


def warn(dependency: Dependency, where: str, exc: BaseException) -> None:
    """Log an outage as one (throttled) warning line without a traceback, and count it."""
    _throttle.warn(dependency, where, exc)
