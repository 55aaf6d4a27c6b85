"""The gateway under load and faults: fast publishing during resume, slow and
dead readers, two gateway processes on one Redis, a Redis restart, shutdown.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
import websockets

from gateway_helpers import Store, auth, closed_with, collect_events, connect, join, publish, recv_type, send, serve
from progress_service import metrics, streams
from progress_service.app import make_redis
from progress_service.embedded_redis import free_port, redis_binary, wait_for_port
from progress_service.events import StoredChat
from progress_service.ids import now_ms

pytestmark = pytest.mark.slow


async def test_resume_under_fast_publishing_is_exact(make_settings: Callable[..., Any], store: Store, redis: Any) -> None:
    """Clients that keep dropping and rejoining with `since` end with exactly the job's sequence."""
    total = 2000
    async with serve(make_settings()) as (base, _app):
        token, job = await store.token(), await store.job()
        published: list[str] = []
        done = anyio.Event()

        async def publisher() -> None:
            for i in range(total):
                published.extend(await publish(redis, job, 1, start=i))
                if i % 50 == 0:
                    await anyio.sleep(0)  # let clients interleave
            done.set()

        async def hopping_client(results: list[str], seed: int) -> None:
            rng = random.Random(seed)
            while True:
                async with connect(base, max_queue=16) as ws:
                    await auth(ws, token)
                    await join(ws, job, since=results[-1] if results else None)
                    want = rng.randint(20, 300)
                    with anyio.move_on_after(1.0):
                        while want:
                            for e in await collect_events(ws, 1):
                                results.append(e["id"])
                                want -= 1
                if done.is_set() and results and results[-1] == published[-1]:
                    return

        async def steady_client(results: list[str]) -> None:
            async with connect(base, max_queue=16) as ws:
                await auth(ws, token)
                await join(ws, job)
                while not (done.is_set() and results and results[-1] == published[-1]):
                    with anyio.move_on_after(1.0):
                        results.extend(e["id"] for e in await collect_events(ws, 1))

        hoppers: list[list[str]] = [[] for _ in range(4)]
        steady: list[str] = []
        # ~10 s idle; the bound only stops a hang (it was hit at 60 s with
        # both cores saturated by other processes).
        with anyio.fail_after(150):
            async with anyio.create_task_group() as tg:
                tg.start_soon(publisher)
                tg.start_soon(steady_client, steady)
                for n, res in enumerate(hoppers):
                    tg.start_soon(hopping_client, res, n)
        assert len(published) == total
        for res in [steady, *hoppers]:
            assert res == published


async def test_slow_consumer_closed_1013_others_keep_receiving(make_settings: Callable[..., Any], store: Store, redis: Any) -> None:
    settings = make_settings(ws_outbox_bytes=64 * 1024, ws_send_timeout=15, ws_ping_interval=60, ws_ping_timeout=60)
    count, pad = 1500, 4000  # ~6 MB: more than the socket buffers and the outbox hold
    async with serve(settings) as (base, _app):
        token, job = await store.token(), await store.job()
        before = metrics.ws_closes.labels("1013")._value.get()
        async with connect(base, max_queue=1) as slow, connect(base, max_queue=16) as fast:
            await auth(slow, token)
            await join(slow, job)
            await auth(fast, token)
            await join(fast, job)
            slow.transport.pause_reading()  # a reader that stopped reading
            lags: list[float] = []
            got: list[str] = []

            async def read_fast() -> None:
                while len(got) < count:
                    for e in await collect_events(fast, 1, timeout=20):
                        got.append(e["id"])
                        lags.append(now_ms() - e["at"])

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(read_fast)
                    ids = await publish(redis, job, count, pad=pad)
            assert got == ids
            lags.sort()
            p99 = lags[int(len(lags) * 0.99)]
            print(f"fast reader p99 {p99} ms, max {lags[-1]} ms")
            assert p99 < 1000, f"p99 latency {p99} ms for the fast reader"
            with anyio.fail_after(10):
                while metrics.ws_closes.labels("1013")._value.get() == before:
                    await anyio.sleep(0.05)
            slow.transport.resume_reading()
            code, reason = await closed_with(slow, timeout=20)
            assert (code, reason) == (1013, "slow consumer")


async def test_dead_client_dropped_within_ping_interval_plus_timeout(make_settings: Callable[..., Any], store: Store) -> None:
    settings = make_settings(ws_ping_interval=0.5, ws_ping_timeout=0.5, presence_grace=0.1)
    async with serve(settings) as (base, _app):
        job = await store.job()
        async with connect(base) as watcher, connect(base) as dead:
            await auth(watcher, await store.token(user="watcher"))
            await join(watcher, job)
            await auth(dead, await store.token(user="dead"))
            await join(dead, job)
            await recv_type(watcher, "presence")  # dead joined
            t0 = time.monotonic()
            dead.transport.pause_reading()  # stops answering pings
            msg = await recv_type(watcher, "presence", timeout=5)
            elapsed = time.monotonic() - t0
            assert [m["userName"] for m in msg["left"]] == ["dead"]
            # interval + timeout (+ presence grace and a little scheduling slack)
            assert elapsed < 0.5 + 0.5 + 0.1 + 0.6, elapsed
            dead.transport.resume_reading()


async def test_shutdown_closes_1001(make_settings: Callable[..., Any], store: Store) -> None:
    async with serve(make_settings()) as (base, _app):
        job = await store.job()
        ws = await websockets.connect(base.replace("http", "ws") + "/ws")
        await auth(ws, await store.token())
        await join(ws, job)
        assert ws.protocol.extensions == []  # per-message deflate is off by default
    assert await closed_with(ws) == (1001, "server restarting")


# --------------------------------------------------------------------------
# Two gateway processes sharing one Redis
# --------------------------------------------------------------------------


async def test_a_killed_nodes_users_are_announced_left_by_the_other_node(
    make_settings: Callable[..., Any], server_process: Any, store: Store
) -> None:
    """Presence upkeep is one heartbeat per node: when a node is SIGKILLed (no leave is ever written), the other
    node finds its heartbeat lapsed and announces its users left, within PS_PRESENCE_NODE_TTL and a beat."""
    settings = make_settings(presence_grace=0.2, presence_node_ttl=1.5)
    doomed, survivor = server_process(settings), server_process(settings)
    job = await store.job()
    async with connect(survivor.url) as watcher, connect(doomed.url, close_timeout=0.5) as kim:
        await auth(watcher, await store.token(user="wes"))
        await auth(kim, await store.token(user="kim"))
        await join(watcher, job)
        await join(kim, job)
        msg = await recv_type(watcher, "presence")
        assert [m["userName"] for m in msg["joined"]] == ["kim"]
        started = time.monotonic()
        doomed.stop(signal.SIGKILL)
        msg = await recv_type(watcher, "presence", timeout=10)
        assert [m["userName"] for m in msg["left"]] == ["kim"] and msg["joined"] == []
        # ttl (1.5 s) + the survivor's next beat (0.5 s) + slack for a busy machine
        assert time.monotonic() - started < 8


async def test_two_processes_same_events_presence_and_order(make_settings: Callable[..., Any], server_process: Any, store: Store, redis: Any) -> None:
    settings = make_settings(presence_grace=0.3)
    one = server_process(settings)
    two = server_process(settings)
    job = await store.job()
    async with connect(one.url) as a, connect(two.url) as b:
        await auth(a, await store.token(user="ann"))
        await auth(b, await store.token(user="ben"))
        await join(a, job)
        await join(b, job)
        await recv_type(a, "presence")  # ben joined (through node two)
        async with connect(two.url, max_queue=None) as c:  # reads everything, so its close is quick
            await auth(c, await store.token(user="cid"))
            await join(c, job)
            ids: list[str] = []
            for i in range(100):
                ids += await publish(redis, job, 1, start=i)
                if i % 25 == 0:  # comments, as the comments module appends them
                    chat = StoredChat(requestId=f"r{i}", userId="u", userName="ann", text=f"c{i}", sentAt=now_ms())
                    ids.append(await streams.append_chat(redis, job, chat, maxlen=10_000))
        # c left: after the grace both nodes announce it

        async def seen(ws: Any) -> list[tuple[str, str]]:
            out: list[tuple[str, str]] = []
            with anyio.fail_after(10):
                while True:
                    msg = json.loads(await ws.recv())
                    if msg["type"] in ("event", "chat"):
                        out.append((msg["type"], msg["id"]))
                    elif msg["type"] == "presence":
                        out.append(("presence", json.dumps([[m["userName"] for m in msg["joined"]], [m["userName"] for m in msg["left"]]])))
                        if msg["left"]:
                            return out

        seq_a, seq_b = await seen(a), await seen(b)
    assert [i for t, i in seq_a if t != "presence"] == ids
    assert seq_a == seq_b or [x for x in seq_a if x[0] != "presence"] == [x for x in seq_b if x[0] != "presence"]
    assert [x for x in seq_a if x[0] == "presence"] == [x for x in seq_b if x[0] == "presence"]
    assert ("presence", json.dumps([["cid"], []])) in seq_a
    assert seq_a[-1] == ("presence", json.dumps([[], ["cid"]]))


# --------------------------------------------------------------------------
# Redis restarted under a running gateway
# --------------------------------------------------------------------------


class OwnedRedis:
    """A test-owned redis-server with AOF (fsync always) that can be restarted on its port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="ps-redis-aof-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--dir", self.dir]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", self.port)
        # Accepting connections is not ready: while it replays the AOF, Redis
        # answers -LOADING. Wait for a real PONG.
        deadline = time.monotonic() + 10
        while not _pong(self.port):
            assert time.monotonic() < deadline, "redis-server did not finish loading"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture
def owned_redis() -> Iterator[OwnedRedis]:
    r = OwnedRedis()
    r.start()
    try:
        yield r
    finally:
        r.stop()


async def test_redis_restart_nothing_skipped(make_settings: Callable[..., Any], store: Store, owned_redis: OwnedRedis) -> None:
    settings = make_settings(redis_url=owned_redis.url)
    # The publisher retries like the service's own clients do.
    pub = make_redis(owned_redis.url)
    try:
        async with serve(settings) as (base, app):
            token, job = await store.token(), await store.job()
            async with connect(base) as ws:
                await auth(ws, token)
                await join(ws, job)
                first = await publish(pub, job, 20)
                assert [e["id"] for e in await collect_events(ws, 20)] == first
                owned_redis.stop()
                await anyio.sleep(1.0)  # the hub is now failing and backing off
                owned_redis.start()
                await pub.connection_pool.disconnect()
                second = await publish(pub, job, 30, start=20)
                assert [e["id"] for e in await collect_events(ws, 30, timeout=15)] == second
                assert app.state.services.gateway.hub.reconnects > 0
                # the connection is still usable: a new watcher resumes from the middle
                async with connect(base) as late:
                    await auth(late, token)
                    await join(late, job, since=first[9])
                    assert [e["id"] for e in await collect_events(late, 40)] == first[10:] + second
                await send(ws, type="ping")
                await recv_type(ws, "pong")
    finally:
        await pub.aclose()


async def test_shutdown_closes_unauthenticated_connections_too(make_settings: Callable[..., Any]) -> None:
    async with serve(make_settings(ws_auth_timeout=30)) as (base, _app):
        ws = await websockets.connect(base.replace("http", "ws") + "/ws")
        await anyio.sleep(0.1)
    assert await closed_with(ws) == (1001, "server restarting")
