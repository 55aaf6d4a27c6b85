"""A burst of 1,000 hook posts is absorbed without slowing the live watchers of another job.

The service runs as its own process (``progress-service serve``) and the
burst comes from a third one (``tests/hook_burst.py``), so neither shares
the watchers' event loop. 20 watchers follow a job whose events are
appended at 50/s; their publish-to-receipt latency is measured before and
during a burst of 1,000 hook posts (10 sessions on 20 connections, each
PostToolUse racing its PreToolUse). Every post must be answered 204, every
hook applied in order, and the watchers' latency must stay close to what it
was before. The figures are printed (``-s``); docs/performance.md records a run.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import uuid
from pathlib import Path

import anyio
import httpx
import pytest
from gateway_helpers import auth, connect, join, publish

from progress_service.keys import events_key
from hook_helpers import Session, events, steps

pytestmark = pytest.mark.slow

WATCHERS = 20
SESSIONS = 10
PER_SESSION = 100
BURST_CLIENT = Path(__file__).resolve().parent / "hook_burst.py"


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


async def test_a_burst_of_hooks_does_not_slow_live_watchers(store, make_settings, server_process, redis) -> None:
    settings = make_settings(hook_rate=10_000, hook_burst=10_000)
    reporter = await store.token(role="reporter", team="t1")
    viewer = await store.token(role="viewer", team="t1")
    job_id = await store.job(team="t1")
    server = server_process(settings)
    sessions = [Session(str(uuid.uuid4())) for _ in range(SESSIONS)]

    latencies: dict[str, list[float]] = {"before": [], "during": []}
    phase = {"now": "warmup"}

    async def watcher(ready: anyio.Event) -> None:
        async with connect(server.url, max_queue=None) as ws:
            await auth(ws, viewer)
            await join(ws, job_id)
            ready.set()
            async for raw in ws:
                now = time.time() * 1000
                msgs = json.loads(raw)
                for m in msgs if isinstance(msgs, list) else [msgs]:
                    if m.get("type") == "event" and phase["now"] in latencies:
                        latencies[phase["now"]].append(now - m["at"])

    async def publisher() -> None:
        n = 0
        while True:
            await publish(redis, job_id, 1, start=n)
            n += 1
            await anyio.sleep(0.02)

    async with anyio.create_task_group() as tg:
        readies = [anyio.Event() for _ in range(WATCHERS)]
        for ready in readies:
            tg.start_soon(watcher, ready)
        with anyio.fail_after(20):
            for ready in readies:
                await ready.wait()
        tg.start_soon(publisher)
        await anyio.sleep(0.5)
        phase["now"] = "before"
        await anyio.sleep(3)
        phase["now"] = "during"
        done = await anyio.run_process(
            [sys.executable, str(BURST_CLIENT), str(server.port), reporter, str(SESSIONS), str(PER_SESSION),
             ",".join(s.session_id for s in sessions)],
        )
        figures = json.loads(done.stdout)
        burst_ended = time.perf_counter()
        # Applied: every session's stream holds every tool call started and
        # ended (read from Redis: polling the API would load the server).
        expected = 2 * ((PER_SESSION - 2) // 2)
        with anyio.fail_after(60):
            for s in sessions:
                while sum(b'"kind":"step"' in f[b"b"] for _, f in await redis.xrange(events_key(s.job_id))) < expected:
                    await anyio.sleep(0.05)
        # How long after the last answer the last hook was in its room.
        figures["applied_after_last_answer_s"] = round(time.perf_counter() - burst_ended, 2)
        phase["now"] = "after"
        async with httpx.AsyncClient(base_url=server.url) as client:
            admin = await store.token(role="admin", team="t1")
            for s in sessions:
                found = steps(await events(client, admin, s.job_id))
                assert sorted(found) == sorted((f"toolu_{i}", st) for i in range(expected // 2) for st in ("started", "ok"))
            # The server's own answer time (auth, decode, claim, queue), from its histogram.
            metrics = (await client.get("/metrics")).text
            buckets = {
                line.split('le="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith("ps_hook_request_seconds_bucket")
            }
            total = buckets["+Inf"]
            figures["server_answer_within_1ms"] = round(buckets["0.001"] / total, 3)
            figures["server_answer_within_5ms"] = round(buckets["0.005"] / total, 3)
            figures["server_answer_within_100ms"] = round(buckets["0.1"] / total, 3)
        phase["now"] = "after"
        tg.cancel_scope.cancel()

    before, during = latencies["before"], latencies["during"]
    figures.update(
        watch_p50_before_ms=round(statistics.median(before), 1),
        watch_p99_before_ms=round(pct(before, 0.99), 1),
        watch_p50_during_ms=round(statistics.median(during), 1),
        watch_p99_during_ms=round(pct(during, 0.99), 1),
        watch_events_during=len(during),
    )
    print("HOOK BURST", json.dumps(figures))
    assert figures["codes"] == {"204": SESSIONS * PER_SESSION}
    # The figures are the benchmark's (docs/performance.md); the bound only
    # catches hooks that queue behind each other (0.988 was seen with both
    # cores saturated by other runs).
    assert figures["server_answer_within_100ms"] >= 0.9
    assert len(during) > WATCHERS * 10, "the watchers got next to nothing during the burst"
    # Watchers keep up: a bound that holds on a loaded 2-core box; the measured figures are far lower.
    assert pct(during, 0.99) < pct(before, 0.99) + 150
