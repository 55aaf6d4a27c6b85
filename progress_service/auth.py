"""Credentials: API tokens (SQL store, hashed) and single-use WebSocket tickets (Redis).

A ticket is what a browser sends as its WebSocket ``auth`` token: it fetches
one over HTTP with its API token, so the long-lived secret never rides on the
WebSocket. Tickets are stored hashed under a 60 s TTL and consumed with
GETDEL, so a replayed ticket fails.

:class:`PrincipalCache` keeps what the store said about API tokens for a
short while (``PRINCIPAL_TTL``), so a burst of WebSocket connections with the
same few tokens does not queue one SQL round trip per connect. Tickets are
never cached (each is consumed in Redis); only the liveness of the token
behind them is. Revocation evicts: the revocation watcher calls
``Gateway.close_token``, which calls :meth:`PrincipalCache.revoke`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal, NamedTuple, Protocol, TypeVar

import anyio
import msgspec
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from progress_service.ids import now_ms
from progress_service.keys import ticket_key
from progress_service.store.identity import (
    Principal,
    hash_token,
    principal_for_token,
    token_expiry,
)
from progress_service.web_session import COOKIE_NAME

T = TypeVar("T")

TICKET_PREFIX = "pst_"

_principal_enc = msgspec.json.Encoder()
_principal_dec = msgspec.json.Decoder(Principal)

#: Seconds a principal (or a token's liveness) is trusted without asking the store.
#: A role change or a revocation the watcher has not seen yet shows after at most this.
PRINCIPAL_TTL = 30.0
#: Seconds a revoked token id stays refused by the cache: longer than a store
#: read can take, so a read that began before the revocation cannot re-add it.
TOMBSTONE_TTL = 120.0
#: Cached tokens at most (the oldest half is dropped past it; a miss only costs a query).
MAX_ENTRIES = 50_000



class _Flight:
    """One store read that concurrent lookups of the same token wait for."""

    __slots__ = ("done", "error", "finished", "result")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.result: Principal | None = None
        self.finished = False
        self.error: Exception | None = None


class PrincipalCache:
    """API-token principals and token liveness, trusted for ``ttl`` seconds, in-process.

    Keys are token hashes (never the token). Everything is synchronous and
    per process: one gateway's sessions share it.
    """

    def __init__(self, ttl: float = PRINCIPAL_TTL, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        #: token hash -> (principal, monotonic time until which it is trusted)
        self._principals: dict[str, tuple[Principal, float]] = {}
        #: token id -> (expires_at epoch ms or None, trusted until): a live token (for tickets)
        self._live: dict[str, tuple[int | None, float]] = {}
        #: token id -> monotonic time of the revocation
        self._revoked: dict[str, float] = {}
        #: token hash -> the store read under way (concurrent misses share it)
        self._flights: dict[str, _Flight] = {}
        self.hits = 0
        self.misses = 0

    def principal(self, token_hash: str) -> Principal | None:
        """The cached, still valid principal of an API token's hash, or None (ask the store)."""
        found = self._principals.get(token_hash)
        if found is None:
            self.misses += 1
            return None
        principal, until = found
        if until <= self._clock() or (principal.expires_at is not None and principal.expires_at <= now_ms()):
            del self._principals[token_hash]
            self.misses += 1
            return None
        self.hits += 1
        return principal

    def peek(self, token_hash: str) -> Principal | None:
        """Like :meth:`principal` without counting a hit or miss (the HTTP rate limit's lookup)."""
        found = self._principals.get(token_hash)
        if found is None:
            return None
        principal, until = found
        if until <= self._clock() or (principal.expires_at is not None and principal.expires_at <= now_ms()):
            return None
        return principal

    def remember(self, token_hash: str, principal: Principal) -> None:
        """Trust ``principal`` (just read from the store) for ``ttl`` seconds, unless revoked meanwhile."""
        if self.is_revoked(principal.token_id):
            return
        if len(self._principals) >= MAX_ENTRIES:
            self._shrink(self._principals)
        until = self._clock() + self.ttl
        self._principals[token_hash] = (principal, until)
        self._live[principal.token_id] = (principal.expires_at, until)

    async def load(self, token_hash: str, fetch: Callable[[], Awaitable[Principal | None]]) -> Principal | None:
        """The principal from the cache, else from ``fetch()`` (remembered when valid).

        Concurrent misses for one token share one store read: a burst of
        connections with the same token asks the store once, not once each.
        A store error of that read is raised to all of them; if the reader
        was cancelled, the others read themselves.
        """
        while True:
            principal = self.principal(token_hash)
            if principal is not None:
                return principal
            flight = self._flights.get(token_hash)
            if flight is None:
                break
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if flight.finished:
                return flight.result
        flight = self._flights[token_hash] = _Flight()
        try:
            principal = await fetch()
            flight.result, flight.finished = principal, True
        except Exception as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[token_hash]
            flight.done.set()
        if principal is not None:
            self.remember(token_hash, principal)
        return principal

    def token_live(self, token_id: str) -> bool | None:
        """True when the token is known live (cached), False when revoked here, None: ask the store."""
        if self.is_revoked(token_id):
            return False
        found = self._live.get(token_id)
        if found is None:
            return None
        expires_at, until = found
        if until <= self._clock():
            del self._live[token_id]
            return None
        return expires_at is None or expires_at > now_ms()

    def remember_live(self, token_id: str, expires_at: int | None) -> None:
        """Trust that ``token_id`` is live (just read from the store) for ``ttl`` seconds."""
        if self.is_revoked(token_id):
            return
        if len(self._live) >= MAX_ENTRIES:
            self._shrink(self._live)
        self._live[token_id] = (expires_at, self._clock() + self.ttl)

    def revoke(self, token_id: str) -> None:
        """Forget everything cached for ``token_id`` and refuse to cache it again for a while."""
        now = self._clock()
        self._revoked[token_id] = now
        if len(self._revoked) > 1024:
            self._revoked = {t: at for t, at in self._revoked.items() if now - at < TOMBSTONE_TTL}
        self._live.pop(token_id, None)
        for key in [k for k, (p, _) in self._principals.items() if p.token_id == token_id]:
            del self._principals[key]

    def is_revoked(self, token_id: str) -> bool:
        """True while a revocation of ``token_id`` seen by this process is recent."""
        at = self._revoked.get(token_id)
        if at is None:
            return False
        if self._clock() - at >= TOMBSTONE_TTL:
            del self._revoked[token_id]
            return False
        return True

    @staticmethod
    def _shrink(table: dict[Any, Any]) -> None:
        # dicts keep insertion order: drop the oldest half
        for key in list(table)[: len(table) // 2]:
            del table[key]


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


def cached_principal(cache: PrincipalCache | None, secret: str) -> Principal | None:
    """The principal of an API token when ``cache`` still trusts it (no I/O); None: authenticate."""
    if cache is None or secret.startswith(TICKET_PREFIX) or len(secret) > 200:
        return None
    return cache.principal(hash_token(secret))


class ReadGate(Protocol):
    """Runs one store or Redis read, e.g. the gateway's ``StoreGate.call`` (a bounded queue, a timeout)."""

    def __call__(self, read: Callable[[], Awaitable[T]], /) -> Awaitable[T]: ...


async def _at_once(read: Callable[[], Awaitable[T]]) -> T:
    return await read()


async def authenticate(engine: AsyncEngine, redis: Redis, secret: str, *, cache: PrincipalCache | None = None,
                       gate: ReadGate = _at_once) -> Principal | None:
    """Resolve an API token or a ticket to its principal; None when invalid.

    A ticket is consumed whether or not the caller goes on to use it. With
    ``cache``, API tokens and the liveness of a ticket's token are looked up
    there first and remembered after a store read. Each read goes through
    ``gate``; lookups of one token that wait for the read already under way
    (a burst of connections with the same token) do not take a place in it.
    """
    if secret.startswith(TICKET_PREFIX):
        principal = await gate(lambda: consume_ticket(redis, secret))
        if principal is None:
            return None
        # The token behind a ticket may have been revoked since it was issued.
        token_id = principal.token_id
        live = cache.token_live(token_id) if cache is not None else None
        if live is None:
            found, expires_at = await gate(lambda: token_expiry(engine, token_id))
            live = found and (expires_at is None or expires_at > now_ms())
            if live and cache is not None:
                cache.remember_live(token_id, expires_at)
        return principal if live else None
    if cache is not None and len(secret) <= 200:
        return await cache.load(hash_token(secret), lambda: gate(lambda: principal_for_token(engine, secret)))
    return await gate(lambda: principal_for_token(engine, secret))


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


class RequestCredential(NamedTuple):
    """The credential an HTTP request carries: which kind, and the secret itself."""

    #: ``token``: an API token (``Authorization: Bearer``); ``cookie``: the web page's session cookie.
    kind: Literal["token", "cookie"]
    secret: str


def request_credential(headers: Mapping[str, str], cookies: Mapping[str, str]) -> RequestCredential | None:
    """The credential of an HTTP request: its bearer token, else its session cookie; None without either.

    The one reading of a request's credentials, shared by authentication
    (``api.deps``) and the rate limit (``http_limits``) so both see the same
    caller. A bearer token wins over a cookie sent beside it.
    """
    token = bearer_token(headers.get("authorization"))
    if token is not None:
        return RequestCredential("token", token)
    cookie = cookies.get(COOKIE_NAME)
    return RequestCredential("cookie", cookie) if cookie else None
