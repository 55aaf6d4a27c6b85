"""Helpers for the gateway tests: jobs, tokens, events and a WebSocket client.

Everything is real: the store is the test's SQLite file, Redis is the test
Redis, the server is uvicorn on loopback and the client is ``websockets``.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import websockets
from websockets.asyncio.client import ClientConnection

from progress_service import streams
from progress_service.events import JobSpec, StoredEvent
from progress_service.ids import now_ms
from progress_service.store.db import create_engine
from progress_service.store.identity import create_token, ensure_team, ensure_user
from progress_service.store.jobs import create_job
from progress_service.store.migrations import migrate
from servers import run_app


class Store:
    """Creates teams, users, tokens and jobs in a server's SQL store."""

    def __init__(self, database_url: str) -> None:
        self.engine = create_engine(database_url)

    async def __aenter__(self) -> Store:
        await migrate(self.engine)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.engine.dispose()

    async def token(self, *, role: str = "reviewer", team: str = "t1", user: str | None = None, expires_in: int | None = None) -> str:
        token, _ = await create_token(self.engine, user=user or f"u-{uuid.uuid4().hex[:6]}", team=team, role=role, expires_in=expires_in)
        return token

    async def token_with_id(self, **kw: Any) -> tuple[str, str]:
        return await create_token(self.engine, user=kw.pop("user", f"u-{uuid.uuid4().hex[:6]}"), team=kw.pop("team", "t1"), role=kw.pop("role", "reviewer"), **kw)

    async def job(self, *, team: str = "t1", user: str = "submitter") -> str:
        job_id = uuid.uuid4().hex[:12]
        await create_job(
            self.engine,
            job_id=job_id,
            team_id=await ensure_team(self.engine, team),
            user_id=await ensure_user(self.engine, user),
            spec=JobSpec(prompt="test job"),
            created_at=now_ms(),
            demo=True,
        )
        return job_id


async def publish(redis: Any, job_id: str, n: int, *, start: int = 0, maxlen: int = 10_000, pad: int = 0) -> list[str]:
    """Append ``n`` ``log`` events numbered from ``start``; returns their ids."""
    ids = []
    for i in range(start, start + n):
        event = StoredEvent(kind="log", at=now_ms(), data={"stream": "stderr", "line": f"{i}" + "x" * pad})
        ids.append(await streams.append_event(redis, job_id, event, maxlen=maxlen))
    return ids


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/ws"


@contextlib.asynccontextmanager
async def connect(base: str, **kw: Any) -> AsyncIterator[ClientConnection]:
    """A raw WebSocket client on ``base``'s /ws (small receive queue)."""
    kw.setdefault("max_queue", 4)
    kw.setdefault("open_timeout", 5)
    async with websockets.connect(ws_url(base), **kw) as ws:
        yield ws


async def recv(ws: ClientConnection, timeout: float = 5.0) -> Any:
    """The next message, decoded."""
    with anyio.fail_after(timeout):
        return json.loads(await ws.recv())


async def recv_type(ws: ClientConnection, type_: str, timeout: float = 5.0) -> dict[str, Any]:
    """Skip messages until one of ``type_`` arrives (presence, heartbeats...)."""
    with anyio.fail_after(timeout):
        while True:
            msg = json.loads(await ws.recv())
            if isinstance(msg, dict) and msg.get("type") == type_:
                return msg


async def send(ws: ClientConnection, **msg: Any) -> None:
    await ws.send(json.dumps(msg))


async def auth(ws: ClientConnection, token: str, **extra: Any) -> dict[str, Any]:
    await send(ws, type="auth", token=token, **extra)
    msg = await recv(ws)
    assert msg["type"] == "auth_ok", msg
    return msg


async def authed(stack: contextlib.AsyncExitStack, base: str, tokens: list[str], *, max_queue: int) -> list[ClientConnection]:
    """One connection per token, each authenticated, closed with ``stack``."""
    sockets = [await stack.enter_async_context(connect(base, max_queue=max_queue)) for _ in tokens]
    for ws, token in zip(sockets, tokens, strict=True):
        await auth(ws, token)
    return sockets


async def join(ws: ClientConnection, job_id: str, since: str | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {"type": "join", "roomId": f"job:{job_id}"}
    if since:
        payload["since"] = since
    await ws.send(json.dumps(payload))
    msg = await recv_type(ws, "joined")
    return msg


async def closed_with(ws: ClientConnection, timeout: float = 5.0) -> tuple[int | None, str | None]:
    """Read until the server closes; the close code and reason."""
    with anyio.fail_after(timeout):
        try:
            while True:
                await ws.recv()
        except websockets.ConnectionClosed:
            pass
    rcvd = ws.protocol.close_rcvd
    return (rcvd.code, rcvd.reason) if rcvd else (None, None)


async def collect_events(ws: ClientConnection, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The next ``count`` room items (event/chat), skipping other messages; arrays are unpacked."""
    out: list[dict[str, Any]] = []
    with anyio.fail_after(timeout):
        while len(out) < count:
            msg = json.loads(await ws.recv())
            for m in msg if isinstance(msg, list) else [msg]:
                if m.get("type") in ("event", "chat"):
                    out.append(m)
    return out


def serve(
    settings: Any, *, port: int | None = None, chat_hook: Any = None, ws: Any = None
) -> contextlib.AbstractAsyncContextManager[tuple[str, Any]]:
    """The real app on uvicorn without a worker, yielding ``(base_url, app)``.

    ``chat_hook(resources)`` makes the gateway's chat hook (None from it: no hook);
    ``ws`` is uvicorn's WebSocket protocol (None: the server's own).
    """
    return run_app(settings, run_worker=False, port=port, chat_hook=chat_hook, ws=ws)


class FakeComments:
    """A stand-in for the comments module: appends the chat to the job stream.

    (The real module also stores it durably first; the gateway's part is the
    hand-off, the ack and the broadcast through the hub.)
    """

    def __init__(self, redis: Any, *, fail: bool = False) -> None:
        self.redis = redis
        self.fail = fail
        self.seen: dict[tuple[str, str, str], str] = {}

    async def post(self, principal: Any, room_id: str, job_id: str, request_id: str, text: str) -> str:
        from progress_service.events import StoredChat  # noqa: PLC0415
        from progress_service.errors import CommentsUnavailable

        if self.fail:
            raise CommentsUnavailable
        key = (room_id, principal.user_id, request_id)
        if key not in self.seen:
            chat = StoredChat(requestId=request_id, userId=principal.user_id, userName=principal.user_name, text=text, sentAt=now_ms())
            self.seen[key] = await streams.append_chat(self.redis, job_id, chat, maxlen=10_000)
        return self.seen[key]
