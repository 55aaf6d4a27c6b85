"""What the hook route remembers per process: rate buckets per token, owners per session, the ingest queue."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from litestar.exceptions import ClientException, TooManyRequestsException
from litestar.status_codes import HTTP_409_CONFLICT

from progress_service.auth import PrincipalCache
from progress_service.gateway.limits import TokenBucket
from progress_service.hooks.ingest import Ingest
from progress_service.keys import hook_owner_key, hook_sessions_key
from progress_service.store.identity import TOKEN_PREFIX, Principal, hash_token, principal_for_token

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from sqlalchemy.ext.asyncio import AsyncEngine

    from progress_service.settings import Settings

#: Sessions whose team is known in this process, and rate buckets, at most.
CACHE_MAX = 100_000


class HookGate:
    """What the route remembers per process: buckets per token, owners per session."""

    def __init__(
        self, engine: AsyncEngine, redis: Redis, settings: Settings, ingest: Ingest, principals: PrincipalCache
    ) -> None:
        self.engine = engine
        self.redis = redis
        self.settings = settings
        #: The task that applies queued hooks (run by the app's lifespan).
        self.ingest = ingest
        self.principals = principals
        self._buckets: dict[str, TokenBucket] = {}
        self._owners: dict[str, str] = {}

    def bucket(self, token_id: str) -> TokenBucket:
        """The rate bucket of a reporter token."""
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
