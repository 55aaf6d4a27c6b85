"""run_job end to end: the real worker, the replay program, Redis and the SQL store."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import msgspec
import pytest
from arq.connections import create_pool

from progress_service.events import JobSpec, JobSnapshot, StatusData, StoredEvent
from progress_service.ids import now_ms, room_id
from progress_service.jobs import cancel_job
from progress_service.keys import events_key, lease_key
from progress_service.queue import arq_redis_settings, claim_run, enqueue_job
from progress_service.settings import Settings
from progress_service.store.identity import ensure_team, ensure_user
from progress_service.store.jobs import create_job, get_job, update_job
from progress_service.streams import append_event, read_state
from worker.claude import group_members
from worker.jobs import new_worker_id, run_job
from worker.recovery import sweep_once
from worker.settings import build_worker

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


@pytest.fixture
def redis_url(redis_url: str) -> str:
    """The test Redis, on a database of its own.

    Other test sessions (and their workers) share Redis db 0 and the arq
    queue name; a worker of theirs would take our jobs and refuse them as
    unknown. A per-process database keeps these end-to-end runs apart.
    """
    parts = urlsplit(redis_url)
    if parts.scheme not in ("redis", "rediss"):
        return redis_url
    return urlunsplit(parts._replace(path=f"/{1 + os.getpid() % 15}"))


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Any]:
    from redis.asyncio import Redis  # noqa: PLC0415

    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def arq_pool(redis_url: str) -> AsyncIterator[Any]:
    pool = await create_pool(arq_redis_settings(redis_url))
    try:
        yield pool
    finally:
        await pool.aclose()


@pytest.fixture
def worker_ctx(engine: Any, arq_pool: Any) -> Callable[[Settings], dict[str, Any]]:
    def make(settings: Settings) -> dict[str, Any]:
        return {"settings": settings, "engine": engine, "redis": arq_pool, "worker_id": new_worker_id()}

    return make


async def new_job(engine: Any, redis: Any, settings: Settings, prompt: str = "fix it", **spec: Any) -> str:
    """A queued job as the API creates it (row, snapshot, queued event)."""
    job_id = uuid.uuid4().hex[:16]
    team = await ensure_team(engine, "team-w")
    user = await ensure_user(engine, "user-w")
    created = now_ms()
    await create_job(
        engine, job_id=job_id, team_id=team, user_id=user, spec=JobSpec(prompt=prompt, **spec),
        created_at=created, demo=False,
    )
    snapshot = JobSnapshot(id=job_id, roomId=room_id(job_id), prompt=prompt, createdAt=created)
    event = StoredEvent(kind="status", at=created, data=msgspec.to_builtins(StatusData(status="queued", phase="queued")))
    await append_event(redis, job_id, event, maxlen=settings.events_maxlen, snapshot=snapshot)
    return job_id


async def events(redis: Any, job_id: str) -> list[dict[str, Any]]:
    entries = await redis.xrange(events_key(job_id))
    return [json.loads(fields[b"b"]) for _, fields in entries]


async def wait_for(predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Poll an async predicate until it returns something truthy."""
    with anyio.fail_after(timeout):
        while True:
            value = await predicate()
            if value:
                return value
            await anyio.sleep(0.02)


async def run_worker(worker: Any) -> None:
    """Run an in-process arq worker until ``worker.close()``.

    ``close()`` cancels arq's main task natively; that CancelledError is the
    worker's normal end, not a cancellation of the surrounding task group
    (letting it through would cancel ``close()`` itself half-way).
    """
    try:
        await worker.async_run()
    except asyncio.CancelledError:
        pass


def fake_cli(path: Path, body: str) -> str:
    """A Python script usable as PS_CLAUDE_BIN."""
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")


# --------------------------------------------------------------------------
# outcomes
# --------------------------------------------------------------------------


async def test_success_end_to_end(
    engine: Any, redis: Any, make_settings: Any, worker_ctx: Any, db_url: str, redis_url: str
) -> None:
    settings = make_settings(database_url=db_url)
    assert settings.redis_url == redis_url  # the module's own Redis database
    (settings.workspace_path / "proj").mkdir()
    job_id = await new_job(engine, redis, settings, "add a feature", workdir="proj", model="claude-x")
    assert await run_job(worker_ctx(settings), job_id) == "succeeded"

    evs = await events(redis, job_id)
    ks = [e["kind"] for e in evs]
    assert ks[:4] == ["status", "status", "phase", "worker"]
    assert [e["data"]["status"] for e in evs if e["kind"] == "status"] == ["queued", "running", "succeeded"]
    assert ks[-3:] == ["usage", "result", "status"]
    assert {"step", "todo", "message"} <= set(ks)
    assert all(e.get("attempt", 1) == 1 for e in evs) and evs[3]["data"]["state"] == "alive"
    done = [e["data"]["done"] for e in evs if e["kind"] == "todo"]
    assert done == sorted(done) and done[0] == 0 and done[-1] == 3  # the recorded session's three to-dos
    # The replay ran in the job's directory, inside the workspace.
    assert (settings.workspace_path / "proj").is_dir()

    record = await get_job(engine, job_id)
    assert record is not None and record.status == "succeeded" and record.phase == "finishing"
    recorded = json.loads((ROOT / "worker/transcripts/success.jsonl").read_text().splitlines()[-1])["j"]
    assert record.result is not None and record.result.ok and record.cost_usd == recorded["total_cost_usd"]
    assert record.started_at and record.finished_at and record.finished_at >= record.started_at
    snap, head = await read_state(redis, job_id)
    assert snap is not None and snap.status == "succeeded" and snap.progress.done == snap.progress.total == 3
    assert snap.demo and snap.model == "claude-x" and snap.step is None
    assert await redis.ttl(events_key(job_id)) > 0  # expires after events_ttl


@pytest.mark.parametrize(
    ("prompt", "reason"),
    [("break [fail]", "Overloaded"), ("loop [max-turns]", "error_max_turns")],
)
async def test_error_results_fail_the_job(
    engine: Any, redis: Any, make_settings: Any, worker_ctx: Any, prompt: str, reason: str
) -> None:
    settings = make_settings()
    job_id = await new_job(engine, redis, settings, prompt)
    assert await run_job(worker_ctx(settings), job_id) == "failed"
    record = await get_job(engine, job_id)
    assert record is not None and record.status == "failed" and reason in (record.reason or "")
    assert record.result is not None and not record.result.ok
    evs = await events(redis, job_id)
    assert [e["kind"] for e in evs][-2:] == ["result", "status"]


async def test_exit_without_result_garbage_and_stderr(
    engine: Any, redis: Any, make_settings: Any, worker_ctx: Any, tmp_path: Path
) -> None:
    cli = fake_cli(
        tmp_path / "cli.py",
        """
        import sys
        print("this is not json", flush=True)
        print('{"type":"system","subtype":"init","session_id":"s"}', flush=True)
        sys.stdout.write("x" * (3 << 20) + "\\n"); sys.stdout.flush()
        print("something went wrong", file=sys.stderr, flush=True)
        sys.exit(3)
        """,
    )
    settings = make_settings(claude_bin=cli)
    job_id = await new_job(engine, redis, settings)
    assert await run_job(worker_ctx(settings), job_id) == "failed"
    record = await get_job(engine, job_id)
    # The reason carries stderr's last lines: that is where the CLI says why.
    assert record is not None and record.reason == "exited with code 3 and no result: something went wrong"
    logs = [e["data"] for e in await events(redis, job_id) if e["kind"] == "log"]
    assert {"stream": "stdout", "line": "this is not json"} in logs
    assert {"stream": "stderr", "line": "something went wrong"} in logs
    big = [entry for entry in logs if "truncated" in entry["line"]]
    assert len(big) == 1 and f"{3 << 20} bytes" in big[0]["line"] and len(big[0]["line"]) <= 2000
    snap, _ = await read_state(redis, job_id)
    assert snap is not None and not snap.demo  # a configured binary is not the replay


async def test_binary_that_cannot_start(engine: Any, redis: Any, make_settings: Any, worker_ctx: Any, tmp_path: Path) -> None:
    settings = make_settings(claude_bin=str(tmp_path / "no-such-claude"))
    job_id = await new_job(engine, redis, settings)
    assert await run_job(worker_ctx(settings), job_id) == "failed"
    record = await get_job(engine, job_id)
    assert record is not None and "could not start" in (record.reason or "")


async def test_workdir_escape_is_refused(
    engine: Any, redis: Any, make_settings: Any, worker_ctx: Any, tmp_path: Path
) -> None:
    settings = make_settings()
    (settings.workspace_path / "link").symlink_to(tmp_path)  # points out of the workspace
    for workdir in ("../outside", "/etc", "link/inside", "a/../../outside"):
        job_id = await new_job(engine, redis, settings, workdir=workdir)
        assert await run_job(worker_ctx(settings), job_id) == "failed"
        record = await get_job(engine, job_id)
        assert record is not None and "outside the workspace root" in (record.reason or ""), workdir
        assert [e["data"]["status"] for e in await events(redis, job_id)] == ["queued", "failed"]
    assert not (tmp_path / "inside").exists() and not (tmp_path / "outside").exists()


async def test_timeout(engine: Any, redis: Any, make_settings: Any, worker_ctx: Any) -> None:
    settings = make_settings(replay_speed=1.0, cancel_grace=0.5)
    job_id = await new_job(engine, redis, settings, "[long]", timeoutSeconds=1)
    with anyio.fail_after(10):
        assert await run_job(worker_ctx(settings), job_id) == "failed"
    record = await get_job(engine, job_id)
    assert record is not None and record.reason == "timed out after 1s"


# --------------------------------------------------------------------------
# cancellation
# --------------------------------------------------------------------------

# A CLI that starts a grandchild in its own process group, ignores SIGINT
# (so cancel must escalate), then plays the long transcript.
STUBBORN = """
import os, signal, subprocess, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
child = subprocess.Popen(["sleep", "300"])
with open("pids.json", "w") as fh:
    fh.write('{"pid": %d, "child": %d}' % (os.getpid(), child.pid))
os.environ["PS_REPLAY_TRANSCRIPT"] = "long"
os.execv(sys.executable, [sys.executable, "-m", "worker.replay", *sys.argv[1:]])
"""


@pytest.mark.parametrize("stubborn", [False, True])
async def test_cancel_mid_run_leaves_no_process(
    engine: Any, redis: Any, make_settings: Any, worker_ctx: Any, tmp_path: Path, stubborn: bool
) -> None:
    overrides: dict[str, Any] = {"replay_speed": 1.0, "replay_transcript": "long", "cancel_grace": 0.5}
    if stubborn:
        overrides["claude_bin"] = fake_cli(tmp_path / "stubborn.py", STUBBORN)
    settings = make_settings(**overrides)
    job_id = await new_job(engine, redis, settings)
    result: list[str] = []

    async def run() -> None:
        result.append(await run_job(worker_ctx(settings), job_id))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)

        async def stepping() -> bool:
            return any(e["kind"] == "step" for e in await events(redis, job_id))

        await wait_for(stepping)
        pids = json.loads((settings.workspace_path / "pids.json").read_text()) if stubborn else None
        snap = await cancel_job(redis, engine, settings, job_id, by="alice")
        assert snap.status == "running"  # the worker publishes the end
    assert result == ["cancelled"]
    record = await get_job(engine, job_id)
    assert record is not None and record.status == "cancelled" and record.reason == "cancelled by alice"
    if pids:
        assert not pid_alive(pids["pid"]) and not pid_alive(pids["child"])
        assert group_members(pids["pid"]) == []
    # No replay of this job is left anywhere.
    assert not [p for p in _replay_processes() if settings.workspace_root in _cwd(p)]
    # Cancelling again returns the final snapshot unchanged.
    again = await cancel_job(redis, engine, settings, job_id, by="bob")
    assert again.status == "cancelled" and again.reason == "cancelled by alice"


def _replay_processes() -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"worker.replay" in cmd and pid_alive(int(entry)):
                found.append(int(entry))
    return found


def _cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


async def test_cancel_before_start_wins_over_the_worker(
    engine: Any, redis: Any, make_settings: Any, worker_ctx: Any, db_url: str
) -> None:
    settings = make_settings(database_url=db_url)
    job_id = await new_job(engine, redis, settings)
    snap = await cancel_job(redis, engine, settings, job_id, by="carol")
    assert snap.status == "cancelled" and snap.finishedAt
    assert await run_job(worker_ctx(settings), job_id) == "refused: terminal"
    assert [e["data"]["status"] for e in await events(redis, job_id)] == ["queued", "cancelled"]
    record = await get_job(engine, job_id)
    assert record is not None and record.status == "cancelled"
    with pytest.raises(LookupError):
        await cancel_job(redis, engine, settings, "nope")


# --------------------------------------------------------------------------
# duplicates and lost workers
# --------------------------------------------------------------------------


async def test_two_enqueues_run_the_job_once(
    engine: Any, redis: Any, arq_pool: Any, make_settings: Any, worker_ctx: Any, db_url: str
) -> None:
    settings = make_settings(database_url=db_url)
    job_id = await new_job(engine, redis, settings)
    await enqueue_job(arq_pool, job_id, queue_name=settings.queue_name)
    await enqueue_job(arq_pool, job_id, queue_name=settings.queue_name)
    worker = build_worker(settings, redis_url=settings.redis_url or "", engine=engine)
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_worker, worker)

        async def finished() -> bool:
            record = await get_job(engine, job_id)
            return record is not None and record.status == "succeeded"

        await wait_for(finished)
        # Concurrent and late duplicates are refused by the claim.
        ctx = worker_ctx(settings)
        assert await run_job(ctx, job_id) == "refused: terminal"
        await worker.close()
        tg.cancel_scope.cancel()
    statuses = [e["data"]["status"] for e in await events(redis, job_id) if e["kind"] == "status"]
    assert statuses == ["queued", "running", "succeeded"]


async def test_concurrent_claims_one_wins(redis: Any) -> None:
    job_id = uuid.uuid4().hex[:16]
    verdicts = []

    async def claim(worker: str) -> None:
        verdicts.append((await claim_run(redis, job_id, 1, worker, 5))[0])

    async with anyio.create_task_group() as tg:
        for n in range(5):
            tg.start_soon(claim, f"w{n}")
    assert sorted(verdicts) == ["busy"] * 4 + ["ok"]
    await redis.delete(f"ps:{{job:{job_id}}}:run", lease_key(job_id))


async def test_lost_worker_without_tries_left_fails_the_job(
    engine: Any, redis: Any, arq_pool: Any, make_settings: Any, db_url: str
) -> None:
    settings = make_settings(database_url=db_url, job_max_tries=1)
    job_id = await new_job(engine, redis, settings)
    # A "worker" claims the job, marks it running and vanishes: its lease
    # is never refreshed.
    assert (await claim_run(redis, job_id, 1, "ghost:1", 0.2))[0] == "ok"
    snap, _ = await read_state(redis, job_id)
    assert snap is not None
    await update_job(engine, job_id, snapshot=msgspec.structs.replace(snap, status="running", startedAt=now_ms()))

    async def swept() -> dict[str, str]:
        return await sweep_once(arq_pool, engine, settings)

    assert await wait_for(swept) == {job_id: "failed"}
    record = await get_job(engine, job_id)
    assert record is not None and record.status == "failed" and record.reason == "worker lost"
    evs = await events(redis, job_id)
    assert evs[-2]["kind"] == "worker" and evs[-2]["data"] == {"state": "lost", "workerId": "ghost:1"}
    # A late retry of the orphaned arq job is refused.
    assert await sweep_once(arq_pool, engine, settings) == {}
    ctx = {"settings": settings, "engine": engine, "redis": arq_pool, "worker_id": "late"}
    assert (await run_job(ctx, job_id)).startswith("refused")


@pytest.mark.slow
async def test_worker_killed_mid_job_is_retried(
    engine: Any, redis: Any, arq_pool: Any, make_settings: Any, db_url: str, tmp_path: Path
) -> None:
    """SIGKILL a real worker process mid-job: the job is re-run as attempt 2, never left running."""
    settings = make_settings(
        replay_speed=20.0, replay_transcript="long", lease_ttl=1.0, job_max_tries=2, database_url=db_url
    )
    job_id = await new_job(engine, redis, settings)
    await enqueue_job(arq_pool, job_id, queue_name=settings.queue_name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    for name in Settings.__struct_fields__:
        value = getattr(settings, name)
        if value is not None and not isinstance(value, tuple):
            env["PS_" + name.upper()] = str(value)
    log = (tmp_path / "worker.log").open("wb")
    victim = subprocess.Popen(
        [sys.executable, "-m", "arq", "worker.settings.WorkerSettings"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        async def stepping() -> bool:
            return any(e["kind"] == "step" for e in await events(redis, job_id))

        await wait_for(stepping, timeout=30)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=5)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
        log.close()

    # A surviving worker (in-process here) sweeps the lost job and re-runs it.
    rescuer = build_worker(settings, redis_url=settings.redis_url or "", engine=engine)
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_worker, rescuer)

        async def ended() -> Any:
            record = await get_job(engine, job_id)
            return record if record is not None and record.status in ("succeeded", "failed") else None

        record = await wait_for(ended, timeout=30)
        await rescuer.close()
        tg.cancel_scope.cancel()
    assert record.status == "succeeded" and record.attempt == 2
    evs = await events(redis, job_id)
    lost = [e for e in evs if e["kind"] == "worker" and e["data"]["state"] == "lost"]
    assert len(lost) == 1
    statuses = [(e["data"]["status"], e.get("attempt", 1)) for e in evs if e["kind"] == "status"]
    assert statuses == [("queued", 1), ("running", 1), ("queued", 1), ("running", 2), ("succeeded", 2)]
    # The orphaned CLI of attempt 1 dies on its broken stdout.
    await wait_for(lambda: _no_replays_in(settings.workspace_root), timeout=10)


async def _no_replays_in(root: str) -> bool:
    return not [p for p in _replay_processes() if _cwd(p).startswith(root)]


async def test_worker_shutdown_mid_job_gives_the_job_back(
    engine: Any, redis: Any, arq_pool: Any, make_settings: Any
) -> None:
    """Closing a worker mid-job stops the CLI and re-queues the job at once."""
    settings = make_settings(replay_speed=1.0, replay_transcript="long", job_max_tries=2, cancel_grace=0.5)
    job_id = await new_job(engine, redis, settings)
    await enqueue_job(arq_pool, job_id, queue_name=settings.queue_name)
    worker = build_worker(settings, redis_url=settings.redis_url or "", engine=engine)
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_worker, worker)

        async def stepping() -> bool:
            return any(e["kind"] == "step" for e in await events(redis, job_id))

        await wait_for(stepping)
        await worker.close()
        tg.cancel_scope.cancel()
    record = await get_job(engine, job_id)
    assert record is not None and record.status == "queued" and record.attempt == 2
    assert record.reason == "worker stopped; handed back as attempt 2 (no try spent)"
    assert await arq_pool.exists(f"arq:job:{job_id}:2")
    assert await _no_replays_in(settings.workspace_root)
    # The interrupted attempt's arq retry is refused; the new attempt runs.
    ctx = {"settings": settings, "engine": engine, "redis": arq_pool, "worker_id": "w2"}
    assert await run_job(ctx, job_id, 1) == "refused: superseded"
    await arq_pool.delete(f"arq:job:{job_id}:2")
    await arq_pool.zrem("ps:queue", f"{job_id}:2")
