"""A room's presence changes go out at once when it is quiet, one window's worth per member in a burst (hub.PRESENCE_WINDOW), and none is lost to a member registering late."""

from __future__ import annotations

import json
import types
from contextlib import AsyncExitStack
from typing import Any

import anyio
from gateway_helpers import auth, authed, connect, join, serve
from redis.asyncio import Redis

from progress_service.gateway.hub import PRESENCE_WINDOW, Hub, Member
from progress_service.gateway.outbox import Chunk


class _Chunks:
    """Stands in for a member's outbox: keeps the chunks handed to it."""

    def __init__(self) -> None:
        self.chunks: list[list[dict[str, Any]]] = []

    def put_chunk(self, chunk: Chunk) -> bool:
        self.chunks.append([json.loads(t) for t in chunk.texts])
        return True


def _answer(n: int, first: int) -> list[Any]:
    """A presence-log XREAD answer: ``n`` joins, ids from ``first``."""
    return [
        (f"{first + i}-0".encode(), [b"j", json.dumps({"userId": f"u{first + i}", "userName": f"U{first + i}"}).encode()])
        for i in range(n)
    ]


async def test_a_burst_is_one_chunk_per_window_and_a_quiet_change_goes_at_once(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    try:
        hub = Hub(types.SimpleNamespace(redis=redis, redis_url=redis_url, engine=None), "t")  # type: ignore[arg-type]
        old, late = _Chunks(), _Chunks()
        hub.add("job", Member(old, presence_after=(0, 0)), head=None, presence_head=None)  # type: ignore[arg-type]
        room = hub.rooms["job"]
        hub._fan_out_presence(room, _answer(1, 1))  # quiet room: out at once
        assert [[m["joined"][0]["userId"] for m in c] for c in old.chunks] == [["u1"]]
        hub._fan_out_presence(room, _answer(2, 2))  # within the window: queued
        hub._fan_out_presence(room, _answer(3, 4))
        # A member joining meanwhile already has changes up to 4-0 in its `joined`.
        hub.add("job", Member(late, presence_after=(4, 0)), head=None, presence_head=None)  # type: ignore[arg-type]
        assert len(old.chunks) == 1 and late.chunks == []
        with anyio.fail_after(5 + PRESENCE_WINDOW * 10):
            while len(old.chunks) < 2:
                await anyio.sleep(PRESENCE_WINDOW / 5)
        # The window's five changes in one chunk; the late member gets only what followed its join.
        assert [m["joined"][0]["userId"] for m in old.chunks[1]] == ["u2", "u3", "u4", "u5", "u6"]
        assert [[m["joined"][0]["userId"] for m in c] for c in late.chunks] == [["u5", "u6"]]
        # A member whose join read the log at 1-0 but that registers only now (its
        # join awaited the store meanwhile): the changes that went out since are its at once.
        slow = _Chunks()
        hub.add("job", Member(slow, presence_after=(1, 0)), head=None, presence_head=None)  # type: ignore[arg-type]
        assert [[m["joined"][0]["userId"] for m in c] for c in slow.chunks] == [["u2", "u3", "u4", "u5", "u6"]]
        hub.remove("job", next(m for m in hub.rooms["job"].members.values() if m.outbox is slow))
        hub.remove("job", next(iter(hub.rooms["job"].members.values())))
        hub.remove("job", next(iter(hub.rooms["job"].members.values())))
        assert "job" not in hub.rooms and room.presence_timer is None  # the window went with the room
    finally:
        await redis.aclose()


async def test_a_join_storm_reaches_a_watcher_as_every_change_once(make_settings, store) -> None:
    """30 joins at once into one room: the watcher sees each user join exactly once, then each leave."""
    async with serve(make_settings(ws_auth_timeout=5.0, presence_grace=0.2)) as (base, _app):
        job = await store.job()
        watcher_token = await store.token(user="watcher")
        tokens = [await store.token(user=f"u{i}") for i in range(30)]
        async with connect(base, max_queue=256) as watcher:
            await auth(watcher, watcher_token, batch=True)
            await join(watcher, job)
            joins: list[str] = []
            leaves: list[str] = []
            async with AsyncExitStack() as stack:
                sockets = await authed(stack, base, tokens, max_queue=256)
                async with anyio.create_task_group() as tg:
                    for ws in sockets:
                        tg.start_soon(join, ws, job)
                with anyio.fail_after(20):
                    while len(joins) < 30:
                        for m in _items(await watcher.recv()):
                            if m.get("type") == "presence":
                                joins += [p["userName"] for p in m["joined"]]
            with anyio.fail_after(20):
                while len(leaves) < 30:
                    for m in _items(await watcher.recv()):
                        if m.get("type") == "presence":
                            joins += [p["userName"] for p in m["joined"]]
                            leaves += [p["userName"] for p in m["left"]]
            assert sorted(joins) == sorted(f"u{i}" for i in range(30))
            assert sorted(leaves) == sorted(joins)


def _items(frame: str | bytes) -> list[dict[str, Any]]:
    msg = json.loads(frame)
    return msg if isinstance(msg, list) else [msg]
