"""Gateway limits: per-connection ones, and the per-user connection cap over all nodes.

The per-connection limits (a token bucket for chat, sliding-window budgets,
JSON depth) are plain computations on the connection's own receive path, so
they need no locks and no tasks. The per-user cap (:class:`ConnectionCap`)
lives in Redis so it holds across gateway nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
from redis.exceptions import RedisError

from progress_service import outage
from progress_service.gateway.batching import BatchQueue
from progress_service.keys import connections_key

if TYPE_CHECKING:
    from redis.asyncio import Redis


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._at = clock()

    def take(self) -> bool:
        """Spend one token; False when the bucket is empty (the request is refused)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class WindowBudget:
    """At most ``limit`` hits within any ``window`` seconds.

    Used for the error budget (refused requests per minute) and for
    "persistent" chat abuse (refusals for rate limiting within a few seconds).
    """

    def __init__(self, limit: int, window: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._hits: deque[float] = deque()

    def hit(self) -> bool:
        """Record one hit; False once the budget is exhausted."""
        now = self._clock()
        cutoff = now - self.window
        while self._hits and self._hits[0] <= cutoff:
            self._hits.popleft()
        self._hits.append(now)
        return len(self._hits) <= self.limit


#: A JSON string (possibly unterminated) or one bracket.
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]')


def json_too_deep(text: str, limit: int) -> bool:
    """True when ``text`` nests arrays/objects deeper than ``limit`` (checked before decoding).

    msgspec recurses once per level (also to skip an unknown field's value
    while it looks for the tag), so a 2 KB frame of brackets reaches
    Python's recursion limit inside the server. Brackets inside strings do
    not count. Almost every frame has fewer brackets than the limit in all,
    which two ``str.count`` calls settle without a scan.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for match in _JSON_TOKENS.finditer(text):
        char = match.group()[0]
        if char == '"':
            continue
        if char in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


# --------------------------------------------------------------------------
# The per-user connection cap, shared by every gateway node through Redis
# --------------------------------------------------------------------------


# KEYS: the user's set. ARGV: member, limit, ttl ms. -> 1 admitted, 0 full.
# Redis's own clock decides expiry, so nodes with skewed clocks agree.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: the user's set. ARGV: ttl ms, members... Members are (re-)added, so a
# Redis that restarted empty learns this node's connections again; a release
# cannot be undone by it (releases leave the node's set first, and the one
# task that sends both sends a release after any refresh that named it).
_REFRESH = """
local t = redis.call('TIME')
local exp = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], exp, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""


#: Admissions sharing one pipeline at most.
ADMIT_BATCH_MAX = 500


class _Admission:
    __slots__ = ("future", "member", "user_id")

    def __init__(self, user_id: str, member: str, future: asyncio.Future[bool]) -> None:
        self.user_id = user_id
        self.member = member
        self.future = future


class ConnectionCap:
    """At most ``limit`` authenticated connections per user over all nodes.

    Each admitted connection is a member ``<node>:<conn>`` of the user's
    sorted set in Redis, scored with an expiry that this node's
    :meth:`run` task pushes forward every ``ttl / 3`` seconds. A node that
    is killed stops refreshing, so its connections stop counting after
    ``ttl`` seconds instead of leaking a slot for good. Releases go out from
    the same task (``release`` is called from synchronous cleanup code).

    When Redis cannot be asked, admission falls back to this node's own
    count: a Redis blip must not lock every user out (their joins would
    fail anyway until it is back). Admissions waiting at once share one
    pipeline (sent by :meth:`run`'s admission task).
    """

    def __init__(self, redis: Redis, node_id: str, limit: int, ttl: float) -> None:
        self.redis = redis
        self.node_id = node_id
        self.limit = limit
        self.ttl_ms = max(1000, int(ttl * 1000))
        #: user id -> members admitted by this node and not released yet
        self._mine: dict[str, set[str]] = {}
        self._released: list[tuple[str, str]] = []
        self._wake = anyio.Event()
        self._admissions: BatchQueue[_Admission] = BatchQueue(ADMIT_BATCH_MAX)

    def _member(self, conn_id: str) -> str:
        return f"{self.node_id}:{conn_id}"

    def local_count(self, user_id: str) -> int:
        """Connections of ``user_id`` this node holds."""
        return len(self._mine.get(user_id, ()))

    async def admit(self, user_id: str, conn_id: str) -> bool:
        """Count connection ``conn_id`` for ``user_id``; False when the user is at the cap.

        The admissions waiting in this process share one pipelined round
        trip (:meth:`run` sends them): a mass connect has hundreds at once.
        """
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._admissions.put(_Admission(user_id, self._member(conn_id), future))
        return await future

    def _admit_here(self, user_id: str, member: str) -> bool:
        """Admission on this node's own count (Redis cannot be asked)."""
        ok = self.local_count(user_id) < self.limit
        if ok:
            self._count(user_id, member)
        return ok

    def _count(self, user_id: str, member: str) -> None:
        self._mine.setdefault(user_id, set()).add(member)

    async def _admit_batch(self, batch: list[_Admission]) -> None:
        """One pipeline of the admission script for ``batch``; each waiter gets its answer."""
        replies: list[object]
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for a in batch:
                    pipe.eval(_ADMIT, 1, connections_key(a.user_id), a.member, self.limit, self.ttl_ms)
                replies = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            replies = [exc] * len(batch)
        failed = next((r for r in replies if isinstance(r, Exception)), None)
        if failed is not None:
            outage.warn("redis", "WebSocket connection cap (counting on this node only)", failed)
        for a, reply in zip(batch, replies, strict=True):
            if isinstance(reply, Exception):
                ok = self._admit_here(a.user_id, a.member)
            else:
                ok = bool(reply)
                if ok:
                    self._count(a.user_id, a.member)
            if a.future.done():  # its connection is gone: what Redis counted goes again
                if ok:
                    self._forget(a.user_id, a.member)
            else:
                a.future.set_result(ok)

    async def _admit_loop(self) -> None:
        try:
            await self._admissions.run(self._admit_batch)
        finally:
            # Stopping: whoever still waits is answered on this node's count (released by aclose).
            for a in self._admissions.drain():
                if not a.future.done():
                    a.future.set_result(self._admit_here(a.user_id, a.member))

    def release(self, user_id: str, conn_id: str) -> None:
        """Stop counting ``conn_id`` (removed from Redis by :meth:`run` right after)."""
        self._forget(user_id, self._member(conn_id))

    def _forget(self, user_id: str, member: str) -> None:
        mine = self._mine.get(user_id)
        if mine is None or member not in mine:
            return
        mine.discard(member)
        if not mine:
            del self._mine[user_id]
        self._released.append((user_id, member))
        self._wake.set()

    async def run(self) -> None:
        """Send admissions, refresh this node's entries and send releases, until cancelled."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._admit_loop)
                await self._loop()
        finally:
            # Shutdown: this node's connections stop counting now, not after the ttl.
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await self.aclose()

    async def _loop(self) -> None:
        interval = self.ttl_ms / 3000
        next_refresh = anyio.current_time() + interval
        while True:
            with anyio.move_on_after(max(0.0, next_refresh - anyio.current_time())):
                await self._wake.wait()
            self._wake = anyio.Event()
            try:
                await self._flush_releases()
                if anyio.current_time() >= next_refresh:
                    await self._refresh()
                    next_refresh = anyio.current_time() + interval
            except (RedisError, OSError) as exc:
                outage.warn("redis", "WebSocket connection cap refresh", exc)
                next_refresh = anyio.current_time() + 1.0  # retry soon: entries expire otherwise

    async def _flush_releases(self) -> None:
        if not self._released:
            return
        batch, self._released = self._released, []
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for user_id, member in batch:
                    pipe.zrem(connections_key(user_id), member)
                await pipe.execute()
        except BaseException:
            self._released[:0] = batch  # sent again next time (ZREM is idempotent)
            raise

    async def _refresh(self) -> None:
        if not self._mine:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for user_id, members in self._mine.items():
                pipe.eval(_REFRESH, 1, connections_key(user_id), self.ttl_ms, *members)
            await pipe.execute()

    async def aclose(self) -> None:
        """Release everything this node still counts (shutdown)."""
        for user_id, members in list(self._mine.items()):
            for member in list(members):
                self._released.append((user_id, member))
        self._mine.clear()
        with contextlib.suppress(RedisError, OSError):
            await self._flush_releases()
