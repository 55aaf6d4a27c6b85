"""Control-path faults against real processes: `serve` + `worker` subprocesses, a private Redis.

Each test runs the real `progress-service serve` and `progress-service
worker` commands on a redis-server of its own (killed and restarted at will,
never the shared one) and a fresh SQLite store, submits and cancels jobs
over HTTP, and checks the outcome in the store and the job's Redis stream.
Jobs run the replay program (or a small CLI stand-in that plants a setsid'ed
grandchild) at a speed that keeps every test short.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from progress_service.embedded_redis import free_port, redis_binary, wait_for_port
from progress_service.keys import events_key
from progress_service.store.db import create_engine
from progress_service.store.jobs import JobRecord, get_job


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


class PrivateRedis:
    """A redis-server of this test only, with AOF (fsync always), killable and restartable on its port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="ps-redis-faults-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes", "--appendfsync", "always", "--dir", self.dir]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", self.port)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final AOF rewrite."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    r = PrivateRedis()
    r.start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
async def client(private_redis: PrivateRedis) -> AsyncIterator[Any]:
    from redis.asyncio import Redis  # noqa: PLC0415

    c = Redis.from_url(private_redis.url)
    try:
        yield c
    finally:
        await c.aclose()


@pytest.fixture
async def store_engine(store_url: str) -> AsyncIterator[Any]:
    eng = create_engine(store_url)
    try:
        yield eng
    finally:
        await eng.dispose()


class Cluster:
    """One `serve` and any number of `worker` processes sharing a private Redis and the test's store."""

    def __init__(self, server_process: Callable[..., Any], settings: Any, token: str) -> None:
        self.server_process = server_process
        self.settings = settings
        self.app = server_process(settings, command="serve")
        self.http = httpx.AsyncClient(base_url=self.app.url, headers={"Authorization": f"Bearer {token}"}, timeout=10)

    def worker(self, **overrides: str) -> Any:
        return self.server_process(self.settings, command="worker", extra_env=overrides)

    async def submit(self, prompt: str = "refactor [long]", **spec: Any) -> str:
        resp = await self.http.post("/api/jobs", json={"prompt": prompt, **spec})
        assert resp.status_code == 201, resp.text
        return resp.json()["id"]

    async def cancel(self, job_id: str) -> None:
        resp = await self.http.post(f"/api/jobs/{job_id}/cancel")
        assert resp.status_code == 202, resp.text


@pytest.fixture
async def cluster(
    private_redis: PrivateRedis, server_process: Callable[..., Any], make_settings: Callable[..., Any],
    make_token: Callable[..., Any],
) -> AsyncIterator[Callable[..., Any]]:
    # private_redis comes first: it is torn down after the processes that use it.
    made: list[Cluster] = []

    async def make(**overrides: Any) -> Cluster:
        base = {"redis_url": private_redis.url, "replay_speed": 4.0, "cancel_grace": 2.0, "log_level": "info"}
        settings = make_settings(**{**base, **overrides})
        c = Cluster(server_process, settings, await make_token(role="submitter", team="faults"))
        made.append(c)
        return c

    yield make
    for c in made:
        await c.http.aclose()


async def events(redis: Any, job_id: str) -> list[dict[str, Any]]:
    return [json.loads(fields[b"b"]) for _, fields in await redis.xrange(events_key(job_id))]


async def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll an async predicate until it returns something truthy, within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await anyio.sleep(0.05)


async def record_in(engine: Any, job_id: str, *statuses: str) -> JobRecord | None:
    record = await get_job(engine, job_id)
    return record if record is not None and record.status in statuses else None


async def stepping(redis: Any, job_id: str) -> bool:
    return any(e["kind"] == "step" for e in await events(redis, job_id))


def statuses(evs: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(e["data"]["status"], e.get("attempt", 1)) for e in evs if e["kind"] == "status"]


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")


# A CLI stand-in whose first act is to plant a daemon the way a Bash tool's
# shell escapes: fork, setsid, fork again, the middle process exits, so the
# sleeper is in no process group or tree of the CLI. Then it plays the long
# transcript like the real CLI (SIGINT included).
ESCAPING_CLI = """
import os, sys
pid = os.fork()
if pid == 0:
    os.setsid()
    if os.fork() == 0:
        # Keeps the CLI's stdout open: the job only sees EOF once it is dead.
        os.execvp("sleep", ["sleep", "300"])
    os._exit(0)
os.waitpid(pid, 0)
os.environ["PS_REPLAY_TRANSCRIPT"] = "long"
os.execv(sys.executable, [sys.executable, "-m", "worker.replay", *sys.argv[1:]])
"""


def escaped_sleepers(tag_file_dir: Path) -> list[int]:
    """Sleepers started by ESCAPING_CLI in a job directory under ``tag_file_dir`` (by cwd)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if cmd.startswith(b"sleep\x00300") and cwd.startswith(str(tag_file_dir)) and pid_alive(int(entry)):
            found.append(int(entry))
    return found


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------


async def test_cancels_at_random_moments_run_nothing_twice(cluster: Any, client: Any, store_engine: Any) -> None:
    """20 jobs on two workers, each cancelled at a random moment: 20 cancelled, 0 second attempts, cost kept."""
    c = await cluster(worker_concurrency=10, replay_speed=8.0)
    c.worker()
    c.worker()
    rng = random.Random(9)
    jobs = [await c.submit(f"job {n} [long]") for n in range(20)]

    async def started(job_id: str) -> bool:
        return any(e["kind"] == "status" and e["data"]["status"] == "running" for e in await events(client, job_id))

    async def cancel_later(n: int, job_id: str) -> None:
        # A random moment of the run. A quarter are cancelled as soon as they
        # are running (the CLI may not have printed anything yet); the rest
        # once the CLI is printing steps, so they end with its last line.
        # Waiting on the job's own progress, not on a clock, keeps the mix the
        # same on a busy machine.
        if n % 4 == 0:
            await wait_for(lambda: started(job_id), 60, f"job {job_id} to start")
        else:
            await wait_for(lambda: stepping(client, job_id), 60, f"job {job_id} to print a step")
        await anyio.sleep(rng.uniform(0.0, 2.0))
        await c.cancel(job_id)

    async with anyio.create_task_group() as tg:
        for n, job_id in enumerate(jobs):
            tg.start_soon(cancel_later, n, job_id)

    async def all_ended() -> bool:
        return all([await record_in(store_engine, j, "cancelled", "succeeded", "failed") for j in jobs])

    await wait_for(all_ended, 40, "20 cancelled jobs")
    with_cost = 0
    for job_id in jobs:
        record = await get_job(store_engine, job_id)
        assert record is not None and record.status == "cancelled", (job_id, record and record.status)
        evs = await events(client, job_id)
        assert all(e.get("attempt", 1) == 1 for e in evs), statuses(evs)
        assert [s for s, _ in statuses(evs)].count("running") <= 1
        results = [e for e in evs if e["kind"] == "result"]
        if results:  # the CLI printed its last result: its cost is the job's
            assert "error_during_execution" in (results[-1]["data"].get("error") or "")
            assert record.cost_usd == pytest.approx(results[-1]["data"]["costUsd"])
            with_cost += record.cost_usd > 0
    # Those cancelled after the CLI got going read its last line, with a cost.
    print(f"20 cancels: {with_cost} with the CLI's final cost recorded")
    assert with_cost >= 15
    # Nothing is queued again anywhere.
    assert await client.zcard(c.settings.queue_name) == 0


async def test_escaped_grandchild_gone_after_cancel_timeout_and_worker_stop(
    cluster: Any, client: Any, store_engine: Any, tmp_path: Path
) -> None:
    cli = tmp_path / "escaping-cli.py"
    cli.write_text(f"#!{sys.executable}\n" + textwrap.dedent(ESCAPING_CLI))
    cli.chmod(0o755)
    c = await cluster(claude_bin=str(cli), job_max_tries=1)
    worker = c.worker()
    root = c.settings.workspace_path

    async def planted() -> list[int]:
        return escaped_sleepers(root)

    # Cancel.
    job = await c.submit("cancel me")
    await wait_for(lambda: stepping(client, job), 20, "the job to run")
    (sleeper,) = await wait_for(planted, 10, "the escaped sleeper")
    await c.cancel(job)
    await wait_for(lambda: record_in(store_engine, job, "cancelled"), 20, "cancelled")
    assert not pid_alive(sleeper) and not escaped_sleepers(root)

    # Timeout.
    job = await c.submit("time me out", timeoutSeconds=2)
    (sleeper,) = await wait_for(planted, 20, "the escaped sleeper")
    record = await wait_for(lambda: record_in(store_engine, job, "failed"), 20, "timed out")
    assert record.reason == "timed out after 2s"
    assert not pid_alive(sleeper) and not escaped_sleepers(root)

    # Worker stop (SIGTERM): the job is handed back, the sleeper is gone.
    job = await c.submit("stop the worker under me")
    (sleeper,) = await wait_for(planted, 20, "the escaped sleeper")
    assert worker.stop(signal.SIGTERM) == 0
    assert not pid_alive(sleeper) and not escaped_sleepers(root)
    record = await get_job(store_engine, job)
    assert record is not None and record.status == "queued" and record.attempt == 2


async def test_worker_killed_with_no_worker_left_is_recovered_by_the_app(
    cluster: Any, client: Any, store_engine: Any
) -> None:
    """SIGKILL the only worker: the app's sweeper re-queues the job within the lease time plus its grace."""
    c = await cluster(lease_ttl=2.0, lease_grace=1.0, job_max_tries=2, replay_speed=16.0)
    worker = c.worker()
    job = await c.submit()
    await wait_for(lambda: stepping(client, job), 20, "the job to run")
    os.kill(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(timeout=10)
    killed = time.monotonic()
    record = await wait_for(lambda: record_in(store_engine, job, "queued", "failed"), 15, "recovery")
    took = time.monotonic() - killed
    assert record.status == "queued" and record.attempt == 2, record
    # lease 2 s + grace 1 s + one sweep interval (0.7 s) + publishing, with room for a busy machine
    print(f"worker SIGKILLed: job re-queued by the app after {took:.1f} s")
    assert took < 2.0 + 1.0 + 5.0, took
    evs = await events(client, job)
    assert [e["data"]["state"] for e in evs if e["kind"] == "worker"][-1] == "lost"
    # A worker that starts later runs the retry to its end.
    c.worker()
    record = await wait_for(lambda: record_in(store_engine, job, "succeeded", "failed"), 30, "the retry")
    assert record.status == "succeeded" and record.attempt == 2


async def test_rolling_restarts_spend_no_try(cluster: Any, client: Any, store_engine: Any) -> None:
    """With one try allowed, two graceful worker stops during one job still let it succeed."""
    c = await cluster(job_max_tries=1, replay_speed=12.0)
    job = await c.submit()
    for attempt in (1, 2):
        w = c.worker()

        async def running_attempt(n: int = attempt) -> bool:
            evs = await events(client, job)
            return any(e["kind"] == "step" and e.get("attempt", 1) == n for e in evs)

        await wait_for(running_attempt, 20, f"attempt {attempt} to run")
        assert w.stop(signal.SIGTERM) == 0
        record = await get_job(store_engine, job)
        assert record is not None and record.status == "queued" and record.attempt == attempt + 1
    c.worker()
    record = await wait_for(lambda: record_in(store_engine, job, "succeeded", "failed"), 30, "the last attempt")
    assert record.status == "succeeded" and record.attempt == 3
    got = statuses(await events(client, job))
    assert [s for s, _ in got] == ["queued", "running", "queued", "running", "queued", "running", "succeeded"]


async def test_redis_killed_or_emptied_mid_job_worker_survives_and_finishes(
    cluster: Any, private_redis: PrivateRedis, store_engine: Any
) -> None:
    """SIGKILL Redis mid-job and start it 3 s later, then empty it mid-job: the same worker finishes both.

    Emptied (FLUSHALL), Redis loses every lease while the worker is alive:
    the worker re-creates its lease and the app's sweeper, waiting out
    ``lease_grace``, does not declare it lost (with a grace of 0 it does).
    """
    c = await cluster(replay_speed=10.0, lease_ttl=2.0, lease_grace=4.0, job_max_tries=2)
    worker = c.worker()
    job = await c.submit()
    from redis.asyncio import Redis  # noqa: PLC0415

    probe = Redis.from_url(private_redis.url)
    try:
        await wait_for(lambda: stepping(probe, job), 20, "the job to run")
    finally:
        await probe.aclose()
    private_redis.kill()
    # Longer than the lease: it has expired when Redis is back, and the
    # live worker must re-create it before the app's sweeper acts.
    await anyio.sleep(3.0)
    private_redis.start()
    record = await wait_for(lambda: record_in(store_engine, job, "succeeded", "failed", "cancelled"), 40, "the end")
    assert record.status == "succeeded" and record.attempt == 1, (record.status, record.reason)
    assert worker.proc.poll() is None, "the worker process died"
    # The job saw the outage, said so once per part of it that met it, and
    # said when it was back. Which parts meet it depends on timing: the
    # lease loop waits on the publisher while that one keeps events, so on a
    # busy machine only the publisher may notice. The end is archived while
    # Redis may still be coming back, so "back" can follow the row: wait for it.
    down = {
        "lease": (f"Redis (job {job}) unavailable", f"Redis (job {job}) is back"),
        "publisher": (f"job {job}: Redis unavailable", f"job {job}: Redis is back"),
        "inbox": (f"Redis (job {job} inbox) unavailable", f"Redis (job {job} inbox) is back"),
    }

    async def all_back() -> bool:
        text = worker.log.read_text()
        return all(back in text for gone, back in down.values() if gone in text)

    await wait_for(all_back, 20, "each part of the job that saw the outage to say Redis is back")
    log = worker.log.read_text()
    noticed = [part for part, (gone, _back) in down.items() if gone in log]
    assert noticed, log[-3000:]
    for part in noticed:
        gone, back = down[part]
        assert log.count(gone) == 1 and back in log, (part, log[-3000:])
    assert "Traceback" not in log, log[-3000:]

    job = await c.submit()
    probe = Redis.from_url(private_redis.url)
    try:
        await wait_for(lambda: stepping(probe, job), 20, "the second job to run")
        await probe.flushall()
    finally:
        await probe.aclose()
    record = await wait_for(lambda: record_in(store_engine, job, "succeeded", "failed", "cancelled"), 30, "the end")
    assert record.status == "succeeded" and record.attempt == 1, (record.status, record.reason)
    assert "re-created the lease" in worker.log.read_text()
    assert "worker lost" not in c.app.log.read_text()
    assert worker.proc.poll() is None

