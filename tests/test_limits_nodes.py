"""Limits that hold across gateway nodes: two real uvicorn nodes share one Redis and one store.

The per-user connection cap (WebSockets and SSE streams), the HTTP rate limit
and the hook rate are kept in Redis, so a
client that spreads its connections or requests over the nodes gets the
limit once, not once per node; a node that is killed stops counting after
``PS_WS_CONNECTION_TTL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest

from gateway_helpers import auth, closed_with, connect, send, serve
from hook_helpers import Session, post_hook
from progress_service.gateway.limits import ConnectionCap
from progress_service.keys import connections_key

FAST = {"ws_auth_timeout": 2.0, "presence_grace": 0.3}


@pytest.fixture
def settings(make_settings: Callable[..., Any]) -> Callable[..., Any]:
    return lambda **kw: make_settings(**{**FAST, **kw})


@contextlib.asynccontextmanager
async def two_nodes(settings: Any) -> AsyncIterator[tuple[str, str]]:
    """Two app nodes on their own ports, same Redis, same store, same queue."""
    async with serve(settings) as (a, _), serve(settings) as (b, _):
        yield a, b


async def redis_ms(redis: Any) -> int:
    """Redis's clock (the one the cap's expiries use), in ms."""
    sec, usec = await redis.time()
    return int(sec) * 1000 + int(usec) // 1000


async def wait_count(redis: Any, user_id: str, expected: int, timeout: float = 10.0) -> None:
    """Wait until the user's live connections in Redis number ``expected``."""
    key = connections_key(user_id)
    with anyio.fail_after(timeout):
        while True:
            if await redis.zcount(key, await redis_ms(redis), "+inf") == expected:
                return
            await anyio.sleep(0.05)


async def test_connection_cap_holds_across_two_nodes(settings, store, redis) -> None:
    cfg = settings(ws_max_connections_per_user=2)
    token = await store.token(user="dora")
    async with two_nodes(cfg) as (a, b):
        async with connect(a) as first, connect(b) as second:
            user_id = (await auth(first, token))["userId"]
            await auth(second, token)
            await wait_count(redis, user_id, 2)
            # A third anywhere is over the cap: 4429 as docs/protocol.md says.
            for base in (a, b):
                async with connect(base) as third:
                    await send(third, type="auth", token=token)
                    assert await closed_with(third) == (4429, "too many connections")
            await first.close()
            await wait_count(redis, user_id, 1)
            # The slot node A freed is usable on node B.
            async with connect(b) as again:
                await auth(again, token)
        await wait_count(redis, user_id, 0)


async def test_sse_streams_count_in_the_same_cap_on_every_node(settings, store, redis) -> None:
    """An SSE stream is a connection too: a WebSocket on node A and a stream on node B fill a cap of 2."""
    cfg = settings(ws_max_connections_per_user=2)
    token = await store.token(user="gus")
    job = await store.job()
    headers = {"Authorization": f"Bearer {token}"}
    async with two_nodes(cfg) as (a, b), httpx.AsyncClient(headers=headers, timeout=10) as http:
        async with connect(a) as ws:
            user_id = (await auth(ws, token))["userId"]
            async with http.stream("GET", f"{b}/api/jobs/{job}/stream") as stream:
                assert stream.status_code == 200
                lines = stream.aiter_lines()  # kept: an abandoned iterator closes the connection
                assert (await anext(lines)).startswith("event: joined")
                await wait_count(redis, user_id, 2)
                for base in (a, b):
                    refused = await http.get(f"{base}/api/jobs/{job}/stream", timeout=3)
                    assert refused.status_code == 429 and "over every node" in refused.json()["detail"]
                    assert refused.headers["Retry-After"]
                async with connect(a) as third:
                    await send(third, type="auth", token=token)
                    assert await closed_with(third) == (4429, "too many connections")
            # The stream's end frees its slot.
            await wait_count(redis, user_id, 1)
            async with http.stream("GET", f"{a}/api/jobs/{job}/stream") as again:
                assert again.status_code == 200


async def test_hook_rate_is_per_token_across_two_nodes(settings, store) -> None:
    """A reporter token's hooks spread over two nodes share one bucket (PS_HOOK_BURST), kept in Redis."""
    cfg = settings(hook_rate=0.01, hook_burst=4)
    reporter = await store.token(role="reporter", team="t1")
    async with two_nodes(cfg) as (a, b), httpx.AsyncClient(timeout=10) as http:
        s = Session()
        codes = []
        for i in range(6):
            http.base_url = httpx.URL(a if i % 2 == 0 else b)
            codes.append((await post_hook(http, reporter, s.body("Notification", message=f"n{i}"))).status_code)
        assert codes == [204] * 4 + [429] * 2
        refused = await post_hook(http, reporter, s.body("Notification", message="again"))
        assert "counted over every node" in refused.json()["detail"] and refused.headers["Retry-After"]


async def test_a_killed_nodes_connections_age_out(settings, store, redis, server_process) -> None:
    cfg = settings(ws_max_connections_per_user=1, ws_connection_ttl=1.5)
    token = await store.token(user="erin")
    node = server_process(cfg)  # a separate process: SIGKILL leaves no cleanup behind
    async with serve(cfg) as (b, _), connect(node.url, close_timeout=1) as ws:
        user_id = (await auth(ws, token))["userId"]
        await wait_count(redis, user_id, 1)
        # Its node refreshes the entry: still counted past its first expiry.
        first_expiry = (await redis.zrange(connections_key(user_id), 0, 0, withscores=True))[0][1]
        with anyio.fail_after(10):
            while (await redis_ms(redis)) <= first_expiry + 100:
                await anyio.sleep(0.05)
        await wait_count(redis, user_id, 1)
        async with connect(b) as refused:
            await send(refused, type="auth", token=token)
            assert await closed_with(refused) == (4429, "too many connections")
        node.stop(signal.SIGKILL)
        # No release was sent; the entry expires on its own.
        await wait_count(redis, user_id, 0, timeout=5)
        async with connect(b) as admitted:
            await auth(admitted, token)


# --------------------------------------------------------------------------
# HTTP rate limit
# --------------------------------------------------------------------------


async def test_http_rate_limit_is_per_user_across_two_nodes(settings, store) -> None:
    cfg = settings(http_rate_limit=5)
    token = await store.token(user="fay")
    other_token = await store.token(user="fay")  # same user, second credential
    async with two_nodes(cfg) as (a, b), httpx.AsyncClient(timeout=10) as http:
        me = {"Authorization": f"Bearer {token}"}
        # Each node learns who the token is on its first request (counted
        # against the client address: the limiter never asks the store).
        for base in (a, b):
            assert (await http.get(base + "/api/me", headers=me)).status_code == 200
        codes = [(await http.get((a, b)[i % 2] + "/api/me", headers=me)).status_code for i in range(5)]
        assert codes == [200] * 5
        refused = await http.get(b + "/api/me", headers=me)
        assert refused.status_code == 429
        # Sliding window: until this minute's requests weigh little enough in the next one.
        assert 1 <= int(refused.headers["Retry-After"]) <= 120
        body = refused.json()
        assert body["status_code"] == 429 and "5 requests per minute from this user" in body["detail"]
        # Another token of the same user shares the user's count once known.
        other = {"Authorization": f"Bearer {other_token}"}
        assert (await http.get(a + "/api/me", headers=other)).status_code == 200
        assert (await http.get(a + "/api/me", headers=other)).status_code == 429
        # Another user is not affected.
        third = {"Authorization": f"Bearer {await store.token(user='gus')}"}
        assert (await http.get(b + "/api/me", headers=third)).status_code == 200


async def test_forwarded_for_only_from_trusted_proxies(settings) -> None:
    trusted = settings(http_rate_limit=2, trusted_proxies=("127.0.0.0/8",))
    async with two_nodes(trusted) as (a, b), httpx.AsyncClient(timeout=10) as http:

        async def get(base: str, client: str) -> int:
            return (await http.get(base + "/api/me", headers={"X-Forwarded-For": f"{client}, 127.0.0.9"})).status_code

        # Unauthenticated: counted per client address the proxy saw, over both nodes.
        assert [await get(a, "198.51.100.1"), await get(b, "198.51.100.1"), await get(a, "198.51.100.1")] == [401, 401, 429]
        assert await get(b, "198.51.100.2") == 401
    untrusted = settings(http_rate_limit=2)
    async with two_nodes(untrusted) as (a, b), httpx.AsyncClient(timeout=10) as http:
        # Without trusted proxies the header is the client's own claim: ignored.
        codes = [
            (await http.get(base + "/api/me", headers={"X-Forwarded-For": f"203.0.113.{i}"})).status_code
            for i, base in enumerate((a, b, a))
        ]
        assert codes == [401, 401, 429]


async def test_sliding_window_retry_after_is_truthful(make_settings, redis) -> None:
    """The window script on real Redis, with a 1 s window: refused until Retry-After, admitted after it."""
    from progress_service.http_limits import HttpLimiter  # noqa: PLC0415

    limiter = HttpLimiter(make_settings(http_rate_limit=3))
    limiter.window_ms = 1000
    who = "addr:192.0.2.7"
    assert [(await limiter.hit(redis, who))[0] for _ in range(3)] == [True, True, True]
    ok, retry_ms, _ = await limiter.hit(redis, who)
    assert not ok and 0 < retry_ms <= 2000
    start = await redis_ms(redis)
    if retry_ms > 200:  # halfway there: still refused (slack for a busy machine)
        with anyio.fail_after(5):
            while await redis_ms(redis) < start + retry_ms // 2:
                await anyio.sleep(0.01)
        assert not (await limiter.hit(redis, who))[0]
    with anyio.fail_after(5):
        while await redis_ms(redis) < start + retry_ms + 5:
            await anyio.sleep(0.01)
    assert (await limiter.hit(redis, who))[0]


async def test_connection_cap_counts_locally_while_redis_is_down(settings, store, tmp_path) -> None:
    """Redis gone: the cap falls back to this node's own count instead of refusing everyone."""
    from history_helpers import PrivateRedis  # noqa: PLC0415

    with PrivateRedis(tmp_path / "redis") as private:
        cfg = settings(redis_url=private.url, ws_max_connections_per_user=1)
        token = await store.token(user="hal")  # an API token: its principal is cached after the first auth
        async with serve(cfg) as (base, _), connect(base) as first:
            await auth(first, token)
            private.kill()
            async with connect(base) as second:
                await send(second, type="auth", token=token)
                assert await closed_with(second, timeout=20) == (4429, "too many connections")
            await first.close()
            async with connect(base) as third:  # the slot freed on this node is usable
                await auth(third, token)
            private.start()  # the node shuts down cleanly with its Redis back


async def test_admissions_at_once_share_a_pipeline_and_hold_the_cap(redis: Any) -> None:
    """40 connections of one user at once against a cap of 5: 5 admitted, 5 counted in Redis.

    An admission whose connection gave up before its batch was sent is not
    sent (it takes no slot from the others).
    """
    user = f"u-{uuid.uuid4().hex}"
    cap = ConnectionCap(redis, f"node-{uuid.uuid4().hex[:8]}", limit=5, ttl=30)
    key = connections_key(user)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cap.run)
            results = await asyncio.gather(*(cap.admit(user, f"c{n}") for n in range(40)))
            assert sum(results) == 5 and results[:5] == [True] * 5
            assert await redis.zcard(key) == 5 and cap.local_count(user) == 5

            cap.release(user, "c0")
            await wait_until(lambda: redis.zcard(key), 4)
            late = asyncio.ensure_future(cap.admit(user, "late"))
            await asyncio.sleep(0)  # queued for the next batch ...
            late.cancel()  # ... and gone before it is sent
            assert await cap.admit(user, "after") is True  # same batch: the free slot is its
            assert await redis.zcard(key) == 5
            assert await redis.zscore(key, f"{cap.node_id}:late") is None
            assert cap.local_count(user) == 5
            tg.cancel_scope.cancel()
    finally:
        await redis.delete(key)


async def wait_until(read: Callable[[], Any], value: object, timeout: float = 10.0) -> None:
    """Poll ``read()`` until it returns ``value``."""
    with anyio.fail_after(timeout):
        while await read() != value:
            await anyio.sleep(0.02)
