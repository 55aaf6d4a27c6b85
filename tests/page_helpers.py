"""Helpers for the job-page browser tests: one real stack per module, generated transcripts.

:class:`Stack` runs ``progress-service serve`` and ``worker`` subprocesses on
a private Redis and SQLite store shared by a whole test module (one server,
one browser), and can replace either process mid-test. :func:`write_transcript`
builds a replay transcript of any length with the step kinds the page shows
(a failing command, an edit with a diff, a subagent with nested steps, a long
output, a Markdown summary).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from conftest import ServerProcess, settings_env
from progress_service.embedded_redis import free_port
from progress_service.ids import room_id
from progress_service.keys import events_key, snapshot_key
from progress_service.settings import Settings, load_settings

MODEL = "claude-sonnet-4-5-20250929"
SUMMARY = (
    "Fixed `average` in **src/calc.py** and added a test.\n\n"
    "- empty input raises `ValueError`\n- 2 tests pass\n\n"
    "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\">"
)


class Stack:
    """serve + worker subprocesses on one Redis and store, shared by a test module."""

    def __init__(self, root: Path, redis_url: str, **overrides: Any) -> None:
        self.root = root
        workspace = root / "workspace"
        workspace.mkdir(parents=True, exist_ok=True)
        base: dict[str, Any] = {
            "redis_url": redis_url,
            "database_url": f"sqlite+aiosqlite:///{root / 'store.db'}",
            "workspace_root": str(workspace),
            "replay_speed": 4.0,
            "cancel_grace": 1.0,
            "log_level": "warning",
            "queue_name": f"ps:queue:test-{uuid.uuid4().hex[:10]}",
        }
        base.update(overrides)
        self.settings: Settings = load_settings(env={}, **base)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[ServerProcess] = []
        self.serve = self.start("serve")
        self.worker = self.start("worker")

    def start(self, command: str) -> ServerProcess:
        """Start ``progress-service <command>`` (serve on the stack's port)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
        env.update(settings_env(self.settings))
        args = [command] + (["--host", "127.0.0.1", "--port", str(self.port)] if command == "serve" else [])
        proc = ServerProcess(args, env, self.port, self.root / f"{command}-{len(self.procs)}.log")
        self.procs.append(proc)
        if command == "serve":
            proc.wait_ready()
        return proc

    def kill_worker(self) -> None:
        """SIGKILL the worker (a lost worker: its lease runs out), then start a fresh one."""
        self.worker.stop(signal.SIGKILL, timeout=5)
        self.worker = self.start("worker")

    def token(self, role: str, user: str) -> str:
        """An API token in this stack's store (run off Playwright's event-loop thread)."""

        async def make() -> str:
            from progress_service.store.db import create_engine  # noqa: PLC0415
            from progress_service.store.identity import create_token  # noqa: PLC0415
            from progress_service.store.migrations import migrate  # noqa: PLC0415

            engine = create_engine(self.settings.database_url)
            try:
                await migrate(engine)
                token, _ = await create_token(engine, user=user, team="t1", role=role)
                return token
            finally:
                await engine.dispose()

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, make()).result()

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()


def write_transcript(path: Path, steps: int, *, delay_ms: int = 0) -> Path:
    """A replay transcript with ``steps`` top-level tool calls (plus 2 nested in a subagent)."""
    lines: list[dict[str, Any]] = []
    usage = {"input_tokens": 10, "cache_read_input_tokens": 1000, "output_tokens": 5}

    def add(obj: dict[str, Any], d: int = delay_ms) -> None:
        lines.append({"d": d, "j": obj})

    def call(n: int, name: str, tool_input: dict[str, Any], result: Any, *, error: bool = False, parent: str | None = None) -> None:
        tid = f"toolu_{n:05d}"
        add({"type": "assistant", "parent_tool_use_id": parent, "message": {"id": f"msg_{n:05d}", "role": "assistant", "model": MODEL,
             "content": [{"type": "tool_use", "id": tid, "name": name, "input": tool_input}], "stop_reason": None, "usage": usage}})
        add({"type": "user", "parent_tool_use_id": parent, "message": {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": tid, "content": result, "is_error": error}]}})

    add({"type": "system", "subtype": "init", "model": MODEL, "session_id": "s", "tools": ["Bash", "Read", "Edit", "Task"]})
    todos = [{"content": f"Part {i}", "status": "pending", "activeForm": f"Doing part {i}"} for i in range(1, 4)]
    call(0, "TodoWrite", {"todos": todos}, "ok")
    for n in range(1, steps):
        if n == 5:
            call(n, "Bash", {"command": "pytest -q tests/test_calc.py"}, "Exit code 2\nFAILED tests/test_calc.py::test_mean - assert 1 == 2", error=True)
        elif n == 6:
            call(n, "Edit", {"file_path": "src/calc.py", "old_string": "return sum(xs) // len(xs)\n", "new_string": "return sum(xs) / len(xs)\n"}, "edited")
        elif n == 7:
            call(n, "Task", {"description": "look for other callers", "prompt": "Find callers of average"}, "2 callers found")
            # The subagent's own steps arrive with the Task as their parent.
            lines.pop()
            call(steps + 1, "Grep", {"pattern": "average\\("}, "src/a.py:3\nsrc/b.py:9", parent="toolu_00007")
            call(steps + 2, "Read", {"file_path": "src/a.py"}, "def f():\n    return average([1])\n", parent="toolu_00007")
            add({"type": "user", "message": {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_00007", "content": "2 callers found"}]}})
        elif n == 8:
            call(n, "Bash", {"command": "cat big.log"}, "\n".join(f"line {i} " + "x" * 40 for i in range(120)))
        elif n % 100 == 50:
            done = min(3, n // 100 + 1)
            call(n, "TodoWrite", {"todos": [dict(t, status="completed" if i < done else "pending") for i, t in enumerate(todos)]}, "ok")
        else:
            call(n, "Read", {"file_path": f"src/module_{n}.py"}, f"# module {n}\n")
    final = [dict(t, status="completed") for t in todos]
    call(steps, "TodoWrite", {"todos": final}, "ok")
    add({"type": "assistant", "message": {"id": "msg_final", "role": "assistant", "model": MODEL, "content": [{"type": "text", "text": "Done."}], "stop_reason": "end_turn", "usage": usage}})
    add({"type": "result", "subtype": "success", "is_error": False, "duration_ms": 5000, "num_turns": steps + 1, "total_cost_usd": 0.5,
         "usage": {"input_tokens": 100, "cache_read_input_tokens": 2_000_000, "output_tokens": 4000}, "result": SUMMARY, "session_id": "s"})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def inject_job(stack: Stack, transcript: Path, *, user: str = "sam", team: str = "t1") -> str:
    """A finished job whose events are what the real mapper makes of ``transcript``.

    Written straight into the stack's Redis and store (the worker never sees
    it), so a page test of 10,000 steps does not wait for 20,000 appends one
    by one. Returns the job id.
    """

    async def run() -> str:
        import msgspec  # noqa: PLC0415
        from redis.asyncio import Redis  # noqa: PLC0415

        from progress_service import streams  # noqa: PLC0415
        from progress_service.events import JobSnapshot, JobSpec, StoredEvent  # noqa: PLC0415
        from progress_service.ids import now_ms
        from progress_service.store.db import create_engine  # noqa: PLC0415
        from progress_service.store.identity import ensure_team, ensure_user  # noqa: PLC0415
        from progress_service.store.jobs import create_job, update_job  # noqa: PLC0415
        from worker.mapping import Mapper  # noqa: PLC0415

        job_id = uuid.uuid4().hex
        engine = create_engine(stack.settings.database_url)
        redis = Redis.from_url(stack.settings.redis_url or "")
        try:
            team_id = await ensure_team(engine, team)
            user_id = await ensure_user(engine, user)
            spec = JobSpec(prompt=f"[transcript:{transcript.name}] injected")
            created = now_ms()
            await create_job(engine, job_id=job_id, team_id=team_id, user_id=user_id, spec=spec, created_at=created, demo=True)
            snapshot = JobSnapshot(id=job_id, roomId=room_id(job_id), prompt=spec.prompt, createdAt=created, submittedBy=user, demo=True)
            mapper = Mapper(snapshot)
            mapped = mapper.status("running", startedAt=now_ms())
            for raw in transcript.read_text().splitlines():
                mapped += mapper.feed(json.dumps(json.loads(raw)["j"]).encode())
            mapped += mapper.status("succeeded")
            key = events_key(job_id)
            enc = msgspec.json.Encoder()
            for start in range(0, len(mapped), 1000):
                async with redis.pipeline(transaction=False) as pipe:
                    for ev in mapped[start : start + 1000]:
                        body = StoredEvent(kind=ev.kind, at=ev.at, data=msgspec.to_builtins(ev.data))
                        pipe.xadd(key, {"t": b"event", "b": enc.encode(body)})
                    await pipe.execute()
            final = mapper.snapshot
            await redis.hset(snapshot_key(job_id), mapping={"s": streams.encode_snapshot(final), "n": len(mapped)})
            await update_job(engine, job_id, snapshot=final)
            return job_id
        finally:
            await redis.aclose()
            await engine.dispose()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()
