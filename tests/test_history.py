"""The SQL store is the job's system of record: history outlives Redis and restarts.

Real parts only: a private redis-server (the shared one is never flushed or
killed), the real app on uvicorn with its in-process worker running the
replay program, HTTP, WebSocket and SSE clients; ``dev`` as a subprocess.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from redis.asyncio import Redis

from history_helpers import (
    TERMINAL,
    PrivateRedis,
    client,
    http_events,
    ids,
    is_terminal,
    sse_items,
    submit,
    wait_status,
    wait_until,
    ws_items,
)
from progress_service.embedded_redis import dev_data_dir, free_port
from progress_service.ids import room_id
from progress_service.keys import events_key, snapshot_key
from progress_service.store import history as archive
from progress_service.store.db import create_engine
from progress_service.store.jobs import get_job
from servers import run_app

ROOT = Path(__file__).resolve().parent.parent


async def _archived(engine: Any, job_id: str) -> list[str]:
    return [eid.decode() for eid, _ in await archive.read_entries(engine, job_id, None, limit=100_000)]


async def _row_finished(engine: Any, job_id: str, timeout: float = 60) -> None:
    with anyio.fail_after(timeout):
        while True:
            record = await get_job(engine, job_id)
            if record is not None and record.status in TERMINAL:
                return
            await anyio.sleep(0.1)


async def test_redis_flushed_after_the_job_ended_serves_the_full_history(
    tmp_path: Path, make_settings: Any, make_token: Any
) -> None:
    with PrivateRedis(tmp_path / "redis") as rd:
        settings = make_settings(redis_url=rd.url, replay_speed=20.0)
        token = await make_token(role="admin")
        async with run_app(settings, run_worker=True) as (base, app), client(base, token) as http:
            engine = app.state.services.engine
            job = await submit(http, "[long] keep my history")
            await wait_status(http, job, ("running",))
            # A comment is part of the room's order too.
            r = await http.post(f"/api/jobs/{job}/comments", json={"text": "looks good"}, headers={"Idempotency-Key": "c1"})
            assert r.status_code in (200, 201), r.text
            await _row_finished(engine, job)
            before, gap = await http_events(http, job)
            assert not gap and is_terminal(before[-1])
            assert any(i["type"] == "chat" for i in before)
            assert len(before) > 500
            # The archive holds every event Redis held, in the same order.
            assert await _archived(engine, job) == ids(before)

            redis = Redis.from_url(rd.url)
            try:
                await redis.flushall()
            finally:
                await redis.aclose()

            after, gap = await http_events(http, job)
            assert not gap
            assert after == before  # same ids, same bodies, same order
            ws_all, gap = await ws_items(base, token, job, "0-0")
            assert not gap and ids(ws_all) == ids(before)
            sse_all, gap = await sse_items(http, job)
            assert not gap and ids(sse_all) == ids(before)
            # Resuming in the middle gets exactly the rest, on every path.
            mid = before[len(before) // 2]["id"]
            rest = ids(before[len(before) // 2 + 1 :])
            assert ids((await http_events(http, job, mid))[0]) == rest
            ws_rest, gap = await ws_items(base, token, job, mid)
            assert not gap and ids(ws_rest) == rest
            sse_rest, gap = await sse_items(http, job, mid)
            assert not gap and ids(sse_rest) == rest
            snap = (await http.get(f"/api/jobs/{job}")).json()
            assert snap["status"] == "succeeded"


async def test_retention_prunes_old_archives_and_says_gap(tmp_path: Path, make_settings: Any, make_token: Any) -> None:
    """PS_HISTORY_DAYS: a job that ended longer ago loses its archived events, and readers are told."""
    from progress_service import history

    with PrivateRedis(tmp_path / "redis") as rd:
        settings = make_settings(redis_url=rd.url, replay_speed=50.0, history_days=1)
        token = await make_token(role="admin")
        async with run_app(settings, run_worker=True) as (base, app), client(base, token) as http:
            engine = app.state.services.engine
            old, new = await submit(http, "[fail] old"), await submit(http, "[fail] new")
            await _row_finished(engine, old)
            await _row_finished(engine, new)
            assert await _archived(engine, old)
            from progress_service.store.jobs import update_job

            await update_job(engine, old, finished_at=int(time.time() * 1000) - 2 * 86_400_000)
            assert await history.prune_once(engine, settings) == 1
            assert await _archived(engine, old) == []
            assert await _archived(engine, new)
            redis = Redis.from_url(rd.url)
            try:
                await redis.flushall()
            finally:
                await redis.aclose()
            items, gap = await http_events(http, old)
            assert items == [] and gap
            items, gap = await http_events(http, new)
            assert items and not gap


def _dev(tmp: Path, port: int, token_db: str, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    env.update(
        PS_DATABASE_URL=token_db,
        PS_WORKSPACE_ROOT=str(tmp / "workspace"),
        PS_REPLAY_SPEED="6",
        PS_LOG_LEVEL="warning",
        PS_QUEUE_NAME=f"ps:queue:test-dev-{port}",
        PS_CANCEL_GRACE="1",
        PS_LEASE_TTL="3",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "progress_service.cli", "dev", "--host", "127.0.0.1", "--port", str(port)],
        cwd=str(ROOT), env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def _ready(base: str) -> bool:
    try:
        return httpx.get(base + "/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _stop(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal dev itself (as a service manager does); its embedded Redis is stopped by dev."""
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_dev_restart_keeps_every_event_of_finished_and_running_jobs(
    tmp_path: Path, make_token: Any, sig: int
) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path / 'progress.db'}"
    token = await make_token(role="admin", database_url=db)
    log = tmp_path / "dev.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _dev(tmp_path, port, db, log)
    try:
        wait_until(lambda: _ready(base), 60, f"dev not ready: {log.read_text()[-2000:]}")
        async with client(base, token) as http:
            done = await submit(http, "[fail] finishes before the restart")
            await wait_status(http, done, TERMINAL)
            running = await submit(http, "[long] runs across the restart")
            await wait_status(http, running, ("running",))
            with anyio.fail_after(30):
                while len((await http_events(http, running))[0]) < 50:
                    await anyio.sleep(0.1)
            done_before, _ = await http_events(http, done)
        _stop(proc, sig)
        seen_running, _ = await _read_store_events(db, running)
        assert len(seen_running) >= 50
        assert (tmp_path / "progress-redis").is_dir() and dev_data_dir(db) == tmp_path / "progress-redis"

        proc = _dev(tmp_path, port, db, log)
        wait_until(lambda: _ready(base), 60, f"dev not ready again: {log.read_text()[-2000:]}")
        async with client(base, token) as http:
            after, gap = await http_events(http, done)
            assert not gap and after == done_before
            await wait_status(http, running, TERMINAL, timeout=60)
            final, gap = await http_events(http, running)
            assert not gap
            # Every event written before the restart is still there, first, in order.
            assert ids(final)[: len(seen_running)] == seen_running
            assert is_terminal(final[-1]) and final[-1]["data"]["status"] == "succeeded"
            ws_all, gap = await ws_items(base, token, running, None)
            assert not gap and ids(ws_all) == ids(final)
    finally:
        _stop(proc, signal.SIGTERM)


async def _read_store_events(db: str, job_id: str) -> tuple[list[str], None]:
    engine = create_engine(db)
    try:
        return await _archived(engine, job_id), None
    finally:
        await engine.dispose()


async def _watch(base: str, token: str, job_id: str, out: list[dict[str, Any]], joined: anyio.Event) -> None:
    """A watcher as a real client writes it: join, read, and on a dropped socket rejoin with ``since``."""
    import json

    import websockets

    from gateway_helpers import auth, connect, join

    first = True
    while True:
        since = out[-1]["id"] if out else None
        try:
            async with connect(base, max_queue=64) as ws:
                await auth(ws, token)
                await join(ws, job_id, since)
                if first:
                    first = False
                    joined.set()
                while True:
                    msg = json.loads(await ws.recv())
                    for m in msg if isinstance(msg, list) else [msg]:
                        assert m.get("type") != "gap", m
                        if m.get("type") in ("event", "chat"):
                            out.append(m)
                            if is_terminal(m):
                                return
        except (OSError, websockets.ConnectionClosed, AssertionError) as exc:
            if isinstance(exc, AssertionError) and "gap" in str(exc):
                raise
            await anyio.sleep(0.2)  # the gateway refused or dropped us during the outage: rejoin


async def test_redis_killed_mid_job_every_watcher_sees_every_event_once(
    tmp_path: Path, make_settings: Any, make_token: Any, server_process: Any
) -> None:
    """SIGKILL the (AOF) Redis mid-job and start it again: the same worker ends the job, 20 watchers miss nothing."""
    rd = PrivateRedis(tmp_path / "redis")
    rd.start()
    try:
        settings = make_settings(redis_url=rd.url, replay_speed=5.0, lease_ttl=10.0)
        token = await make_token(role="admin")
        app = server_process(settings, "serve")
        worker = server_process(settings, "worker")
        async with client(app.url, token) as http:
            job = await submit(http, "[long] through a Redis crash")
            await wait_status(http, job, ("running",))
            seen: list[list[dict[str, Any]]] = [[] for _ in range(20)]
            async with anyio.create_task_group() as tg:
                for out in seen:
                    joined = anyio.Event()
                    tg.start_soon(_watch, app.url, token, job, out, joined)
                    with anyio.fail_after(10):
                        await joined.wait()
                with anyio.fail_after(30):
                    while min(len(o) for o in seen) < 100:
                        await anyio.sleep(0.05)
                rd.kill()
                await anyio.sleep(0.5)  # the outage itself
                rd.start()
                with anyio.fail_after(60):
                    while not all(o and is_terminal(o[-1]) for o in seen):
                        # fail fast when the worker gave the job up (a traceback, not a wait)
                        assert "run_job failed" not in worker.log.read_text(), worker.log.read_text()[-3000:]
                        await anyio.sleep(0.1)
            assert worker.proc.poll() is None, worker.log.read_text()[-3000:]
            final, gap = await http_events(http, job)
        engine = create_engine(settings.database_url)
        try:
            await _row_finished(engine, job)
            archived = await _archived(engine, job)
        finally:
            await engine.dispose()
        assert not gap and ids(final) == archived
        assert final[-1]["data"]["status"] == "succeeded"
        # One attempt, one worker: nobody declared it lost or ran it again.
        assert {e.get("attempt", 1) for e in final} == {1}
        workers = {e["data"]["workerId"] for e in final if e["kind"] == "worker"}
        assert len(workers) == 1 and not any(e["kind"] == "worker" and e["data"].get("state") == "lost" for e in final)
        for out in seen:
            assert ids(out) == archived  # every event, once, in order
    finally:
        rd.stop()


def json_id(line: str) -> str:
    import json  # noqa: PLC0415

    return str(json.loads(line)["id"])


async def _ws_after(base: str, token: str, job_id: str, since: str, want: int) -> tuple[list[dict[str, Any]], bool]:
    """Join with ``since`` and read ``want`` room items; and whether ``gap`` came."""
    import json  # noqa: PLC0415

    from gateway_helpers import auth, connect, join  # noqa: PLC0415

    items: list[dict[str, Any]] = []
    gap = False
    async with connect(base, max_queue=64) as ws:
        await auth(ws, token)
        await join(ws, job_id, since)
        with anyio.fail_after(30):
            while len(items) < want:
                msg = json.loads(await ws.recv())
                for m in msg if isinstance(msg, list) else [msg]:
                    gap = gap or m.get("type") == "gap"
                    if m.get("type") in ("event", "chat"):
                        items.append(m)
    return items, gap


async def test_nothing_leaves_redis_before_the_archive_holds_it(
    tmp_path: Path, make_settings: Any, make_token: Any, store_url: str, monkeypatch: Any
) -> None:
    """Issue 9's silent hole: a small PS_EVENTS_MAXLEN and an archive that has not written yet.

    The publisher's archive cadence is stretched (it archives only at the
    job's end), as a slow store would. Redis must keep every event until the
    archive holds it, and then keep PS_EVENTS_MAXLEN of them; HTTP pages, a
    WebSocket join with ``since`` and log.jsonl see every event once, in
    order, before and after the trim, without ``gap``.
    """
    from progress_service.events import JobSnapshot  # noqa: PLC0415
    from worker import publisher  # noqa: PLC0415
    from worker.mapping import Mapper  # noqa: PLC0415

    monkeypatch.setattr(publisher, "ARCHIVE_EVERY", 3600.0)
    monkeypatch.setattr(publisher, "ARCHIVE_BATCH", 1_000_000)
    settings = make_settings(events_maxlen=5, events_keep_seconds=0)
    token = await make_token(role="admin")
    lines = 300
    async with run_app(settings, run_worker=False) as (base, app), client(base, token) as http:
        job = await submit(http, "[long] no hole")  # queued: no worker runs it, this test publishes
        redis = app.state.services.redis
        key = events_key(job)
        engine = create_engine(store_url)  # the worker's own engine, as in production
        mapper = Mapper(JobSnapshot(id=job, roomId=room_id(job)))
        pub = publisher.Publisher(redis, job, 1, settings, mapper, engine=engine)

        def in_order(items: list[dict[str, Any]]) -> None:
            logs = [i["data"]["line"] for i in items if i.get("kind") == "log"]
            assert logs == [f"line {n}" for n in range(lines)]

        try:
            async with anyio.create_task_group() as tg:
                await tg.start(pub.run)
                for n in range(lines):
                    await pub(pub.mapper.log, "stderr", f"line {n}")
                assert pub.waiting == 0
                # Not archived, so not trimmed: the submit's event and every line.
                assert len(await _archived(engine, job)) == 1
                assert await redis.xlen(key) == lines + 1
                before, gap = await http_events(http, job)
                assert not gap and len(before) == lines + 1
                in_order(before[1:])
                since = before[10]["id"]
                joined, gap = await _ws_after(base, token, job, since, lines - 10)
                assert not gap and ids(joined) == ids(before[11:])

                # The end is archived at once, then the publisher trims.
                await pub(pub.mapper.status, "succeeded")
                await pub.close()
            everything = ids(before) + [(await redis.xrevrange(key, count=1))[0][0].decode()]
            assert await _archived(engine, job) == everything
            assert await redis.xlen(key) == settings.events_maxlen
            # Older entries now come from the archive, newer from Redis.
            after, gap = await http_events(http, job)
            assert not gap and ids(after) == everything
            joined, gap = await _ws_after(base, token, job, since, lines - 9)
            assert not gap and ids(joined) == everything[11:]
            r = await http.get(f"/api/jobs/{job}/log.jsonl")
            assert r.status_code == 200
            assert [json_id(line) for line in r.text.splitlines()] == everything
        finally:
            await engine.dispose()


async def test_a_live_watcher_behind_a_trim_gets_the_trimmed_entries_from_the_archive(
    make_settings: Any, make_token: Any
) -> None:
    """Entries trimmed from Redis before the gateway's reader got to them reach live watchers from the archive.

    One transaction appends five entries and trims the stream past the first
    three (as a publisher's trim does while a gateway lags), so the gateway's
    blocked read sees only the last two: their ``p`` links show the hole.
    """
    import json  # noqa: PLC0415

    import msgspec  # noqa: PLC0415

    from gateway_helpers import auth, connect, join, recv  # noqa: PLC0415
    from progress_service.events import StoredEvent  # noqa: PLC0415
    from progress_service.streams import NOTIFY  # noqa: PLC0415

    settings = make_settings()
    token = await make_token(role="submitter")
    async with run_app(settings, run_worker=False) as (base, app):
        async with client(base, token) as http:
            job_id = await submit(http, "a job nobody runs")  # stays queued: no worker
        engine = app.state.services.engine
        redis = Redis.from_url(settings.redis_url)
        try:
            async with connect(base, max_queue=64) as ws:
                await auth(ws, token)
                joined = await join(ws, job_id)
                head = joined["head"]
                seen: list[str] = []

                async def read_until(last: str) -> None:
                    with anyio.fail_after(30):
                        while last not in seen:
                            msg = await recv(ws, timeout=30)
                            for m in msg if isinstance(msg, list) else [msg]:
                                if m.get("type") == "event":
                                    seen.append(m["id"])

                # The replay (the submit event) is in: the watcher is live,
                # fed by the gateway's reader from here on.
                await read_until(head)
                ms = int(head.split("-")[0]) + 1
                new = [f"{ms}-{i}" for i in range(5)]
                bodies = [
                    msgspec.json.encode(StoredEvent(kind="log", at=ms, data={"stream": "stdout", "line": f"line {i}"}))
                    for i in range(5)
                ]
                await archive.archive(engine, job_id, [
                    archive.ArchivedEvent(new[i], "log", 1, bodies[i]) for i in range(3)
                ])
                key = events_key(job_id)
                async with redis.pipeline(transaction=True) as pipe:
                    prev = head
                    for eid, body in zip(new, bodies, strict=True):
                        pipe.xadd(key, {"t": b"event", "b": body, "p": prev.encode()}, id=eid)
                        prev = eid
                    pipe.hincrby(snapshot_key(job_id), "n", len(new))  # as the publisher's script counts
                    pipe.xtrim(key, minid=new[3], approximate=False)
                    pipe.eval(NOTIFY, 1, key)  # as every writer of a stream does (gateway/broker.py)
                    await pipe.execute()
                await read_until(new[-1])
                assert seen == [head, *new], json.dumps(seen)  # the join replays the submit event first
        finally:
            await redis.aclose()
