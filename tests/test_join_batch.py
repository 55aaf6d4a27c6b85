"""Joins share one Redis MULTI per batch (gateway.joins.JoinReads): each still gets its own answer."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest
from gateway_helpers import authed, collect_events, join, publish, serve

FAST = {"ws_auth_timeout": 2.0, "presence_grace": 0.3}


@pytest.fixture
def settings(make_settings: Callable[..., Any]) -> Callable[..., Any]:
    return lambda **kw: make_settings(**{**FAST, **kw})


async def test_concurrent_joins_each_get_their_room(settings, store, redis) -> None:
    """Many joins in flight at once (one batch): every client gets its own room, head and presence."""
    async with serve(settings()) as (base, _app):
        jobs = [await store.job() for _ in range(3)]
        heads = {job: (await publish(redis, job, 2 + i))[-1] for i, job in enumerate(jobs)}
        tokens = [await store.token(user=f"u{i}") for i in range(12)]
        async with AsyncExitStack() as stack:
            # room for every presence message of the others (a full queue stalls the close)
            sockets = await authed(stack, base, tokens, max_queue=64)
            answers: dict[int, dict[str, Any]] = {}

            async def one(i: int) -> None:
                answers[i] = await join(sockets[i], jobs[i % 3], since="0-0" if i % 2 else None)

            async with anyio.create_task_group() as tg:
                for i in range(len(sockets)):
                    tg.start_soon(one, i)
            for i, answer in answers.items():
                job = jobs[i % 3]
                assert answer["roomId"] == f"job:{job}" and answer["head"] == heads[job]
                assert answer["snapshot"]["id"] == job
                assert f"u{i}" in {p["userName"] for p in answer["presence"]}


async def test_a_join_storm_into_one_room_replays_every_event_once_while_it_grows(settings, store, redis) -> None:
    """Joins of one room at once share their replay reads (gateway.single_flight); none misses or repeats an event.

    Events are appended during the storm, so some shared reads answer from
    before a member's registration: its check against the hub's position
    must send it back for the rest.
    """
    async with serve(settings()) as (base, _app):
        job = await store.job()
        ids = await publish(redis, job, 30)
        tokens = [await store.token(user=f"u{i}") for i in range(20)]
        async with AsyncExitStack() as stack:
            sockets = await authed(stack, base, tokens, max_queue=64)
            seen: dict[int, list[str]] = {}

            async def watch(i: int) -> None:
                await join(sockets[i], job)
                seen[i] = [e["id"] for e in await collect_events(sockets[i], 60, timeout=30)]

            async def grow() -> None:
                for n in range(30, 60):
                    ids.extend(await publish(redis, job, 1, start=n))
                    await anyio.sleep(0.002)

            async with anyio.create_task_group() as tg:
                tg.start_soon(grow)
                for i in range(len(sockets)):
                    tg.start_soon(watch, i)
            assert len(ids) == 60
            for i in range(len(sockets)):
                assert seen[i] == ids, f"watcher {i}"
