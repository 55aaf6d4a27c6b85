"""Credentials: API tokens (SQL store, hashed) and single-use WebSocket tickets (Redis).

A ticket is what a browser sends as its WebSocket ``auth`` token: it fetches
one over HTTP with its API token, so the long-lived secret never rides on the
WebSocket. Tickets are stored hashed under a 60 s TTL and consumed with
GETDEL, so a replayed ticket fails.
"""

from __future__ import annotations

import secrets

import msgspec
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from progress_service.store.identity import Principal, hash_token, principal_for_token, token_is_live
from progress_service.streams import ticket_key

TICKET_PREFIX = "pst_"

_principal_enc = msgspec.json.Encoder()
_principal_dec = msgspec.json.Decoder(Principal)


async def issue_ticket(redis: Redis, principal: Principal, ttl: int) -> str:
    """A new single-use ticket for ``principal``, valid for ``ttl`` seconds."""
    ticket = TICKET_PREFIX + secrets.token_urlsafe(32)
    await redis.set(ticket_key(hash_token(ticket)), _principal_enc.encode(principal), ex=ttl)
    return ticket


async def consume_ticket(redis: Redis, ticket: str) -> Principal | None:
    """The principal of a ticket, which is used up by this call."""
    if not ticket.startswith(TICKET_PREFIX) or len(ticket) > 200:
        return None
    raw = await redis.getdel(ticket_key(hash_token(ticket)))
    return _principal_dec.decode(raw) if raw else None


async def authenticate(engine: AsyncEngine, redis: Redis, secret: str) -> Principal | None:
    """Resolve an API token or a ticket to its principal; None when invalid.

    A ticket is consumed whether or not the caller goes on to use it.
    """
    if secret.startswith(TICKET_PREFIX):
        principal = await consume_ticket(redis, secret)
        # The token behind a ticket may have been revoked since it was issued.
        if principal is not None and not await token_is_live(engine, principal.token_id):
            return None
        return principal
    return await principal_for_token(engine, secret)


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
