"""The gateway's in-process principal cache (progress_service.auth.PrincipalCache).

Real SQLite/PostgreSQL store and real Redis: cached API tokens skip the
store, revocation evicts and stays evicted, concurrent misses share one
read, and tickets stay single-use.
"""

from __future__ import annotations

from typing import Any

import anyio

from progress_service.auth import (
    PrincipalCache,
    authenticate,
    cached_principal,
    issue_ticket,
)
from progress_service.store.db import create_engine
from progress_service.store.identity import (
    Principal,
    create_token,
    hash_token,
    revoke_token,
)


def _closed_engine() -> Any:
    """An engine whose every connect fails (the store is down)."""
    return create_engine("sqlite+aiosqlite:////nonexistent-dir/none.db")


async def test_cached_token_skips_the_store_until_revoked(engine: Any, redis: Any) -> None:
    token, token_id = await create_token(engine, user="ana", team="t1", role="reviewer")
    cache = PrincipalCache()
    first = await authenticate(engine, redis, token, cache=cache)
    assert first is not None and first.token_id == token_id
    assert cached_principal(cache, token) == first

    down = _closed_engine()
    try:
        # The store is unreachable: the cached principal still answers.
        assert await authenticate(down, redis, token, cache=cache) == first
        # Revoked in the store and signalled (Gateway.close_token calls revoke).
        await revoke_token(engine, token_id)
        cache.revoke(token_id)
        assert cached_principal(cache, token) is None
        assert await authenticate(engine, redis, token, cache=cache) is None
    finally:
        await down.dispose()


async def test_a_read_that_began_before_the_revocation_is_not_cached(engine: Any, redis: Any) -> None:
    token, token_id = await create_token(engine, user="bo", team="t1", role="viewer")
    cache = PrincipalCache()
    stale = Principal(user_id="u", user_name="bo", team_id="t", team_name="t1", role="viewer", token_id=token_id)

    async def slow_read() -> Principal | None:
        cache.revoke(token_id)  # the revocation lands while the read is under way
        return stale

    assert await cache.load(hash_token(token), slow_read) == stale
    assert cached_principal(cache, token) is None
    assert cache.token_live(token_id) is False


async def test_concurrent_misses_share_one_store_read() -> None:
    cache = PrincipalCache()
    reads = 0
    principal = Principal(user_id="u", user_name="cy", team_id="t", team_name="t1", role="viewer", token_id="tid")

    async def read() -> Principal | None:
        nonlocal reads
        reads += 1
        await anyio.sleep(0.05)
        return principal

    results: list[Principal | None] = []

    async def one() -> None:
        results.append(await cache.load("h", read))

    async with anyio.create_task_group() as tg:
        for _ in range(25):
            tg.start_soon(one)
    assert reads == 1 and results == [principal] * 25


async def test_connections_of_one_token_wait_for_its_read_without_a_place_in_the_gate(engine: Any, redis: Any) -> None:
    """A burst of one token through a one-slot gate that refuses a second waiter: one read, all admitted."""
    from progress_service.gateway.job_access import StoreGate  # noqa: PLC0415

    token, token_id = await create_token(engine, user="bo", team="t1", role="viewer")
    cache = PrincipalCache()
    gate = StoreGate(1, wait=0.0, timeout=5.0)  # a read waiting for the slot times out at once
    calls = 0

    async def counted(read: Any) -> Any:
        nonlocal calls
        calls += 1
        return await gate.call(read)

    results: list[Principal | None] = []

    async def one() -> None:
        results.append(await authenticate(engine, redis, token, cache=cache, gate=counted))

    async with anyio.create_task_group() as tg:
        for _ in range(30):
            tg.start_soon(one)
    assert calls == 1
    assert len(results) == 30 and all(p is not None and p.token_id == token_id for p in results)


async def test_concurrent_misses_share_a_store_error() -> None:
    cache = PrincipalCache()
    reads = 0

    async def read() -> Principal | None:
        nonlocal reads
        reads += 1
        await anyio.sleep(0.05)
        raise OSError("store down")

    errors: list[Exception] = []

    async def one() -> None:
        try:
            await cache.load("h", read)
        except OSError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(one)
    assert reads == 1 and len(errors) == 10


async def test_expired_principal_is_not_served() -> None:
    cache = PrincipalCache()
    cache.remember("h", Principal(user_id="u", user_name="d", team_id="t", team_name="t1", role="viewer", token_id="x", expires_at=1))
    assert cache.principal("h") is None


async def test_cache_entries_age_out() -> None:
    now = [0.0]
    cache = PrincipalCache(ttl=30.0, clock=lambda: now[0])
    p = Principal(user_id="u", user_name="e", team_id="t", team_name="t1", role="viewer", token_id="y")
    cache.remember("h", p)
    now[0] = 29.9
    assert cache.principal("h") == p
    now[0] = 30.0
    assert cache.principal("h") is None and cache.token_live("y") is None


async def test_tickets_stay_single_use_with_the_cache(engine: Any, redis: Any) -> None:
    token, token_id = await create_token(engine, user="fay", team="t1", role="viewer")
    cache = PrincipalCache()
    principal = await authenticate(engine, redis, token, cache=cache)
    assert principal is not None
    ticket = await issue_ticket(redis, principal, 60)
    assert cached_principal(cache, ticket) is None  # never served from the cache
    assert await authenticate(engine, redis, ticket, cache=cache) == principal
    assert await authenticate(engine, redis, ticket, cache=cache) is None
    # A ticket of a revoked token is refused even while its liveness was cached.
    again = await issue_ticket(redis, principal, 60)
    cache.revoke(token_id)
    assert await authenticate(engine, redis, again, cache=cache) is None
