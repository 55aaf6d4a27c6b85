"""Comments end to end: real ``progress-service serve`` nodes, real clients.

Two gateway processes share one Redis and one SQL store (SQLite file or
PostgreSQL database, each test runs on both); clients are ``websockets``
connections and ``httpx``. Job events are appended to the job's stream the
way the worker does, so chat order is checked against real job events.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa
import websockets

from progress_service.store import audit
from progress_service.store.schema import comments
from gateway_helpers import Store, publish, ws_url

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


class Client:
    """A WebSocket client whose reader task keeps every message it receives."""

    def __init__(self, ws: Any, name: str) -> None:
        self.ws = ws
        self.name = name
        self.messages: list[dict[str, Any]] = []
        self.close: tuple[int | None, str | None] | None = None
        self._changed = anyio.Event()

    async def reader(self) -> None:
        try:
            async for raw in self.ws:
                msg = json.loads(raw)
                self.messages.extend(msg if isinstance(msg, list) else [msg])
                self._notify()
        except websockets.ConnectionClosed:
            pass
        rcvd = self.ws.protocol.close_rcvd
        self.close = (rcvd.code, rcvd.reason) if rcvd else (None, None)
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    async def send(self, **msg: Any) -> None:
        await self.ws.send(json.dumps(msg))

    async def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0, *, start: int = 0) -> dict[str, Any]:
        """The first message from index ``start`` on that ``pred`` accepts."""
        with anyio.fail_after(timeout):
            seen = start
            while True:
                changed = self._changed
                for msg in self.messages[seen:]:
                    if pred(msg):
                        return msg
                seen = len(self.messages)
                if self.close is not None:
                    raise AssertionError(f"{self.name}: closed {self.close} while waiting")
                await changed.wait()

    async def wait_closed(self, timeout: float = 10.0) -> tuple[int | None, str | None]:
        with anyio.fail_after(timeout):
            while self.close is None:
                await self._changed.wait()
        return self.close

    def items(self, room: str) -> list[tuple[str, str]]:
        """(type, id) of the room items received, in order."""
        return [(m["type"], m["id"]) for m in self.messages if m.get("type") in ("event", "chat") and m.get("roomId") == room]

    def chats(self, request_id: str | None = None) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == "chat" and (request_id is None or m["requestId"] == request_id)]

    async def auth_join(self, token: str, room: str | None = None) -> None:
        await self.send(type="auth", token=token)
        await self.wait_for(lambda m: m.get("type") == "auth_ok")
        if room:
            await self.send(type="join", roomId=room)
            await self.wait_for(lambda m: m.get("type") == "joined" and m["roomId"] == room)

    async def chat(self, room: str, request_id: str, text: str, timeout: float = 10.0) -> dict[str, Any]:
        """Send a chat and wait for its ack or error."""
        start = len(self.messages)
        await self.send(type="chat", roomId=room, requestId=request_id, text=text)
        return await self.wait_for(
            lambda m: m.get("type") in ("ack", "error") and m.get("requestId") == request_id, timeout, start=start
        )


@asynccontextmanager
async def clients(bases: list[str], names: list[str]) -> AsyncIterator[list[Client]]:
    async with AsyncExitStack() as stack, anyio.create_task_group() as tg:
        out = []
        for base, name in zip(bases, names, strict=True):
            ws = await stack.enter_async_context(websockets.connect(ws_url(base), max_queue=None, open_timeout=5))
            c = Client(ws, name)
            tg.start_soon(c.reader)
            out.append(c)
        try:
            yield out
        finally:
            for c in out:
                await c.ws.close()


@pytest.fixture
def two_nodes(db_url: str, make_settings: Any, server_process: Any) -> Callable[..., Any]:
    """``two_nodes(**settings)``: two ``serve`` processes on one Redis and the ``db_url`` store."""

    def start(**overrides: Any) -> tuple[Any, list[str]]:
        settings = make_settings(database_url=db_url, **overrides)
        nodes = [server_process(settings, "serve"), server_process(settings, "serve")]
        return settings, [n.url for n in nodes]

    return start


async def stored(db_url: str, **where: Any) -> list[Any]:
    from progress_service.store.db import create_engine  # noqa: PLC0415

    engine = create_engine(db_url)
    try:
        async with engine.connect() as conn:
            q = sa.select(comments)
            for k, v in where.items():
                q = q.where(getattr(comments.c, k) == v)
            return (await conn.execute(q.order_by(comments.c.id))).all()
    finally:
        await engine.dispose()


# --------------------------------------------------------------------------
# Durable before ack; every member on two nodes, once, in order
# --------------------------------------------------------------------------


async def test_comments_reach_every_member_on_two_nodes_once_in_order(db_url: str, two_nodes: Any, redis: Any) -> None:
    _settings, (n1, n2) = two_nodes()
    async with Store(db_url) as store:
        job = await store.job()
        room = f"job:{job}"
        ana_token = await store.token(role="reviewer", user="ana")
        bob_token = await store.token(role="reviewer", user="bob")
        viewer_token = await store.token(role="viewer", user="vic")
        async with clients([n1, n2, n2, n2], ["ana@1", "ana@2", "bob@2", "vic@2"]) as (ana1, ana2, bob, vic):
            for c, tok in ((ana1, ana_token), (ana2, ana_token), (bob, bob_token), (vic, viewer_token)):
                await c.auth_join(tok, room)
            members = [ana1, ana2, bob, vic]

            expected: list[tuple[str, str]] = []
            expected += [("event", i) for i in await publish(redis, job, 1)]
            ack = await ana1.chat(room, "c1", "first comment")
            assert ack["type"] == "ack", ack
            # Acked only once durable: the store has it, with that id, right now.
            rows = await stored(db_url, request_id="c1")
            assert [(r.text, r.event_id) for r in rows] == [("first comment", ack["id"])]
            expected.append(("chat", ack["id"]))
            expected += [("event", i) for i in await publish(redis, job, 2, start=1)]
            ack2 = await bob.chat(room, "c2", "  second\n\tcomment  ")
            assert ack2["type"] == "ack", ack2
            expected.append(("chat", ack2["id"]))
            expected += [("event", i) for i in await publish(redis, job, 1, start=3)]

            for m in members:
                await m.wait_for(lambda msg, last=expected[-1][1]: msg.get("id") == last)
                assert m.items(room) == expected, m.name
            chat = bob.chats("c2")[0]
            assert (chat["text"], chat["userName"], chat["roomId"]) == ("second\n\tcomment", "bob", room)

            # The same requestId three times, from two connections of one user on two nodes, at once.
            acks: list[dict[str, Any]] = []

            async def send_dup(c: Client) -> None:
                acks.append(await c.chat(room, "dup", "only once"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(send_dup, ana1)
                tg.start_soon(send_dup, ana2)
                tg.start_soon(send_dup, ana1)
            assert [a["type"] for a in acks] == ["ack"] * 3
            assert len({a["id"] for a in acks}) == 1
            assert len(await stored(db_url, request_id="dup")) == 1
            after = await publish(redis, job, 1, start=4)
            for m in members:
                await m.wait_for(lambda msg, last=after[0]: msg.get("id") == last)
                assert len(m.chats("dup")) == 1, m.name

            def dup_acks(c: Client) -> list[str]:
                return [m["id"] for m in c.messages if m.get("type") == "ack" and m["requestId"] == "dup"]

            with anyio.fail_after(10):  # each of the three sends gets its own ack
                while len(dup_acks(ana1)) < 2:
                    await anyio.sleep(0.05)
            assert dup_acks(ana1) == [acks[0]["id"]] * 2 and dup_acks(ana2) == [acks[0]["id"]]
            entries = await redis.xrange(f"ps:{{job:{job}}}:events")
            assert sum(1 for _, f in entries if f[b"t"] == b"chat" and b'"dup"' in f[b"b"]) == 1

            # A viewer's comment: forbidden, stored nowhere, received by no one.
            err = await vic.chat(room, "v1", "may I?")
            assert (err["type"], err["code"]) == ("error", "forbidden")
            assert await stored(db_url, request_id="v1") == []
            await anyio.sleep(0.3)
            assert all(not m.chats("v1") for m in members)

        # Chat before join closes 1008.
        async with clients([n2], ["early"]) as (early,):
            await early.auth_join(bob_token)
            await early.send(type="chat", roomId=room, requestId="x", text="hello?")
            assert await early.wait_closed() == (1008, "join room before chat")
        assert await stored(db_url, request_id="x") == []


# --------------------------------------------------------------------------
# Store unreachable: unavailable, nothing broadcast; the retry succeeds
# --------------------------------------------------------------------------


@asynccontextmanager
async def store_outage(db_url: str) -> AsyncIterator[None]:
    """A real fault: SQLite's write lock held by another process; PostgreSQL refusing connections."""
    if db_url.startswith("sqlite"):
        path = db_url.split(":///", 1)[1]
        blocker = sqlite3.connect(path, timeout=1)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            blocker.rollback()
            blocker.close()
        return
    import asyncpg  # noqa: PLC0415

    from conftest import PG_ADMIN_URL  # noqa: PLC0415

    dbname = db_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await admin.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS false')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", dbname)
        yield
    finally:
        await admin.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS true')
        await admin.close()


async def test_store_unreachable_then_retry_succeeds(db_url: str, two_nodes: Any, redis: Any) -> None:
    _settings, (n1, n2) = two_nodes(store_timeout=1.5)
    async with Store(db_url) as store:
        job = await store.job()
        room = f"job:{job}"
        ana_token = await store.token(role="reviewer", user="ana")
        bob_token = await store.token(role="reviewer", user="bob")
    async with clients([n1, n2], ["ana@1", "bob@2"]) as (ana, bob):
        await ana.auth_join(ana_token, room)
        await bob.auth_join(bob_token, room)
        async with store_outage(db_url):
            err = await ana.chat(room, "r1", "during the outage")
            assert (err["type"], err["code"], err["requestId"]) == ("error", "unavailable", "r1")
            await anyio.sleep(0.5)
        await anyio.sleep(0.5)  # an abandoned write, if any, has rolled back by now
        assert await stored(db_url, request_id="r1") == []
        assert not ana.chats() and not bob.chats()

        with anyio.fail_after(20):  # after recovery, the same requestId succeeds
            while True:
                ack = await ana.chat(room, "r1", "during the outage")
                if ack["type"] == "ack":
                    break
                await anyio.sleep(0.5)
        for c in (ana, bob):
            await c.wait_for(lambda m: m.get("type") == "chat" and m["requestId"] == "r1")
        await anyio.sleep(0.3)
        assert len(ana.chats("r1")) == 1 and len(bob.chats("r1")) == 1
        rows = await stored(db_url, request_id="r1")
        assert [(r.event_id) for r in rows] == [ack["id"]]


# --------------------------------------------------------------------------
# Load: 1,000 comments from 10 concurrent reviewers
# --------------------------------------------------------------------------


async def test_thousand_comments_from_ten_reviewers(db_url: str, two_nodes: Any) -> None:
    _settings, bases = two_nodes(ws_chat_rate=10_000.0, ws_chat_burst=10_000)
    async with Store(db_url) as store:
        job = await store.job()
        room = f"job:{job}"
        tokens = [await store.token(role="reviewer", user=f"rev{i}") for i in range(10)]
        watcher_token = await store.token(role="viewer", user="watcher")
        acks: dict[str, str] = {}
        async with clients([bases[i % 2] for i in range(10)] + [bases[1]], [f"rev{i}" for i in range(10)] + ["watcher"]) as cs:
            for c, tok in zip(cs, [*tokens, watcher_token], strict=True):
                await c.auth_join(tok, room)

            async def reviewer(i: int) -> None:
                for n in range(100):
                    ack = await cs[i].chat(room, f"r{i}-{n}", f"comment {n} of reviewer {i}", timeout=30)
                    assert ack["type"] == "ack", ack
                    acks[f"r{i}-{n}"] = ack["id"]

            with anyio.fail_after(240):
                async with anyio.create_task_group() as tg:
                    for i in range(10):
                        tg.start_soon(reviewer, i)
            assert len(acks) == 1000 and len(set(acks.values())) == 1000
            watcher = cs[-1]
            with anyio.fail_after(30):
                while len(watcher.chats()) < 1000:
                    await anyio.sleep(0.1)
            got = [m["id"] for m in watcher.chats()]
            assert sorted(got, key=lambda i: tuple(map(int, i.split("-")))) == got  # room order
            assert set(got) == set(acks.values())

        rows = await stored(db_url, room_id=room)
        assert len(rows) == 1000 and {r.event_id for r in rows} == set(acks.values())
        result = await audit.verify(store.engine)
        assert result.ok, result.mismatch
        assert len(await audit.list_records(store.engine, team_id=rows[0].team_id, action="comment.create", limit=2000)) == 1000


# --------------------------------------------------------------------------
# Revocation closes live connections with 4403 token revoked, on every node
# --------------------------------------------------------------------------


async def test_revoked_token_connections_are_closed_4403_revoked(db_url: str, two_nodes: Any) -> None:
    _settings, (n1, n2) = two_nodes()
    async with Store(db_url) as store:
        job = await store.job()
        room = f"job:{job}"
        admin_token = await store.token(role="admin", user="boss")
        victim_token, victim_id = await store.token_with_id(role="reviewer", user="eve")
        cli_token, cli_id = await store.token_with_id(role="reviewer", user="mal")
        other_token = await store.token(role="reviewer", user="ok")
        async with clients([n1, n2, n2, n1], ["eve@1", "eve@2", "mal@2", "ok@1"]) as (eve1, eve2, mal, ok):
            await eve1.auth_join(victim_token, room)
            await eve2.auth_join(victim_token, room)
            await mal.auth_join(cli_token, room)
            await ok.auth_join(other_token, room)

            # The admin API (node 1): the token's connections on both nodes close.
            async with httpx.AsyncClient(base_url=n1, headers={"Authorization": f"Bearer {admin_token}"}) as http:
                listed = (await http.get("/api/tokens")).json()["items"]
                assert victim_id in {t["id"] for t in listed}
                assert all("hash" not in json.dumps(t).lower() and victim_token not in json.dumps(t) for t in listed)
                res = await http.delete(f"/api/tokens/{victim_id}")
                assert res.status_code == 200, res.text
                assert res.json()["revokedAt"] is not None
            assert await eve1.wait_closed(5) == (4403, "token revoked")
            assert await eve2.wait_closed(5) == (4403, "token revoked")

            # The CLI without Redis: the gateways notice through the store.
            env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
            env["PS_DATABASE_URL"] = db_url
            result = subprocess.run(
                [sys.executable, "-m", "progress_service.cli", "token", "revoke", cli_id],
                env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
            )
            assert result.returncode == 0, result.stderr
            assert await mal.wait_closed(10) == (4403, "token revoked")

            # Others stay connected; the revoked token is refused from now on.
            await ok.send(type="ping")
            await ok.wait_for(lambda m: m.get("type") == "pong")
            async with clients([n2], ["eve-again"]) as (again,):
                await again.send(type="auth", token=victim_token)
                assert (await again.wait_closed())[0] == 4403

        actions = [(r.action, r.detail.get("tokenId")) for r in await audit.list_records(store.engine, team_id=await audit.team_id_for(store.engine, "t1"), action="token.")]
        assert ("token.revoke", victim_id) in actions and ("token.revoke", cli_id) in actions


# --------------------------------------------------------------------------
# HTTP: comments with Idempotency-Key, listing, audit API
# --------------------------------------------------------------------------


async def test_http_comments_and_audit_api(db_url: str, two_nodes: Any) -> None:
    _settings, (n1, n2) = two_nodes()
    async with Store(db_url) as store:
        job = await store.job()
        room = f"job:{job}"
        rev = await store.token(role="reviewer", user="rita")
        viewer = await store.token(role="viewer", user="val")
        admin = await store.token(role="admin", user="adam")
        stranger = await store.token(role="admin", team="t2", user="sam")

        def h(tok: str, key: str | None = None) -> dict[str, str]:
            out = {"Authorization": f"Bearer {tok}"}
            if key:
                out["Idempotency-Key"] = key
            return out

        async with clients([n2], ["watch@2"]) as (watch,), httpx.AsyncClient(base_url=n1) as http:
            await watch.auth_join(viewer, room)
            first = await http.post(f"/api/jobs/{job}/comments", json={"text": " over http "}, headers=h(rev, "k1"))
            assert first.status_code == 201, first.text
            body = first.json()
            assert (body["text"], body["userName"], body["roomId"], body["requestId"]) == ("over http", "rita", room, "k1")
            again = await http.post(f"/api/jobs/{job}/comments", json={"text": " over http "}, headers=h(rev, "k1"))
            assert again.status_code == 200 and again.json() == body
            msg = await watch.wait_for(lambda m: m.get("type") == "chat")
            assert (msg["id"], msg["text"]) == (body["id"], "over http")
            await anyio.sleep(0.3)
            assert len(watch.chats()) == 1

            assert (await http.post(f"/api/jobs/{job}/comments", json={"text": "hi"}, headers=h(viewer, "k2"))).status_code == 403
            assert (await http.post(f"/api/jobs/{job}/comments", json={"text": "a\x00b"}, headers=h(rev, "k3"))).status_code == 400
            assert (await http.post(f"/api/jobs/{job}/comments", json={"text": "hi"}, headers=h(rev))).status_code == 400
            assert (await http.post(f"/api/jobs/{job}/comments", json={"text": "hi"}, headers=h(stranger, "k4"))).status_code == 404
            assert (await http.get(f"/api/jobs/{job}/comments", headers=h(stranger))).status_code == 404
            assert (await http.get("/api/jobs/nope/comments", headers=h(viewer))).status_code == 404

            for i in range(4):
                r = await http.post(f"/api/jobs/{job}/comments", json={"text": f"n{i}"}, headers=h(rev, f"p{i}"))
                assert r.status_code == 201
            page = (await http.get(f"/api/jobs/{job}/comments", params={"limit": 3}, headers=h(viewer))).json()
            rest = (await http.get(f"/api/jobs/{job}/comments", params={"limit": 3, "cursor": page["nextCursor"]}, headers=h(viewer))).json()
            assert [c["text"] for c in page["items"] + rest["items"]] == ["over http", "n0", "n1", "n2", "n3"]
            assert rest["nextCursor"] is None

            # The audit API: admins of the team only, filters and cursor.
            assert (await http.get("/api/audit", headers=h(rev))).status_code == 403
            got = (await http.get("/api/audit", params={"action": "comment.create", "room": room, "limit": 2}, headers=h(admin))).json()
            more = (await http.get("/api/audit", params={"action": "comment.create", "cursor": got["nextCursor"]}, headers=h(admin))).json()
            records = got["items"] + more["items"]
            assert [r["detail"]["text"] for r in records] == ["over http", "n0", "n1", "n2", "n3"]
            assert all(r["prevHash"] and r["hash"] for r in records)
            assert (await http.get("/api/audit", params={"since": "1h"}, headers=h(admin))).json()["items"]
            assert (await http.get("/api/audit", params={"since": "2999-01-01"}, headers=h(admin))).json()["items"] == []
            assert (await http.get("/api/audit", params={"since": "whenever"}, headers=h(admin))).status_code == 400
            assert (await http.get("/api/audit", headers=h(stranger))).json()["items"] == []

            # Security events from the HTTP API land through the non-blocking writer.
            sub = await store.token(role="submitter", user="sue")
            job2 = await http.post("/api/jobs", json={"prompt": "audited"}, headers=h(sub))
            assert job2.status_code == 201, job2.text
            with anyio.fail_after(10):
                while True:
                    items = (await http.get("/api/audit", params={"action": "job.submit"}, headers=h(admin))).json()["items"]
                    if items:
                        break
                    await anyio.sleep(0.2)
            assert (items[0]["actor"], items[0]["roomId"]) == ("sue", f"job:{job2.json()['id']}")
        assert (await audit.verify(store.engine)).ok
