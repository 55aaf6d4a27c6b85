"""Store and Redis outages: 503 with a body and Retry-After, never 500; acked comments keep their id.

A private PostgreSQL cluster (never the shared one) is stopped while
reviewers post over HTTP and WebSocket; a private redis-server is killed
under the HTTP API. Everything is real: uvicorn on loopback, websockets,
asyncpg, redis-server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import pg_cluster
from gateway_helpers import Store, auth, connect, join, send, serve
from progress_service.embedded_redis import embedded_redis, free_port
from progress_service.keys import events_key
from progress_service.settings import Settings, load_settings

pytestmark = pytest.mark.anyio


def _settings(redis_url: str, database_url: str, tmp_path: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "redis_url": redis_url,
        "database_url": database_url,
        "workspace_root": str(tmp_path / "ws"),
        "log_level": "warning",
        "queue_name": f"ps:queue:test-{uuid.uuid4().hex[:10]}",
        "store_timeout": 2.0,
        "ws_chat_rate": 100.0,
        "ws_chat_burst": 100,
        "http_rate_limit": 100_000,
        # the session's audit key (conftest) and a witness of this test's own, not files in the working directory
        "audit_key_file": os.environ.get("PS_AUDIT_KEY_FILE"),
        "audit_witness": str(tmp_path / "audit-witness.jsonl"),
    }
    base.update(kw)
    return load_settings(env={}, **base)


@pytest.fixture
def private_pg() -> AsyncIterator[pg_cluster.PgCluster]:
    why = pg_cluster.available()
    if why:
        from conftest import missing_service  # noqa: PLC0415

        missing_service(f"no private PostgreSQL cluster: {why}")
    with pg_cluster.pg_cluster() as cluster:
        yield cluster


def _assert_503(resp: httpx.Response, what: str) -> None:
    assert resp.status_code == 503, (what, resp.status_code, resp.text)
    assert resp.headers.get("retry-after", "").isdigit(), (what, resp.headers)
    body = resp.json()
    assert body["status_code"] == 503 and isinstance(body["detail"], str) and body["detail"], (what, body)


def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage() or r.levelno >= logging.ERROR]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


def _routes(job_id: str, reporter: str) -> list[tuple[str, str, dict[str, Any]]]:
    """Every HTTP route that needs the store or Redis, with a plausible request (hooks: a reporter token)."""
    comment = {"json": {"text": "hello"}, "headers": {"Idempotency-Key": uuid.uuid4().hex}}
    return [
        ("GET", "/api/jobs", {}),
        ("POST", "/api/jobs", {"json": {"prompt": "do it"}}),
        ("GET", f"/api/jobs/{job_id}", {}),
        ("GET", f"/api/jobs/{job_id}/events", {}),
        ("GET", f"/api/jobs/{job_id}/stream", {}),
        ("POST", f"/api/jobs/{job_id}/cancel", {}),
        ("GET", f"/api/jobs/{job_id}/comments", {}),
        ("GET", f"/api/jobs/{job_id}/spec", {}),
        ("GET", f"/api/jobs/{job_id}/log.jsonl", {}),
        ("GET", f"/api/jobs/{job_id}/steps/s1", {}),
        ("POST", "/api/session", {"json": {"token": "ps_" + "x" * 43}}),
        (
            "POST",
            "/api/hooks/claude-code",
            {
                "json": {"hook_event_name": "SessionStart", "session_id": "s"},
                "headers": {"Authorization": f"Bearer {reporter}"},
            },
        ),
        ("POST", f"/api/jobs/{job_id}/comments", comment),
        ("POST", f"/api/jobs/{job_id}/instructions", comment),
        ("POST", f"/api/jobs/{job_id}/permissions/p1", {"json": {"allow": True}, "headers": comment["headers"]}),
        ("GET", "/api/audit", {}),
        ("GET", "/api/tokens", {}),
        ("DELETE", "/api/tokens/0123456789abcdef", {}),
        ("POST", "/api/ws-tickets", {}),
        ("GET", "/api/me", {}),
        ("GET", "/readyz", {}),
    ]


async def test_store_down_every_route_answers_503(private_pg, redis_url, tmp_path, caplog) -> None:
    settings = _settings(redis_url, private_pg.url, tmp_path)
    async with Store(private_pg.url) as store:
        token = await store.token(role="admin")
        other = await store.token(role="viewer")  # never seen by the gateway's cache
        reporter = await store.token(role="reporter")
        job_id = await store.job()
    caplog.set_level(logging.WARNING)
    async with serve(settings) as (base, _app), httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=20
    ) as http, connect(base) as live:
        assert (await http.get(f"/api/jobs/{job_id}")).status_code == 200
        await auth(live, token)  # authenticated before the outage
        private_pg.stop()
        for method, path, kw in _routes(job_id, reporter):
            _assert_503(await http.request(method, path, **kw), f"{method} {path}")
        await send(live, type="join", roomId=f"job:{job_id}")  # its team is not known here yet: the store is asked
        with anyio.fail_after(10):
            while (msg := json.loads(await live.recv())).get("type") != "error":
                pass
        assert (msg["code"], msg["roomId"]) == ("unavailable", f"job:{job_id}"), msg
        async with connect(base) as ws:  # a WebSocket auth with the store down: 1011, retry later
            await send(ws, type="auth", token=other)
            with anyio.fail_after(10):
                with contextlib.suppress(Exception):
                    while True:
                        await ws.recv()
            assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1011
        private_pg.start()
        with anyio.fail_after(20):  # the pool reconnects by itself
            while (await http.get(f"/api/jobs/{job_id}")).status_code != 200:
                await anyio.sleep(0.1)
    _no_tracebacks(caplog)


async def test_redis_down_answers_503_never_500(tmp_path, caplog) -> None:
    store_url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    async with Store(store_url) as store:
        token = await store.token(role="admin")
        reporter = await store.token(role="reporter")
        job_id = await store.job()
    port = free_port()
    caplog.set_level(logging.WARNING)
    with embedded_redis(port=port) as url:
        settings = _settings(url, store_url, tmp_path)
        cm = serve(settings)
        base, app = await cm.__aenter__()
        try:
            async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
                assert (await http.get(f"/api/jobs/{job_id}/events")).status_code == 200
                # The redis-server goes away (the context's own stop, by pid).
                await anyio.to_thread.run_sync(_stop_redis_on_port, port)
                statuses = {}
                for method, path, kw in _routes(job_id, reporter):
                    resp = await http.request(method, path, **kw)
                    statuses[f"{method} {path}"] = resp.status_code
                    assert resp.status_code < 500 or resp.status_code == 503, (method, path, resp.status_code, resp.text)
                    if resp.status_code == 503:
                        _assert_503(resp, f"{method} {path}")
                # Submitting needs the queue: never a silent success without Redis.
                assert statuses["POST /api/jobs"] == 503, statuses
                assert statuses["POST /api/ws-tickets"] == 503, statuses
        finally:
            await cm.__aexit__(None, None, None)
    _no_tracebacks(caplog)


def _stop_redis_on_port(port: int) -> None:
    """SHUTDOWN the private redis-server and wait until its port is closed."""
    import redis  # noqa: PLC0415

    with contextlib.suppress(redis.ConnectionError):
        redis.Redis(port=port).shutdown(nosave=True)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            return
        time.sleep(0.05)
    raise TimeoutError("redis-server did not stop")


class _Reviewer:
    """A WebSocket reviewer that sends chats one at a time and records the answers."""

    def __init__(self, ws: Any, job_id: str, name: str) -> None:
        self.ws = ws
        self.room = f"job:{job_id}"
        self.name = name
        self.acked: dict[str, str] = {}
        self.refused: list[str] = []

    async def post(self, request_id: str) -> str:
        await send(self.ws, type="chat", roomId=self.room, requestId=request_id, text=f"{self.name} says {request_id}")
        with anyio.fail_after(15):
            while True:
                msg = json.loads(await self.ws.recv())
                if msg.get("requestId") != request_id or msg.get("type") not in ("ack", "error"):
                    continue  # broadcasts, presence, heartbeats
                if msg["type"] == "ack":
                    assert msg["id"], msg
                    self.acked[request_id] = msg["id"]
                    return "ack"
                assert msg["code"] == "unavailable", msg
                self.refused.append(request_id)
                return "unavailable"


async def test_store_stopped_while_reviewers_post(private_pg, redis_url, tmp_path, caplog) -> None:
    settings = _settings(redis_url, private_pg.url, tmp_path)
    async with Store(private_pg.url) as store:
        tokens = [await store.token(role="reviewer", user=f"rev{i}") for i in range(3)]
        job_id = await store.job()
    caplog.set_level(logging.WARNING)
    http_acked: dict[str, str] = {}
    http_refused: list[str] = []
    outcomes: dict[str, set[str]] = {"healthy": set(), "down": set(), "back": set(), "transition": set()}
    phase = "healthy"

    async with serve(settings) as (base, _app), contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(
            httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {tokens[0]}"}, timeout=20)
        )

        async def http_post(key: str) -> str:
            resp = await http.post(f"/api/jobs/{job_id}/comments", json={"text": f"http says {key}"}, headers={"Idempotency-Key": key})
            if resp.status_code in (200, 201):
                assert resp.json()["id"], resp.text
                http_acked[key] = resp.json()["id"]
                return "ack"
            _assert_503(resp, "POST comment")
            http_refused.append(key)
            return "unavailable"

        reviewers = []
        for i, token in enumerate(tokens[1:]):
            ws = await stack.enter_async_context(connect(base, max_queue=64))
            await auth(ws, token)
            await join(ws, job_id)
            reviewers.append(_Reviewer(ws, job_id, f"ws{i}"))

        async def poster(post: Any, prefix: str, stop: anyio.Event) -> None:
            n = 0
            while not stop.is_set():
                started = phase
                outcome = await post(f"{prefix}-{n}")
                # a post under way while the store stops or starts may go either way
                outcomes[started if started == phase else "transition"].add(outcome)
                n += 1
                await anyio.sleep(0.02)  # pacing, not waiting for a condition

        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(poster, http_post, "h", stop)
            for r in reviewers:
                tg.start_soon(poster, r.post, r.name, stop)
            with anyio.fail_after(30):
                while len(http_acked) + sum(len(r.acked) for r in reviewers) < 9:
                    await anyio.sleep(0.02)
                phase = "transition"  # posts while it stops may still be acked
                await anyio.to_thread.run_sync(private_pg.stop)
                phase = "down"
                refused_at_stop = len(http_refused) + sum(len(r.refused) for r in reviewers)
                while len(http_refused) + sum(len(r.refused) for r in reviewers) < refused_at_stop + 9:
                    await anyio.sleep(0.02)
                phase = "transition"
                await anyio.to_thread.run_sync(private_pg.start)
                phase = "back"
                acked_at_start = len(http_acked) + sum(len(r.acked) for r in reviewers)
                while len(http_acked) + sum(len(r.acked) for r in reviewers) < acked_at_start + 9:
                    await anyio.sleep(0.05)
            stop.set()

        assert outcomes["down"] == {"unavailable"}, outcomes
        assert outcomes["healthy"] == {"ack"} and outcomes["back"] == {"ack"}, outcomes
        # The clients retry what was refused, with the same request ids: stored once.
        for key in list(http_refused):
            assert await http_post(key) == "ack"
        for r in reviewers:
            for rid in list(r.refused):
                assert await r.post(rid) == "ack"

        resp = await http.get(f"/api/jobs/{job_id}/comments", params={"limit": 1000})
        assert resp.status_code == 200
        stored = resp.json()["items"]

    acked = dict(http_acked)
    for r in reviewers:
        acked.update(r.acked)
    by_request: dict[str, list[dict[str, Any]]] = {}
    for c in stored:
        by_request.setdefault(c["requestId"], []).append(c)
    assert all(c["id"] for c in stored), [c for c in stored if not c["id"]]
    for rid, event_id in acked.items():
        assert len(by_request.get(rid, [])) == 1, (rid, by_request.get(rid))
        assert by_request[rid][0]["id"] == event_id, (rid, by_request[rid][0], event_id)
    # ... and in the job's stream exactly once each.
    from redis.asyncio import Redis  # noqa: PLC0415

    client = Redis.from_url(redis_url)
    try:
        entries = await client.xrange(events_key(job_id))
    finally:
        await client.aclose()
    chats = [json.loads(fields[b"b"])["requestId"] for _id, fields in entries if fields.get(b"t") == b"chat"]
    assert sorted(chats) == sorted(set(chats)) and set(chats) >= set(acked), (len(chats), len(set(chats)))
    _no_tracebacks(caplog)


async def test_comment_rows_without_event_id_are_repaired_on_read(redis_url, tmp_path) -> None:
    """The two ways a stored comment can lack its id, both filled in by the next read, once.

    (a) appended to the stream, but recording the id on the row failed (the
    store went away right after the ack); (b) stored, but the append failed.
    """
    from progress_service.comments import Comments  # noqa: PLC0415
    from progress_service.store import comments as comment_store  # noqa: PLC0415
    from progress_service.store.identity import principal_for_token  # noqa: PLC0415

    store_url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    settings = _settings(redis_url, store_url, tmp_path)
    async with Store(store_url) as store:
        token = await store.token(role="reviewer")
        job_id = await store.job()
        principal = await principal_for_token(store.engine, token)
        assert principal is not None
        items = [
            comment_store.NewComment(
                job_id=job_id, room_id=f"job:{job_id}", team_id=principal.team_id, user_id=principal.user_id,
                user_name=principal.user_name, request_id=rid, text=f"text {rid}", created_at=1,
            )
            for rid in ("published", "unpublished")
        ]
        (published, _), (unpublished, _) = await comment_store.store_batch(store.engine, items)
        assert published.id is None and unpublished.id is None
        from redis.asyncio import Redis  # noqa: PLC0415

        client = Redis.from_url(redis_url)
        try:
            comments = Comments(store.engine, client, settings)
            # (a): the stream append happened (the writer's script), the row was not updated.
            [acked_id] = await comments.publish_stored(job_id, [published])
        finally:
            await client.aclose()

    async with serve(settings) as (base, _app), httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=20
    ) as http:
        first = (await http.get(f"/api/jobs/{job_id}/comments")).json()["items"]
        again = (await http.get(f"/api/jobs/{job_id}/comments")).json()["items"]
    ids = {c["requestId"]: c["id"] for c in first}
    assert ids["published"] == acked_id  # the id the client was acked with
    assert ids["unpublished"], first
    assert {c["requestId"]: c["id"] for c in again} == ids
    async with Store(store_url) as store:  # recorded on the rows
        rows = await comment_store.list_comments(store.engine, f"job:{job_id}")
        assert {c.requestId: c.id for c in rows} == ids
    client = Redis.from_url(redis_url)
    try:
        entries = await client.xrange(events_key(job_id))
    finally:
        await client.aclose()
    chats = [json.loads(f[b"b"])["requestId"] for _i, f in entries if f.get(b"t") == b"chat"]
    assert sorted(chats) == ["published", "unpublished"]  # each in the stream once

