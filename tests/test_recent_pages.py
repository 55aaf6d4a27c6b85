"""Replay pages answer the room's later joins for a moment (gateway.recent_pages), and nothing is missed for it.

The unit tests run :class:`RecentPages` on a fake clock; the server test
joins one room again and again while it grows, on the real gateway, Redis
and store, and compares every watcher's events with the log.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio
from gateway_helpers import authed, collect_events, join, publish, serve

from progress_service.gateway.recent_pages import Page, RecentPages
from progress_service.state import started_services


def _page(n: int, tag: str = "e") -> Page:
    return Page([(f"{tag}{i}", f"text {i}", 6) for i in range(n)], full=False)


def test_a_page_answers_for_its_ttl_then_is_gone() -> None:
    now = [0.0]
    pages = RecentPages(1.0, 100, clock=lambda: now[0])
    page = _page(3)
    pages.put(("j", None), page)
    now[0] = 0.99
    assert pages.get(("j", None)) is page
    assert pages.get(("j", "e2")) is None and pages.get(("k", None)) is None
    now[0] = 1.0
    assert pages.get(("j", None)) is None and len(pages) == 0


def test_entries_are_bounded_oldest_first_and_a_newer_read_replaces_the_older() -> None:
    now = [0.0]
    pages = RecentPages(10.0, 10, clock=lambda: now[0])
    pages.put(("a", None), _page(4))
    pages.put(("b", None), _page(4))
    pages.put(("c", None), _page(4))  # 12 > 10: "a" goes
    assert pages.get(("a", None)) is None and pages.get(("b", None)) is not None
    newer = _page(2, "n")
    pages.put(("b", None), newer)
    assert pages.get(("b", None)) is newer and len(pages) == 2
    pages.put(("big", None), _page(11))  # larger than the bound: not kept, nothing dropped for it
    assert pages.get(("big", None)) is None and len(pages) == 2
    now[0] = 20.0
    pages.put(("d", None), _page(1))  # the expired ones go as a new one arrives
    assert len(pages) == 1


async def test_joins_one_after_another_share_a_page_and_each_sees_every_event_once(
    make_settings: Callable[..., Any], store: Any, redis: Any
) -> None:
    """Joins that do not overlap reuse the first one's page; events appended in between still reach each of them."""
    async with serve(make_settings()) as (base, app):
        hub = started_services(app).gateway.hub  # type: ignore[union-attr]
        reads = 0
        read_entries = hub._read_entries

        def counted(job_id: str, after: str | None) -> Any:
            nonlocal reads
            reads += 1
            return read_entries(job_id, after)

        hub._read_entries = counted  # counts the real reads (they still go to Redis and the store)
        job = await store.job()
        ids = await publish(redis, job, 20)
        async with AsyncExitStack() as stack:
            sockets = await authed(stack, base, [await store.token(user=f"u{i}") for i in range(8)], max_queue=256)
            for i, ws in enumerate(sockets):  # one after another: no read overlaps the next join
                await join(ws, job)
                if i % 2:
                    ids.extend(await publish(redis, job, 1, start=len(ids)))  # after the page that is reused
            total = len(ids)
            seen: dict[int, list[str]] = {}

            async def watch(i: int) -> None:
                seen[i] = [e["id"] for e in await collect_events(sockets[i], total, timeout=30)]

            async with anyio.create_task_group() as tg:
                for i in range(len(sockets)):
                    tg.start_soon(watch, i)
        for i in range(len(sockets)):
            assert seen[i] == ids, f"watcher {i}"
        assert reads < len(sockets)  # the page read for the first join answered later ones
