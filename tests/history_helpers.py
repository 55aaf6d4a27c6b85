"""Helpers for the history tests: a private redis-server that can be killed, and readers.

Every reader is a real client of the running service: HTTP pages of
``/events``, a WebSocket join, the SSE stream.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

from gateway_helpers import auth, connect, join
from progress_service.embedded_redis import free_port, redis_binary, wait_for_port

TERMINAL = ("succeeded", "failed", "cancelled")


class PrivateRedis:
    """A redis-server of the test's own (AOF on), on a fixed port, that can be SIGKILLed and started again."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [
            redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self.data_dir),
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", self.port)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final AOF rewrite."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def client(base: str, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=10)


async def submit(http: httpx.AsyncClient, prompt: str) -> str:
    r = await http.post("/api/jobs/", json={"prompt": prompt})
    assert r.status_code == 201, r.text
    return r.json()["id"]


async def wait_status(http: httpx.AsyncClient, job_id: str, statuses: tuple[str, ...], timeout: float = 30) -> dict[str, Any]:
    """Poll the job until its status is one of ``statuses``."""
    with anyio.fail_after(timeout):
        while True:
            with contextlib.suppress(httpx.HTTPError):
                r = await http.get(f"/api/jobs/{job_id}")
                if r.status_code == 200 and r.json()["status"] in statuses:
                    return r.json()
            await anyio.sleep(0.1)


async def http_events(http: httpx.AsyncClient, job_id: str, since: str | None = None) -> tuple[list[dict[str, Any]], bool]:
    """Every item after ``since`` over ``GET /events`` (paged); and whether any page said ``gap``."""
    items: list[dict[str, Any]] = []
    gap = False
    while True:
        params: dict[str, Any] = {"limit": 1000}
        if since:
            params["since"] = since
        r = await http.get(f"/api/jobs/{job_id}/events", params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        gap = gap or page["gap"]
        if not page["items"]:
            return items, gap
        items += page["items"]
        since = page["next"]


def is_terminal(item: dict[str, Any]) -> bool:
    return item.get("type") == "event" and item.get("kind") == "status" and item["data"].get("status") in TERMINAL


async def ws_items(base: str, token: str, job_id: str, since: str | None, *, timeout: float = 30) -> tuple[list[dict[str, Any]], bool]:
    """Join with ``since`` and read room items until the job's terminal status; and whether ``gap`` came."""
    items: list[dict[str, Any]] = []
    gap = False
    async with connect(base, max_queue=64) as ws:
        await auth(ws, token)
        joined = await join(ws, job_id, since)
        done = joined["snapshot"]["status"] in TERMINAL and joined.get("head") is not None
        with anyio.fail_after(timeout):
            while True:
                if done and items and items[-1]["id"] == joined["head"]:
                    return items, gap
                msg = json.loads(await ws.recv())
                for m in msg if isinstance(msg, list) else [msg]:
                    if m.get("type") == "gap":
                        gap = True
                    if m.get("type") in ("event", "chat"):
                        items.append(m)
                        if is_terminal(m):
                            return items, gap


async def sse_items(http: httpx.AsyncClient, job_id: str, last_event_id: str | None = None) -> tuple[list[dict[str, Any]], bool]:
    """Read the SSE stream to its end (it ends after the terminal status); items and whether ``gap`` came."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    items: list[dict[str, Any]] = []
    gap = False
    event = None
    async with http.stream("GET", f"/api/jobs/{job_id}/stream", headers=headers, timeout=30) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                if event == "gap":
                    gap = True
                elif event in ("event", "chat"):
                    items.append(json.loads(line[6:]))
    return items, gap


def ids(items: list[dict[str, Any]]) -> list[str]:
    return [i["id"] for i in items]


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    """Block until ``predicate()`` is true (sync tests)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)
