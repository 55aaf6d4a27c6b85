"""Helpers for the hook tests: hook bodies as Claude Code sends them, and waits."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import httpx

from progress_service.hooks.ingest import session_job_id

HOOK_PATH = "/api/hooks/claude-code"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Session:
    """Builds the hook bodies of one Claude Code session."""

    def __init__(self, session_id: str | None = None, cwd: str = "/home/dev/project") -> None:
        self.session_id = session_id or str(uuid.uuid4())
        self.cwd = cwd
        self.job_id = session_job_id(self.session_id)

    def body(self, event: str, **fields: Any) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "transcript_path": f"/home/dev/.claude/projects/x/{self.session_id}.jsonl",
            "cwd": self.cwd,
            "permission_mode": "default",
            "hook_event_name": event,
            # A field this service does not know: it must be ignored.
            "some_future_field": {"nested": [1, 2, 3]},
            **fields,
        }

    def pre(self, tool_id: str, tool: str, tool_input: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return self.body("PreToolUse", tool_name=tool, tool_input=tool_input, tool_use_id=tool_id, **extra)

    def post(self, tool_id: str, tool: str, tool_input: dict[str, Any], response: Any = "ok", **extra: Any) -> dict[str, Any]:
        return self.body("PostToolUse", tool_name=tool, tool_input=tool_input, tool_use_id=tool_id, tool_response=response, **extra)

    def fail(self, tool_id: str, tool: str, tool_input: dict[str, Any], error: str = "exit 1") -> dict[str, Any]:
        return self.body("PostToolUseFailure", tool_name=tool, tool_input=tool_input, tool_use_id=tool_id, error=error)


async def post_hook(client: httpx.AsyncClient, token: str, body: Any, *, host: str | None = "laptop-1") -> httpx.Response:
    headers = bearer(token)
    if host:
        headers["X-PS-Host"] = host
    if isinstance(body, (bytes, str)):
        return await client.post(HOOK_PATH, content=body, headers={**headers, "content-type": "application/json"})
    return await client.post(HOOK_PATH, json=body, headers=headers)


async def wait_snapshot(client: httpx.AsyncClient, token: str, job_id: str, predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
    """The job's snapshot once ``predicate(snapshot)`` holds."""
    with anyio.fail_after(timeout):
        while True:
            resp = await client.get(f"/api/jobs/{job_id}", headers=bearer(token))
            if resp.status_code == 200 and predicate(resp.json()):
                return resp.json()
            await anyio.sleep(0.02)


async def events(client: httpx.AsyncClient, token: str, job_id: str) -> list[dict[str, Any]]:
    resp = await client.get(f"/api/jobs/{job_id}/events", params={"limit": 1000}, headers=bearer(token))
    assert resp.status_code == 200, resp.text
    return resp.json()["items"]


def steps(items: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(stepId, state) of every step event, in order."""
    return [(e["data"]["stepId"], e["data"]["state"]) for e in items if e.get("kind") == "step"]


async def settled(app: Any, timeout: float = 10.0) -> None:
    """Wait until the app's ingest task has applied every hook it accepted."""
    ingest = app.state.services.hooks.ingest
    with anyio.fail_after(timeout):
        while not ingest.idle:
            await anyio.sleep(0.01)
