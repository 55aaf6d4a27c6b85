"""Ctrl-C on ``progress-service dev``: an orderly stop, exit 0, no traceback.

``dev`` runs as a real subprocess in its own process group (a terminal's
foreground job); the test sends SIGINT to the whole group, as the terminal
does on Ctrl-C. The embedded redis-server must not get it (its own session)
and must be stopped last, after the running job was handed back.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from gateway_helpers import auth, closed_with, connect, join
from progress_service.embedded_redis import free_port

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    env.update(
        PS_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'dev.db'}",
        PS_WORKSPACE_ROOT=str(tmp_path / "workspace"),
        PS_QUEUE_NAME=f"ps:queue:test-shutdown-{os.getpid()}-{time.monotonic_ns()}",
        PS_LOG_LEVEL="info",
        **extra,
    )
    return env


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name, or None once it is gone (zombies are gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


async def _wait_for(log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> re.Match[str]:
    with anyio.fail_after(timeout):
        while True:
            match = re.search(pattern, log.read_text())
            if match:
                return match
            assert proc.poll() is None, log.read_text()[-3000:]
            await anyio.sleep(0.05)


async def test_ctrl_c_on_dev_stops_in_order_without_traceback(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "dev.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "progress_service.cli", "dev", "--port", str(port)],
            cwd=str(ROOT),
            env=_env(tmp_path, PS_REPLAY_SPEED="0.2"),  # slow: the job is still running at Ctrl-C
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, like a terminal's foreground job
        )
    try:
        base = f"http://127.0.0.1:{port}"
        token = (await _wait_for(log, r"export PS_TOKEN=(ps_[A-Za-z0-9_-]+)", proc)).group(1)
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=10) as http:
            with anyio.fail_after(60):
                while True:
                    try:
                        if (await http.get("/readyz")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    await anyio.sleep(0.05)
            job = (await http.post("/api/jobs", json={"prompt": "Add a health check"})).json()
            with anyio.fail_after(30):
                while (await http.get(f"/api/jobs/{job['id']}")).json()["status"] != "running":
                    await anyio.sleep(0.05)
        [redis_pid] = [p for p in _children(proc.pid) if "redis" in Path(f"/proc/{p}/cmdline").read_text()]
        # Not in dev's process group nor session: the terminal's Ctrl-C does not reach it.
        redis_stat, dev_stat = _stat(redis_pid), _stat(proc.pid)
        assert redis_stat and dev_stat
        assert redis_stat[2] != dev_stat[2] and redis_stat[3] != dev_stat[3]

        sse_ended = anyio.Event()

        async def sse_watcher(task_status: Any) -> None:
            async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as sse:
                async with sse.stream("GET", f"/api/jobs/{job['id']}/stream") as resp:
                    assert resp.status_code == 200
                    task_status.started()
                    with contextlib.suppress(httpx.HTTPError):
                        async for _line in resp.aiter_lines():
                            pass
            sse_ended.set()

        async with anyio.create_task_group() as tg, connect(base) as ws:
            await tg.start(sse_watcher)  # a curl -N watcher: its stream must end, not hold the shutdown
            await auth(ws, token)
            await join(ws, job["id"])
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
            code, reason = await closed_with(ws, timeout=20)
            with anyio.fail_after(8):  # under uvicorn's 10 s graceful timeout
                await sse_ended.wait()
        assert (code, reason) == (1001, "server restarting")
        returncode = await anyio.to_thread.run_sync(lambda: proc.wait(timeout=40))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text()
    assert returncode == 0, output[-3000:]
    assert "Traceback" not in output, output
    assert "graceful shutdown exceeded" not in output, output
    assert _stat(redis_pid) is None, "the embedded redis-server outlived dev"
    steps = [
        "shutdown: stopped accepting connections",
        "shutdown: closed 1 WebSocket connection(s) with 1001",
        "shutdown: stopping the worker; handing back 1 running job(s)",
        "shutdown: worker stopped",
        f"shutdown: embedded Redis (pid {redis_pid}) stopped",
    ]
    positions = [output.find(step) for step in steps]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), (positions, output[-4000:])
    # The running job was handed back (queued for the next start), not failed nor left running.
    from progress_service.store.db import create_engine  # noqa: PLC0415
    from progress_service.store.jobs import get_job  # noqa: PLC0415

    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'dev.db'}")
    try:
        record = await get_job(engine, job["id"])
    finally:
        await engine.dispose()
    assert record is not None and record.status == "queued", record
