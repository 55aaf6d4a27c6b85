"""Room-count and join-storm benchmarks of the hub, the broker and presence (issue 11).

``python -m bench.rooms reads [--rooms 1000,10000,50000] [--seconds 10] [--rate 20]``
    One gateway process's hub with N rooms (one small watcher each) on a
    private ``redis-server``; a publisher appends a few events per second
    to random rooms. Reports the broker's per-read Redis time, rooms named
    per read, and publish -> receipt p50/p99 (entry id time to the member's
    outbox), plus, for comparison, the time of one XREAD naming every room
    (what the old single reader sent on each read).

``python -m bench.rooms joins [--joins 5000]``
    The Redis side of a join storm (the join MULTIs of ``JoinReads`` with
    the presence join script): N joins of distinct users into one room, vs
    N joins into N rooms.

Prints one JSON line per measurement. Measurement, not a test: run it on a
quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
import uuid
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis

from progress_service import streams
from progress_service.embedded_redis import free_port
from progress_service.events import StoredEvent
from progress_service.ids import now_ms
from progress_service.gateway.hub import Hub, Member
from progress_service.gateway.joins import JoinReads
from progress_service.gateway.outbox import Chunk
from progress_service.gateway.presence import Presence
from progress_service.keys import events_key, presence_stream_key
from progress_service.store.identity import Principal


@contextlib.asynccontextmanager
async def private_redis() -> AsyncIterator[str]:
    """A redis-server (the one on PATH: Redis 7 for sharded pub/sub) on a free port, killed by pid."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not on PATH")
    port = free_port()
    directory = tempfile.mkdtemp(prefix="ps-bench-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", directory],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = Redis.from_url(url)
        for _ in range(200):
            try:
                await client.ping()
                break
            except OSError:
                await asyncio.sleep(0.02)
            except Exception:  # noqa: BLE001 - still starting (connection refused)
                await asyncio.sleep(0.02)
        await client.aclose()
        yield url
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(directory, ignore_errors=True)


class Recorder:
    """Stands in for a member's outbox: keeps the receipt latency of every entry."""

    __slots__ = ("latencies",)

    def __init__(self, latencies: list[float]) -> None:
        self.latencies = latencies

    def in_step(self) -> bool:
        """Never: each read is timed as it reaches the member (no room broadcast to wait for)."""
        return False

    def put_chunk(self, chunk: Chunk) -> bool:
        now = time.time() * 1000
        for text in chunk.texts:
            at = text.index('"id":"') + 6
            self.latencies.append(now - int(text[at : text.index("-", at)]))
        return True


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


async def _wait(pred: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("bench: condition not reached")
        await asyncio.sleep(0.01)


async def reads(rooms: int, seconds: float, rate: float) -> dict[str, Any]:
    """One hub with ``rooms`` rooms; ``rate`` events/s overall for ``seconds``."""
    async with private_redis() as url:
        redis = Redis.from_url(url)
        services = types.SimpleNamespace(redis=redis, redis_url=url, engine=None)
        hub = Hub(services, "bench")  # type: ignore[arg-type]
        latencies: list[float] = []
        jobs = [uuid.uuid4().hex[:12] for _ in range(rooms)]
        t0 = time.perf_counter()
        for job in jobs:
            member = Member(Recorder(latencies))  # type: ignore[arg-type]
            member.live = True
            hub.add(job, member, head="0-0", presence_head="0-0")
        task = asyncio.create_task(hub.run())
        broker = hub.broker
        shard = next(iter(broker.shards.values()))  # type: ignore[attr-defined]
        # every subscription confirmed and its first read done
        await _wait(lambda: shard.subscribed >= rooms and not shard._dirty and not shard.reading, 120)
        subscribe_s = time.perf_counter() - t0
        base = broker.stats()
        before = (base.reads, base.seconds, base.rooms_read)
        pub = Redis.from_url(url)
        published = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            job = random.choice(jobs)
            await streams.append_event(pub, job, StoredEvent(kind="log", at=now_ms(), data={"line": "x"}), maxlen=100)
            published += 1
            await asyncio.sleep(1 / rate)
        await _wait(lambda: len(latencies) >= published, 10)
        after = broker.stats()
        n_reads = after.reads - before[0]
        # the old reader: one XREAD naming both streams of every room, on each read
        keys = [k for j in jobs for k in (events_key(j), presence_stream_key(j))]
        t1 = time.perf_counter()
        await redis.execute_command("XREAD", "COUNT", 500, "STREAMS", *keys, *(["0-0"] * len(keys)))
        full_xread_ms = (time.perf_counter() - t1) * 1000
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pub.aclose()
        await redis.aclose()
    return {
        "scenario": "rooms_reads",
        "rooms": rooms,
        "events": published,
        "reads": n_reads,
        "per_read_ms": round((after.seconds - before[1]) / max(1, n_reads) * 1000, 3),
        "rooms_per_read": round((after.rooms_read - before[2]) / max(1, n_reads), 2),
        "p50_ms": _pct(latencies, 0.5),
        "p99_ms": _pct(latencies, 0.99),
        "subscribe_all_s": round(subscribe_s, 2),
        "old_full_xread_ms": round(full_xread_ms, 2),
    }


def _principal(i: int) -> Principal:
    return Principal(user_id=f"u{i}", user_name=f"User {i}", team_id="t", team_name="t", role="viewer", token_id=f"k{i}")


async def joins(n: int, *, one_room: bool) -> dict[str, Any]:
    """``n`` joins of distinct users, all queued at once (a storm), into one room or ``n`` rooms."""
    async with private_redis() as url:
        redis = Redis.from_url(url)
        presence = Presence(redis, "bench", grace=10.0)
        await presence.load_scripts()
        reads_ = JoinReads(redis, presence)
        task = asyncio.create_task(reads_.run())
        room = uuid.uuid4().hex[:12]
        rooms = [room] * n if one_room else [uuid.uuid4().hex[:12] for _ in range(n)]
        t0 = time.perf_counter()
        # Like sessions, each join drops its reply once handled (the member
        # list goes into its `joined` message, then away): no future is kept.
        seen: list[int] = []
        done = asyncio.Event()

        def handled(f: asyncio.Future[Any]) -> None:
            seen.append(f.result()[1][-1][2])
            if len(seen) == n:
                done.set()

        for i in range(n):
            reads_.read(rooms[i], None, f"c{i}", _principal(i)).add_done_callback(handled)
        await done.wait()
        elapsed = time.perf_counter() - t0
        members = seen[-1]
        cmdstats = await redis.info("commandstats")
        script = cmdstats.get("cmdstat_evalsha", {})
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await redis.aclose()
    return {
        "scenario": "joins_one_room" if one_room else "joins_many_rooms",
        "joins": n,
        "seconds": round(elapsed, 3),
        "joins_per_s": round(n / elapsed),
        "members_seen_by_last": members,
        "redis_join_script_us": script.get("usec_per_call"),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m bench.rooms", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reads", help="per-read cost and publish -> receipt latency vs room count")
    r.add_argument("--rooms", default="1000,10000,50000")
    r.add_argument("--seconds", type=float, default=10.0)
    r.add_argument("--rate", type=float, default=20.0, help="events per second, all rooms together")
    j = sub.add_parser("joins", help="a join storm into one room vs into as many rooms")
    j.add_argument("--joins", type=int, default=5000)
    args = parser.parse_args(argv)
    if args.cmd == "reads":
        for n in (int(x) for x in args.rooms.split(",")):
            print(json.dumps(asyncio.run(reads(n, args.seconds, args.rate))), flush=True)
    else:
        for one in (True, False):
            print(json.dumps(asyncio.run(joins(args.joins, one_room=one))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
