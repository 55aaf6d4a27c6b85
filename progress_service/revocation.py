"""Token revocation: the store change, its audit record, and closing live connections.

Revoking marks the token in the SQL store (from then on no HTTP request, new
WebSocket or ticket is accepted with it) and records ``token.revoke`` in the
audit log. Connections that authenticated with the token *before* are closed
with 4403 ``token revoked`` by every gateway node:

* **fast path** — the revoker appends the token id to the Redis stream
  ``ps:revocations``; each node's :class:`RevocationWatcher` reads it with
  ``XREAD BLOCK`` (a stream, not pub/sub, so nothing is lost while a node
  reconnects to Redis) and calls ``gateway.close_token``;
* **backstop** — the watcher also asks the store every ``interval`` seconds
  for tokens revoked recently, so a revocation made without Redis (``token
  revoke`` on a host without ``PS_REDIS_URL``, or while Redis was down)
  still closes the connections within a few seconds.

A token revoked while a connection was half-way through authenticating is
closed again on the following polls for a short while, so that race cannot
leave a connection open.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import sqlalchemy as sa
from redis.exceptions import RedisError

from progress_service.ids import now_ms
from progress_service.keys import REVOCATIONS_KEY
from progress_service.store import audit
from progress_service.store.db import first_row, of_team
from progress_service.store.identity import revoke_token
from progress_service.store.schema import api_tokens, users

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from sqlalchemy.ext.asyncio import AsyncEngine

    from progress_service.gateway import Gateway

log = logging.getLogger("progress_service.revocation")

#: Revocations kept in the stream (a node only needs the recent ones).
REVOCATIONS_MAXLEN = 10_000
#: How far back (ms) each poll looks below the newest revocation it has
#: seen, so revokers whose clocks disagree a little are not missed.
OVERLAP_MS = 5 * 60 * 1000
#: For how long (s) a revoked token's connections are closed again on each poll.
RECLOSE_FOR = 30.0


class TokenInfo(msgspec.Struct, kw_only=True):
    """A token as admins see it: never its hash."""

    id: str
    userId: str
    userName: str
    teamId: str
    label: str
    createdAt: int
    expiresAt: int | None
    revokedAt: int | None



_info_query = sa.select(
    api_tokens.c.id,
    api_tokens.c.user_id,
    users.c.name.label("user_name"),
    api_tokens.c.team_id,
    api_tokens.c.label,
    api_tokens.c.created_at,
    api_tokens.c.expires_at,
    api_tokens.c.revoked_at,
).select_from(api_tokens.join(users, users.c.id == api_tokens.c.user_id))


def _info(row: Any) -> TokenInfo:
    return TokenInfo(
        id=row.id,
        userId=row.user_id,
        userName=row.user_name,
        teamId=row.team_id,
        label=row.label,
        createdAt=row.created_at,
        expiresAt=row.expires_at,
        revokedAt=row.revoked_at,
    )


async def token_info(engine: AsyncEngine, token_id: str, team_id: str | None = None) -> TokenInfo | None:
    """One token (only within ``team_id`` when given)."""
    row = await first_row(engine, of_team(_info_query.where(api_tokens.c.id == token_id), api_tokens.c.team_id, team_id))
    return _info(row) if row else None


async def list_tokens(engine: AsyncEngine, team_id: str, *, include_revoked: bool = True) -> list[TokenInfo]:
    """The team's tokens, newest first."""
    query = _info_query.where(api_tokens.c.team_id == team_id)
    if not include_revoked:
        query = query.where(api_tokens.c.revoked_at.is_(None))
    async with engine.connect() as conn:
        rows = (await conn.execute(query.order_by(api_tokens.c.created_at.desc(), api_tokens.c.id))).all()
    return [_info(r) for r in rows]


async def publish(redis: Redis, token_id: str) -> None:
    """Tell every gateway node to close the token's connections now."""
    await redis.xadd(REVOCATIONS_KEY, {"token": token_id}, maxlen=REVOCATIONS_MAXLEN, approximate=True)


async def revoke(
    engine: AsyncEngine,
    token_id: str,
    *,
    actor: str | None,
    via: str,
    redis: Redis | None = None,
    team_id: str | None = None,
) -> TokenInfo | None:
    """Revoke a token, audit it and signal the gateways.

    Returns the token (None when unknown, or not of ``team_id``). Revoking
    an already revoked token changes nothing and records nothing. The Redis
    signal is best effort: the watchers' store poll is the backstop.
    """
    info = await token_info(engine, token_id, team_id)
    if info is None:
        return None
    if await revoke_token(engine, token_id):
        await audit.record(
            engine,
            action="token.revoke",
            team_id=info.teamId,
            actor=actor,
            detail={"tokenId": token_id, "tokenUser": info.userName, "via": via},
        )
        info = await token_info(engine, token_id) or info
    if redis is not None:
        try:
            with anyio.fail_after(5):
                await publish(redis, token_id)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("revocation: could not signal gateways through Redis (%r); they notice by polling", exc)
    return info


class RevocationWatcher:
    """Closes, on this node, the live connections of revoked tokens."""

    def __init__(self, engine: AsyncEngine, redis: Redis, gateway: Gateway, *, interval: float = 2.0) -> None:
        self.engine = engine
        self.redis = redis
        self.gateway = gateway
        self.interval = interval
        #: token id -> monotonic time this node first saw it revoked
        self._seen: dict[str, float] = {}
        self._watermark = 0
        self._cursor: str | None = None

    async def run(self) -> None:
        """Watch until cancelled."""
        await self._start()
        while True:
            revoked = await self._read_signal()
            revoked |= await self._poll_store()
            now = time.monotonic()
            for token_id in revoked:
                first = self._seen.setdefault(token_id, now)
                if now - first <= RECLOSE_FOR:
                    await self._close(token_id)

    async def _start(self) -> None:
        try:
            async with self.engine.connect() as conn:
                newest = await conn.scalar(sa.select(sa.func.max(api_tokens.c.revoked_at)))
            self._watermark = int(newest or 0)
        except Exception as exc:
            log.warning("revocation: store unavailable at start (%r)", exc)
        try:
            last = await self.redis.xrevrange(REVOCATIONS_KEY, count=1)
            self._cursor = last[0][0].decode() if last else "0-0"
        except (RedisError, OSError) as exc:
            log.warning("revocation: Redis unavailable at start (%r)", exc)

    async def _read_signal(self) -> set[str]:
        redis = self.redis
        try:
            if self._cursor is None:
                last = await redis.xrevrange(REVOCATIONS_KEY, count=1)
                self._cursor = last[0][0].decode() if last else "0-0"
            answer = await redis.xread({REVOCATIONS_KEY: self._cursor}, count=100, block=int(self.interval * 1000))
        except (RedisError, OSError) as exc:
            log.debug("revocation: signal read failed (%r)", exc)
            await anyio.sleep(self.interval)
            return set()
        found: set[str] = set()
        for _key, entries in answer or []:
            for entry_id, fields in entries:
                self._cursor = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                token = fields.get(b"token")
                if token:
                    found.add(token.decode())
        return found

    async def _poll_store(self) -> set[str]:
        try:
            with anyio.fail_after(max(self.interval, 2.0)):
                async with self.engine.connect() as conn:
                    rows = (
                        await conn.execute(
                            sa.select(api_tokens.c.id, api_tokens.c.revoked_at).where(
                                api_tokens.c.revoked_at > self._watermark - OVERLAP_MS
                            )
                        )
                    ).all()
        except Exception as exc:
            log.debug("revocation: store poll failed (%r)", exc)
            return set()
        found = {r.id for r in rows}
        if rows:
            self._watermark = max(self._watermark, max(int(r.revoked_at) for r in rows))
        # Forget tokens that fell out of the window (and were not just signalled).
        self._seen = {t: s for t, s in self._seen.items() if t in found or time.monotonic() - s <= RECLOSE_FOR}
        return found

    async def _close(self, token_id: str) -> None:
        try:
            await self.gateway.close_token(token_id)  # 4403 token revoked
        except Exception:
            log.exception("revocation: closing connections of a revoked token failed")
