"""What the hook route keeps: the rate bucket per token (in Redis, over every node), owners per session, the ingest queue."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from litestar.exceptions import ClientException, TooManyRequestsException
from litestar.status_codes import HTTP_409_CONFLICT
from redis.exceptions import RedisError

from progress_service import outage
from progress_service.auth import PrincipalCache
from progress_service.gateway.limits import TokenBucket
from progress_service.hooks.ingest import Ingest
from progress_service.keys import hook_owner_key, hook_rate_key, hook_sessions_key
from progress_service.store.identity import TOKEN_PREFIX, Principal, hash_token, principal_for_token

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from sqlalchemy.ext.asyncio import AsyncEngine

    from progress_service.settings import Settings

#: Sessions whose team is known in this process, and fallback rate buckets, at most.
CACHE_MAX = 100_000

# A token bucket in Redis, on Redis's clock: the same rate for a token
# whichever node its hooks reach. KEYS: the bucket. ARGV: rate per second,
# burst. Returns 1 when a token was taken, 0 when the bucket is empty.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local h = redis.call('HMGET', KEYS[1], 'n', 'at')
local n = tonumber(h[1]) or burst
local at = tonumber(h[2]) or now
n = math.min(burst, n + math.max(0, now - at) * rate / 1000)
local ok = 0
if n >= 1 then n = n - 1; ok = 1 end
redis.call('HSET', KEYS[1], 'n', tostring(n), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return ok
"""


class HookGate:
    """What the route needs per hook: the token's rate (over every node), the session's owner."""

    def __init__(
        self, engine: AsyncEngine, redis: Redis, settings: Settings, ingest: Ingest, principals: PrincipalCache
    ) -> None:
        self.engine = engine
        self.redis = redis
        self.settings = settings
        #: The task that applies queued hooks (run by the app's lifespan).
        self.ingest = ingest
        self.principals = principals
        self._take = redis.register_script(_TAKE)
        #: Used only while Redis cannot be asked.
        self._buckets: dict[str, TokenBucket] = {}
        self._owners: dict[str, str] = {}

    async def take(self, token_id: str) -> bool:
        """Spend one of the token's hooks (``PS_HOOK_RATE``/``PS_HOOK_BURST``, over every node); False when over.

        When Redis cannot be asked the count falls back to this process's
        own bucket: a Redis blip must not refuse every reporter (their hooks
        would wait in the ingest queue anyway).
        """
        settings = self.settings
        try:
            return bool(await self._take(keys=[hook_rate_key(token_id)], args=[settings.hook_rate, settings.hook_burst]))
        except (RedisError, OSError) as exc:
            outage.warn("redis", "hook rate (counting on this node only)", exc)
            return self._bucket(token_id).take()

    def _bucket(self, token_id: str) -> TokenBucket:
        found = self._buckets.get(token_id)
        if found is None:
            if len(self._buckets) >= CACHE_MAX:
                self._buckets.clear()
            found = self._buckets[token_id] = TokenBucket(self.settings.hook_rate, self.settings.hook_burst)
        return found

    async def principal(self, token: str) -> Principal | None:
        """The principal of an API token (cached), None for anything else."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None  # tickets are for the WebSocket; nothing else is a token
        engine = self.engine
        return await self.principals.load(hash_token(token), lambda: principal_for_token(engine, token))

    async def claim(self, job_id: str, principal: Principal) -> None:
        """Make sure the session is the caller's team's: its first hook claims it for them."""
        if self._owners.get(job_id) == principal.team_id:
            return
        settings = self.settings
        redis = self.redis
        key = hook_owner_key(job_id)
        async with redis.pipeline(transaction=False) as pipe:
            pipe.set(key, principal.team_id, nx=True, ex=settings.events_ttl)
            pipe.get(key)
            claimed, owner = await pipe.execute()
        if owner is not None and owner.decode() != principal.team_id:
            raise ClientException(
                "session_id: this session is reported by another team", status_code=HTTP_409_CONFLICT
            )
        if claimed:
            hour = int(time.time() // 3600)
            counter = hook_sessions_key(principal.token_id, hour)
            async with redis.pipeline(transaction=False) as pipe:
                pipe.incr(counter)
                pipe.expire(counter, 3600)
                started, _ = await pipe.execute()
            if started > settings.hook_max_sessions_per_hour:
                await redis.delete(key)
                raise TooManyRequestsException(
                    f"this token started more than {settings.hook_max_sessions_per_hour} sessions this hour",
                    headers={"Retry-After": str(3600 - int(time.time()) % 3600)},
                )
        if len(self._owners) >= CACHE_MAX:
            self._owners.clear()
        self._owners[job_id] = principal.team_id
